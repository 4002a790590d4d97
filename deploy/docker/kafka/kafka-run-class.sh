#!/usr/bin/env bash
# kafka-run-class.sh CLASS ARGS...: run one of Kafka's main classes on the
# image's jars, with the environment the official scripts read:
# KAFKA_HEAP_OPTS (default -Xmx256M, as for Kafka's tools), KAFKA_JVM_PERFORMANCE_OPTS,
# KAFKA_GC_LOG_OPTS, KAFKA_JMX_OPTS (+ KAFKA_JMX_PORT), KAFKA_LOG4J_OPTS, KAFKA_OPTS.
set -euo pipefail
KAFKA_HOME=/opt/kafka
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CLASS [ARGS...]" >&2
  exit 2
fi
: "${KAFKA_HEAP_OPTS:=-Xmx256M}"
: "${KAFKA_JVM_PERFORMANCE_OPTS:=-server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true}"
: "${KAFKA_LOG4J_OPTS:=-Dlog4j2.configurationFile=$KAFKA_HOME/config/tools-log4j2.properties}"
if [[ -n "${KAFKA_JMX_PORT:-}" ]]; then
  KAFKA_JMX_OPTS="${KAFKA_JMX_OPTS:-} -Dcom.sun.management.jmxremote=true \
-Dcom.sun.management.jmxremote.authenticate=false -Dcom.sun.management.jmxremote.ssl=false \
-Djava.rmi.server.hostname=${KAFKA_JMX_HOSTNAME:-$(hostname -i | cut -d' ' -f1)} \
-Dcom.sun.management.jmxremote.local.only=false \
-Dcom.sun.management.jmxremote.port=$KAFKA_JMX_PORT -Dcom.sun.management.jmxremote.rmi.port=$KAFKA_JMX_PORT"
fi
# shellcheck disable=SC2086 # the *_OPTS are lists of options
exec java $KAFKA_HEAP_OPTS $KAFKA_JVM_PERFORMANCE_OPTS ${KAFKA_GC_LOG_OPTS:-} ${KAFKA_JMX_OPTS:-} \
  $KAFKA_LOG4J_OPTS ${KAFKA_OPTS:-} -cp "$KAFKA_HOME/libs/*" "$@"
