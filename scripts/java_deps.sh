#!/usr/bin/env bash
# The Java programs of the interoperability tests (tests/test_kafka_interop.py),
# ready to run: Apache Kafka's client and tools and Apache Avro resolved from
# Maven Central through scripts/java/pom.xml, and tests/java/*.java compiled
# against them with javac.
#
#   scripts/java_deps.sh      prints the classpath to run them with (e.g.
#                             java -cp "$(scripts/java_deps.sh)" RunsReader ...)
#                             as the last stdout line; progress and errors go
#                             to stderr.
#
# Idempotent and cached: the jars are resolved again only when the pom
# changes, the classes only when a source changes. Maven keeps its downloads
# in ~/.m2 (its default local repository).
#
# Environment (all optional):
#   JAVA_DEPS_DIR   jars and classes   (default <repo>/.kafka/java)
#   JAVA_HOME       Java (17+) to use  (default: java and javac on PATH)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
POM="$ROOT/scripts/java/pom.xml"
SRC="$ROOT/tests/java"
STATE="${JAVA_DEPS_DIR:-$ROOT/.kafka/java}"
LIB="$STATE/lib"
CLASSES="$STATE/classes"

if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/javac" ]]; then
  JAVAC="$JAVA_HOME/bin/javac"
else
  JAVAC=javac
fi

log() { echo "java_deps.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

resolve_jars() {
  local want tmp attempt
  want="$(sha256sum "$POM" | cut -d' ' -f1)"
  if [[ -f "$LIB/.stamp" && "$(cat "$LIB/.stamp")" == "$want" ]]; then
    return 0
  fi
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch the Kafka and Avro jars (Debian: apt-get install maven)"
  log "resolving kafka-clients, kafka-tools and avro with Maven (first run downloads ~50 MB into ~/.m2)..."
  tmp="$STATE/lib.new"
  for attempt in 1 2; do
    rm -rf "$tmp"
    if (cd "$ROOT/scripts/java" && mvn -B -q -f "$POM" \
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
  die "could not resolve the Kafka and Avro jars from Maven Central"
}

# A machine with only a Java runtime (enough for Maven and the broker) gets
# Debian's JDK, as scripts/browser.sh gets chromium.
ensure_javac() {
  command -v "$JAVAC" >/dev/null && return 0
  local pkg=openjdk-17-jdk-headless apt_log="$STATE/apt.log" sudo=()
  command -v apt-get >/dev/null || die "javac (JDK 17+) is needed to build tests/java, and apt-get is not here to install $pkg"
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null \
      || die "javac (JDK 17+) is needed to build tests/java: run 'apt-get install $pkg' as root"
    sudo=(sudo -n)
  fi
  log "installing $pkg with apt-get for javac (output in $apt_log)"
  export DEBIAN_FRONTEND=noninteractive
  { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q --no-install-recommends "$pkg"; } \
    >"$apt_log" 2>&1 || { tail -n 20 "$apt_log" >&2; die "apt-get install $pkg failed (full output: $apt_log)"; }
  command -v "$JAVAC" >/dev/null || die "$pkg installed but javac is not on PATH"
}

compile() {
  local want tmp
  ensure_javac
  want="$(cat "$LIB/.stamp" "$SRC"/*.java | sha256sum | cut -d' ' -f1)"
  if [[ -f "$CLASSES/.stamp" && "$(cat "$CLASSES/.stamp")" == "$want" ]]; then
    return 0
  fi
  log "compiling tests/java..."
  tmp="$STATE/classes.new"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  "$JAVAC" -Xlint:all -Werror --release 17 -cp "$LIB/*" -d "$tmp" "$SRC"/*.java >&2 \
    || die "javac failed on tests/java"
  echo "$want" >"$tmp/.stamp"
  rm -rf "$CLASSES"
  mv "$tmp" "$CLASSES"
}

main() {
  mkdir -p "$STATE"
  # One resolver at a time (parallel test workers share the cache).
  exec 9>"$STATE/.lock"
  flock 9
  resolve_jars
  compile
  echo "$CLASSES:$LIB/*"
}

main "$@"
