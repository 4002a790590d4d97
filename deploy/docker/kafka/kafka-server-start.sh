#!/usr/bin/env bash
# kafka-server-start.sh server.properties [--override k=v]...: the broker in
# the foreground, with the server's logging and heap defaults (-Xmx1G -Xms1G,
# as Kafka's own script; set KAFKA_HEAP_OPTS to change them).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "USAGE: $0 server.properties [--override property=value]*" >&2
  exit 1
fi
export KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G}"
export KAFKA_LOG4J_OPTS="${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties}"
exec /opt/kafka/bin/kafka-run-class.sh kafka.Kafka "$@"
