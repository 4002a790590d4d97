#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft, no ZooKeeper) for Stepline's
# tests, without Docker: the broker's jars come from Maven Central through
# scripts/kafka/pom.xml and run on the machine's Java (17+).
#
#   scripts/kafka.sh start    resolve Kafka (cached), format, start, wait until
#                             it answers; prints the bootstrap address
#                             (e.g. 127.0.0.1:19092) as the last stdout line.
#                             Idempotent: a healthy broker from an earlier
#                             start is reused and its address printed.
#   scripts/kafka.sh stop     SIGTERM, wait, SIGKILL; removes the data dir.
#   scripts/kafka.sh status   prints "running <address> pid <pid>" (exit 0)
#                             or "stopped" (exit 3).
#   scripts/kafka.sh jars     resolve the jars only (cached) and print their
#                             directory: Kafka's own tools run from it, e.g.
#                             java -cp "$DIR/*" org.apache.kafka.tools.ConsoleProducer
#
# Only the address goes to stdout; progress and errors go to stderr.
#
# Environment (all optional):
#   KAFKA_PORT               PLAINTEXT listener port      (default 19092)
#   KAFKA_CONTROLLER_PORT    KRaft controller port        (default 19093)
#   KAFKA_STATE_DIR          jars, config, pid, logs      (default <repo>/.kafka)
#   KAFKA_START_TIMEOUT      seconds to wait for health   (default 90)
#   KAFKA_HEAP_OPTS          JVM heap                     (default -Xms256m -Xmx2g: the test suite
#                            creates thousands of partitions, one namespace per test)
#   KAFKA_JVM_OPTS           extra JVM options
#   KAFKA_PYTHON             Python with aiokafka for the health check
#                            (default <repo>/.venv/bin/python, then python3)
#   JAVA_HOME                Java to use (default: `java` on PATH)
#
# Jars are downloaded by Maven into ~/.m2 (its default local repository) and
# copied to $KAFKA_STATE_DIR/lib; both are reused by later runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
POM="$ROOT/scripts/kafka/pom.xml"
STATE="${KAFKA_STATE_DIR:-$ROOT/.kafka}"
LIB="$STATE/lib"
LOGS="$STATE/logs"
PID_FILE="$STATE/broker.pid"
ADDR_FILE="$STATE/bootstrap"
DATA_FILE="$STATE/data_dir"
CLUSTER_FILE="$STATE/cluster_id"
CONFIG="$STATE/server.properties"
LOG4J_CONFIG="$STATE/log4j2.properties"

PORT="${KAFKA_PORT:-19092}"
CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-19093}"
HOST=127.0.0.1
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx2g}"

if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
  JAVA="$JAVA_HOME/bin/java"
else
  JAVA=java
fi

log() { echo "kafka.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- process bookkeeping -----------------------------------------------------

# Prints the pid of our broker if it is alive (and really is a Kafka JVM,
# not a recycled pid); returns 1 otherwise.
broker_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/cmdline" ]]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'kafka\.Kafka' || return 1
  fi
  echo "$pid"
}

port_open() {  # port_open HOST PORT: is something listening?
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

log_tail() {
  local f
  for f in "$LOGS/server.log" "$LOGS/stdout.log"; do
    if [[ -s "$f" ]]; then
      echo "----- last lines of $f -----" >&2
      # Skip the indented config dump that opens every start-up.
      grep -v $'^\t' "$f" | tail -n 60 >&2 || true
    fi
  done
}

remove_data_dir() {
  if [[ -f "$DATA_FILE" ]]; then
    local dir
    dir="$(cat "$DATA_FILE")"
    # Only ever delete a directory this script created.
    if [[ -n "$dir" && "$(basename "$dir")" == stepline-kafka.* ]]; then
      rm -rf -- "$dir"
    fi
    rm -f "$DATA_FILE"
  fi
}

# --- jars --------------------------------------------------------------------

resolve_jars() {
  local want
  want="$(sha256sum "$POM" | cut -d' ' -f1)"
  if [[ -f "$LIB/.stamp" && "$(cat "$LIB/.stamp")" == "$want" ]]; then
    return 0
  fi
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch Kafka's jars (Debian: apt-get install maven)"
  log "resolving Apache Kafka jars with Maven (first run downloads ~65 MB into ~/.m2)..."
  local tmp="$STATE/lib.new" attempt
  for attempt in 1 2; do
    rm -rf "$tmp"
    if (cd "$ROOT/scripts/kafka" && mvn -B -q -f "$POM" \
          dependency:copy-dependencies -DincludeScope=runtime \
          -DoutputDirectory="$tmp") >"$STATE/mvn.log" 2>&1; then
      echo "$want" >"$tmp/.stamp"
      rm -rf "$LIB"
      mv "$tmp" "$LIB"
      return 0
    fi
    log "Maven failed (attempt $attempt); last lines of $STATE/mvn.log:"
    tail -n 30 "$STATE/mvn.log" >&2
  done
  die "could not resolve Kafka's jars from Maven Central"
}

check_java() {
  command -v "$JAVA" >/dev/null || die "Java 17+ is needed to run Kafka (Debian: apt-get install openjdk-17-jre-headless)"
  local v
  v="$("$JAVA" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')"
  v="${v%%.*}"
  if [[ "$v" =~ ^[0-9]+$ ]] && (( v < 17 )); then
    die "Kafka 4 needs Java 17+, found Java $v ($JAVA)"
  fi
}

# --- config --------------------------------------------------------------------

write_config() {  # write_config DATA_DIR
  cat >"$CONFIG" <<EOF
# Written by scripts/kafka.sh: a throwaway single-node KRaft broker for tests.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$1
num.partitions=1
default.replication.factor=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
EOF

  cat >"$LOG4J_CONFIG" <<EOF
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $LOGS/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache.kafka
logger.apache.level = INFO
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
}

# --- health ----------------------------------------------------------------------

pick_python() {
  local py
  for py in "${KAFKA_PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
    [[ -n "$py" ]] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import aiokafka' >/dev/null 2>&1; then
      echo "$py"
      return 0
    fi
  done
  return 1
}

# wait_healthy PID TIMEOUT: returns 0 once the broker answers a metadata
# request with our cluster id (so not some other broker on the port), 1 on
# timeout, 2 if the process died.
wait_healthy() {
  local pid="$1" timeout="$2" py cluster
  cluster="$(cat "$CLUSTER_FILE" 2>/dev/null || true)"
  if py="$(pick_python)"; then
    "$py" - "$HOST:$PORT" "$pid" "$timeout" "$cluster" <<'PY'
import asyncio, logging, os, sys, time

from aiokafka.admin import AIOKafkaAdminClient

logging.disable(logging.CRITICAL)  # "connection refused" is expected while it starts

bootstrap, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
cluster_id = sys.argv[4]


async def probe() -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        await admin.list_topics()
        found = (await admin.describe_cluster()).get("cluster_id")
    finally:
        await admin.close()
    if cluster_id and found != cluster_id:
        raise RuntimeError(f"{bootstrap} is another Kafka (cluster id {found}, ours {cluster_id})")


deadline = time.monotonic() + timeout
last = None
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(2)
    try:
        asyncio.run(asyncio.wait_for(probe(), 10))
        sys.exit(0)
    except Exception as exc:  # not up yet
        last = exc
    if time.monotonic() > deadline:
        print(f"kafka.sh: last health-check error: {last!r}", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.5)
PY
    return $?
  fi
  # No Python with aiokafka: fall back to the broker's own "started" line.
  local deadline=$((SECONDS + timeout))
  while :; do
    kill -0 "$pid" 2>/dev/null || return 2
    if grep -q 'Kafka Server started' "$LOGS/server.log" 2>/dev/null && port_open "$HOST" "$PORT"; then
      return 0
    fi
    (( SECONDS < deadline )) || return 1
    sleep 0.5
  done
}

# --- commands --------------------------------------------------------------------

stop_broker() {
  local pid i
  if pid="$(broker_pid)"; then
    log "stopping broker (pid $pid)..."
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do  # up to 30 s for a clean shutdown
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "broker did not stop after SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
    fi
  fi
  rm -f "$PID_FILE" "$ADDR_FILE" "$CLUSTER_FILE"
  remove_data_dir
}

cmd_start() {
  local pid addr rc

  if pid="$(broker_pid)"; then
    addr="$(cat "$ADDR_FILE" 2>/dev/null || echo "$HOST:$PORT")"
    PORT="${addr##*:}"
    log "broker already running (pid $pid); checking it answers on $addr"
    if wait_healthy "$pid" "$START_TIMEOUT"; then
      echo "$addr"
      return 0
    fi
    log "running broker (pid $pid) is not healthy; restarting it"
    log_tail
  fi
  stop_broker  # clears a stale pid file and data dir as well

  check_java
  resolve_jars

  # Checked after the (possibly long) download, right before binding.
  if port_open "$HOST" "$PORT"; then
    die "port $HOST:$PORT is already in use by another process; set KAFKA_PORT to a free port"
  fi
  if port_open "$HOST" "$CONTROLLER_PORT"; then
    die "port $HOST:$CONTROLLER_PORT is already in use by another process; set KAFKA_CONTROLLER_PORT to a free port"
  fi

  local t0=$SECONDS data cluster_id
  data="$(mktemp -d "${TMPDIR:-/tmp}/stepline-kafka.XXXXXX")"
  echo "$data" >"$DATA_FILE"
  mkdir -p "$LOGS"
  rm -f "$LOGS/server.log" "$LOGS/stdout.log"
  write_config "$data"

  local cp="$LIB/*"

  # A KRaft cluster id is a base64url (unpadded) random UUID; like Kafka's
  # own generator, avoid a leading '-' that would read as an option.
  cluster_id=-
  while [[ "$cluster_id" == -* ]]; do
    cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
  done
  echo "$cluster_id" >"$CLUSTER_FILE"
  if ! "$JAVA" -Xmx256m -Dlog4j2.configurationFile="$LOG4J_CONFIG" -cp "$cp" \
        kafka.tools.StorageTool format --cluster-id "$cluster_id" \
        --config "$CONFIG" --ignore-formatted >"$LOGS/format.log" 2>&1; then
    cat "$LOGS/format.log" >&2
    remove_data_dir
    die "formatting the KRaft storage failed"
  fi

  log "starting Kafka broker on $HOST:$PORT (controller $HOST:$CONTROLLER_PORT, data $data)"
  launch_broker "$t0"
}

# launch_broker T0: start the JVM on the written config and wait until it
# answers. Needs $LIB resolved and $CONFIG written.
launch_broker() {
  local t0="$1" pid rc cp="$LIB/*"
  # shellcheck disable=SC2206
  local jvm=($HEAP_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dkafka.logs.dir="$LOGS"
    ${KAFKA_JVM_OPTS:-})
  # setsid: the broker outlives this script and is not hit by the caller's
  # Ctrl-C. stdin/stdout/stderr and the lock fd are detached so a caller that
  # captures our output does not wait for the broker to exit.
  # shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$PID_FILE" \
    "$JAVA" "${jvm[@]}" -cp "$cp" kafka.Kafka "$CONFIG" \
    </dev/null >"$LOGS/stdout.log" 2>&1 9>&- &
  for ((rc = 0; rc < 50; rc++)); do  # wait for the pid file
    [[ -s "$PID_FILE" ]] && break
    sleep 0.1
  done
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [[ -n "$pid" ]] || die "broker process did not start"

  rc=0
  wait_healthy "$pid" "$START_TIMEOUT" || rc=$?
  if (( rc != 0 )); then
    if (( rc == 2 )); then
      log "broker process exited during start-up"
    else
      log "broker did not answer on $HOST:$PORT within ${START_TIMEOUT}s"
    fi
    log_tail
    stop_broker
    exit 1
  fi
  echo "$HOST:$PORT" >"$ADDR_FILE"
  log "broker up in $((SECONDS - t0))s (pid $pid, log $LOGS/server.log)"
  echo "$HOST:$PORT"
}

# Restart the running broker on its data: a broker outage, for fault tests.
# The log survives; clients see the broker go away and come back.
cmd_restart() {
  local pid i t0=$SECONDS
  pid="$(broker_pid)" || die "no broker is running; nothing to restart"
  [[ -f "$DATA_FILE" && -f "$CONFIG" ]] || die "the running broker was not started by this script"
  log "restarting broker (pid $pid) on its data $(cat "$DATA_FILE")..."
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$PID_FILE"
  sleep "${KAFKA_DOWN_SECONDS:-0}"
  launch_broker "$t0"
}

cmd_status() {
  local pid
  if pid="$(broker_pid)"; then
    echo "running $(cat "$ADDR_FILE" 2>/dev/null || echo "$HOST:$PORT") pid $pid"
    return 0
  fi
  echo "stopped"
  return 3
}

main() {
  local cmd="${1:-}"
  case "$cmd" in
    start | stop | status | restart | jars) ;;
    *)
      echo "usage: $0 start|stop|status|restart|jars" >&2
      exit 2
      ;;
  esac
  if [[ "$cmd" == status ]]; then
    cmd_status
    return
  fi
  mkdir -p "$STATE"
  # One start/stop at a time (e.g. parallel test workers).
  exec 9>"$STATE/.lock"
  flock 9
  case "$cmd" in
    start) cmd_start ;;
    stop) stop_broker ;;
    restart) cmd_restart ;;
    jars) resolve_jars && echo "$LIB" ;;
  esac
}

main "$@"
