import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.Future;

import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.StringSerializer;

/**
 * A service in another language publishing keyed records with the Java
 * client's default partitioner, run by tests/test_kafka_interop.py.
 *
 * <p>Usage: {@code KeyProducer BOOTSTRAP TOPIC < keys}. Sends one record per
 * key read from stdin (one key a line, no partition given) with acks=all and
 * prints {@code key TAB partition} for each, as the broker acknowledged it.
 */
public final class KeyProducer {
    private KeyProducer() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: KeyProducer BOOTSTRAP TOPIC < keys");
            System.exit(2);
        }
        List<String> keys = new ArrayList<>();
        try (BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8))) {
            for (String line = in.readLine(); line != null; line = in.readLine()) {
                if (!line.isEmpty()) {
                    keys.add(line);
                }
            }
        }
        Properties props = new Properties();
        props.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        props.put(ProducerConfig.ACKS_CONFIG, "all");
        props.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        props.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(props)) {
            List<Future<RecordMetadata>> sent = new ArrayList<>();
            for (String key : keys) {
                sent.add(producer.send(new ProducerRecord<>(args[1], key, "{\"from\":\"java\"}")));
            }
            for (int i = 0; i < keys.size(); i++) {
                System.out.println(keys.get(i) + "\t" + sent.get(i).get().partition());
            }
        }
    }
}
