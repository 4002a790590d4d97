import java.io.File;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;

import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

/**
 * A consumer of a Stepline topic written in another language than Stepline's:
 * what docs/events.md ("From other languages") describes, run by
 * tests/test_kafka_interop.py.
 *
 * <p>Usage: {@code RunsReader BOOTSTRAP TOPIC SCHEMA_FILE}. Parses the published
 * self-contained schema with Avro's classic {@code Schema.Parser}, reads every
 * partition of TOPIC from offset 0 to its end (read_committed), decodes each
 * value with {@code BinaryMessageDecoder} (single-object encoding: C3 01, the
 * 8-byte little-endian CRC-64-AVRO fingerprint, the body) and prints, tab
 * separated:
 *
 * <pre>
 * SCHEMA  fingerprint (hex of the 8 bytes as on the wire)
 * EVENT   partition offset type run_id traceparent|- header=value...
 * </pre>
 */
public final class RunsReader {
    private RunsReader() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: RunsReader BOOTSTRAP TOPIC SCHEMA_FILE");
            System.exit(2);
        }
        String bootstrap = args[0];
        String topic = args[1];
        Schema schema = new Schema.Parser().parse(new File(args[2]));
        // The wire holds the fingerprint little-endian; print it in that order.
        long fingerprint = SchemaNormalization.parsingFingerprint64(schema);
        System.out.println("SCHEMA\t" + String.format("%016x", Long.reverseBytes(fingerprint)));
        BinaryMessageDecoder<GenericRecord> decoder =
                new BinaryMessageDecoder<>(GenericData.get(), schema);

        Properties props = new Properties();
        props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
        props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(props)) {
            List<TopicPartition> parts = new ArrayList<>();
            for (PartitionInfo info : consumer.partitionsFor(topic, Duration.ofSeconds(30))) {
                parts.add(new TopicPartition(topic, info.partition()));
            }
            consumer.assign(parts);
            consumer.seekToBeginning(parts);
            Map<TopicPartition, Long> end = new HashMap<>(consumer.endOffsets(parts));
            long deadline = System.nanoTime() + Duration.ofSeconds(60).toNanos();
            while (!reachedEnd(consumer, end)) {
                if (System.nanoTime() > deadline) {
                    System.err.println("RunsReader: did not reach the end offsets " + end + " in 60 s");
                    System.exit(1);
                }
                for (ConsumerRecord<byte[], byte[]> rec : consumer.poll(Duration.ofMillis(200))) {
                    print(rec, decoder.decode(rec.value()));
                }
            }
        }
    }

    private static boolean reachedEnd(KafkaConsumer<byte[], byte[]> consumer, Map<TopicPartition, Long> end) {
        for (Map.Entry<TopicPartition, Long> e : end.entrySet()) {
            if (consumer.position(e.getKey()) < e.getValue()) {
                return false;
            }
        }
        return true;
    }

    private static void print(ConsumerRecord<byte[], byte[]> rec, GenericRecord event) {
        Object traceparent = event.get("traceparent");
        StringBuilder line = new StringBuilder("EVENT")
                .append('\t').append(rec.partition())
                .append('\t').append(rec.offset())
                .append('\t').append(event.get("type"))
                .append('\t').append(event.get("run_id"))
                .append('\t').append(traceparent == null ? "-" : traceparent.toString());
        for (Header h : rec.headers()) {
            line.append('\t').append(h.key()).append('=')
                .append(new String(h.value(), StandardCharsets.UTF_8));
        }
        System.out.println(line);
    }
}
