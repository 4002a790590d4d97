#!/usr/bin/env bash
# Stepline's container images, built on this machine with no image registry:
#
#   stepline/debian:bookworm   Debian 12 (debootstrap --variant=minbase + docker import)
#   apache/kafka:<version>     Apache Kafka (KRaft) on that base, from the Maven Central jars
#                              scripts/kafka.sh resolves for the tests (`kafka.sh jars`: the
#                              broker and its tools), taking the official image's KAFKA_*
#                              variables (deploy/docker/kafka/); <version> is scripts/kafka/pom.xml's
#   stepline/stepline:local    the project's Dockerfile on the Debian base with Debian's
#                              python3.11, installed from wheels the host's pip fetched
#
#   scripts/images.sh build [base|kafka|stepline|all]   (default all) start the engine
#                          (scripts/docker.sh start), then build what is missing or stale.
#                          Idempotent and cached: an image whose inputs did not change
#                          (label dev.stepline.inputs) is kept; a Kafka image of that
#                          name without the label (the official one, pulled) is used as is.
#   scripts/images.sh names    NAME=image lines (DEBIAN_IMAGE, KAFKA_IMAGE, STEPLINE_IMAGE),
#                              e.g. `eval "$(scripts/images.sh names)"`.
#   scripts/images.sh check    exit 0 when the engine answers and every image exists;
#                              else exit 3 naming what is missing.
#
# Progress and errors go to stderr; exit 1 with the reason when an image cannot be
# built (no engine, no root for apt/debootstrap, no Maven, no mirror). Under CI=true
# the Makefile turns that into a failure; elsewhere the container tests skip and say why.
#
# Environment (all optional):
#   DEBIAN_MIRROR       debootstrap's mirror (default http://deb.debian.org/debian)
#   IMAGES_BUILD_DIR    staging folder for contexts, wheels, logs (default <repo>/build/docker)
#   PY                  Python whose pip fetches the wheels (default <repo>/.venv/bin/python)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${IMAGES_BUILD_DIR:-$ROOT/build/docker}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

kafka_prop() {  # the value of <NAME> in scripts/kafka/pom.xml's <properties>
  sed -n "s:.*<$1>\([^<]*\)</$1>.*:\1:p" "$ROOT/scripts/kafka/pom.xml" | head -n 1
}
KAFKA_VERSION="$(kafka_prop kafka.version)"

DEBIAN_IMAGE=stepline/debian:bookworm
KAFKA_IMAGE="apache/kafka:$KAFKA_VERSION"
STEPLINE_IMAGE=stepline/stepline:local
LABEL=dev.stepline.inputs

# The legacy builder: it needs no buildx plugin and runs on any engine version.
export DOCKER_BUILDKIT=0

log() { echo "images.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_inputs() { docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || true; }

hash_paths() {  # a digest of the files under the given paths (relative to the repo)
  (cd "$ROOT" && find "$@" -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 \
     | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

# After a rebuild, the image the tag left behind: removed unless a container still uses it.
drop_previous() {  # drop_previous OLD_ID NAME
  local new
  new="$(docker image inspect -f '{{.Id}}' "$2" 2>/dev/null || true)"
  if [[ -n "$1" && "$1" != "$new" ]]; then
    docker image rm "$1" >/dev/null 2>&1 || true
  fi
}

run_logged() {  # run_logged NAME CMD...: output to $BUILD/NAME.log, its tail on failure
  local name="$1" logf="$BUILD/$1.log"
  shift
  if ! "$@" >"$logf" 2>&1; then
    tail -n 40 "$logf" >&2
    die "$name failed (full output: $logf)"
  fi
}

# --- Debian base ------------------------------------------------------------------

build_base() {
  if image_exists "$DEBIAN_IMAGE"; then
    log "$DEBIAN_IMAGE: present"
    return 0
  fi
  command -v debootstrap >/dev/null || die "debootstrap is missing (scripts/docker.sh install adds it)"
  [[ "$(id -u)" == 0 ]] || die "debootstrap needs root to build $DEBIAN_IMAGE"
  local rootfs="$BUILD/rootfs" t0=$SECONDS
  rm -rf "$rootfs"
  log "$DEBIAN_IMAGE: debootstrap --variant=minbase bookworm from $MIRROR (log $BUILD/debootstrap.log)"
  run_logged debootstrap debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase bookworm (scripts/images.sh)" \
    - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$rootfs"
  log "$DEBIAN_IMAGE: built in $((SECONDS - t0))s"
}

# --- Kafka -----------------------------------------------------------------------

build_kafka() {
  [[ -n "$KAFKA_VERSION" ]] || die "cannot read kafka.version from scripts/kafka/pom.xml"
  local src="$ROOT/deploy/docker/kafka" ctx="$BUILD/kafka" want t0=$SECONDS
  want="$(hash_paths deploy/docker/kafka scripts/kafka/pom.xml)"
  if image_exists "$KAFKA_IMAGE"; then
    local have
    have="$(image_inputs "$KAFKA_IMAGE")"
    if [[ -z "$have" ]]; then
      log "$KAFKA_IMAGE: present and not built here (the official image); using it"
      return 0
    fi
    if [[ "$have" == "$want" ]]; then
      log "$KAFKA_IMAGE: up to date"
      return 0
    fi
  fi
  build_base
  rm -rf "$ctx"
  mkdir -p "$ctx"
  # The tests' broker's jars (the broker, its tools, log4j), resolved and cached
  # by scripts/kafka.sh in a state folder of its own.
  local jars
  log "$KAFKA_IMAGE: Kafka $KAFKA_VERSION's jars from scripts/kafka.sh jars (log $BUILD/jars.log)"
  jars="$(KAFKA_STATE_DIR="$BUILD/kafka-jars" "$ROOT/scripts/kafka.sh" jars 2>"$BUILD/jars.log")" || {
    tail -n 30 "$BUILD/jars.log" >&2
    die "scripts/kafka.sh jars failed (full output: $BUILD/jars.log)"
  }
  cp -r "$jars" "$ctx/lib"
  rm -f "$ctx/lib/.stamp"
  cp "$src"/* "$ctx/"
  log "$KAFKA_IMAGE: docker build (apt installs Java 17 in the image; log $BUILD/kafka-build.log)"
  local previous
  previous="$(docker image inspect -f '{{.Id}}' "$KAFKA_IMAGE" 2>/dev/null || true)"
  run_logged kafka-build docker build --build-arg BASE="$DEBIAN_IMAGE" \
    --label "$LABEL=$want" --label org.opencontainers.image.version="$KAFKA_VERSION" \
    -t "$KAFKA_IMAGE" "$ctx"
  rm -rf "$ctx/lib"
  drop_previous "$previous" "$KAFKA_IMAGE"
  log "$KAFKA_IMAGE: built in $((SECONDS - t0))s"
}

# --- Stepline ----------------------------------------------------------------------

build_stepline() {
  local want t0=$SECONDS py="${PY:-$ROOT/.venv/bin/python}" wheels="$ROOT/build/docker-wheels"
  want="$(hash_paths Dockerfile .dockerignore pyproject.toml README.md engine schemas projections consumers examples)"
  if [[ "$(image_inputs "$STEPLINE_IMAGE")" == "$want" ]]; then
    log "$STEPLINE_IMAGE: up to date"
    return 0
  fi
  build_base
  [[ -x "$py" ]] || py=python3
  # The image gets no network for pip: the host's pip (which reaches the
  # package index) fetches every wheel, and the build installs with --no-index.
  # setuptools and wheel: the build backend pip needs for the project itself.
  rm -rf "$wheels"
  mkdir -p "$wheels"
  log "$STEPLINE_IMAGE: fetching wheels with $py -m pip (log $BUILD/wheels.log)"
  run_logged wheels "$py" -m pip wheel --quiet --wheel-dir "$wheels" "$ROOT[otlp]" 'setuptools>=77' wheel
  rm -f "$wheels"/stepline-*.whl
  log "$STEPLINE_IMAGE: docker build on $DEBIAN_IMAGE (log $BUILD/stepline-build.log)"
  local previous
  previous="$(docker image inspect -f '{{.Id}}' "$STEPLINE_IMAGE" 2>/dev/null || true)"
  run_logged stepline-build docker build --build-arg BASE="$DEBIAN_IMAGE" --build-arg PIP_ARGS=--no-index \
    --label "$LABEL=$want" -t "$STEPLINE_IMAGE" "$ROOT"
  drop_previous "$previous" "$STEPLINE_IMAGE"
  log "$STEPLINE_IMAGE: built in $((SECONDS - t0))s"
}

# --- commands ----------------------------------------------------------------------

cmd_names() {
  echo "DEBIAN_IMAGE=$DEBIAN_IMAGE"
  echo "KAFKA_IMAGE=$KAFKA_IMAGE"
  echo "STEPLINE_IMAGE=$STEPLINE_IMAGE"
}

cmd_check() {
  local missing=() image
  if ! "$ROOT/scripts/docker.sh" status >/dev/null 2>&1; then
    echo "no Docker engine answers (run: scripts/docker.sh start)"
    return 3
  fi
  for image in "$DEBIAN_IMAGE" "$KAFKA_IMAGE" "$STEPLINE_IMAGE"; do
    image_exists "$image" || missing+=("$image")
  done
  if ((${#missing[@]})); then
    echo "missing image(s): ${missing[*]} (run: scripts/images.sh build)"
    return 3
  fi
  echo "ok"
}

cmd_build() {
  local what="${1:-all}"
  case "$what" in
    base | kafka | stepline | all) ;;
    *) die "unknown image '$what': expected base, kafka, stepline or all" ;;
  esac
  "$ROOT/scripts/docker.sh" start
  mkdir -p "$BUILD"
  exec 9>"$BUILD/.lock"  # one build at a time (parallel make or test runs)
  flock 9
  case "$what" in
    base) build_base ;;
    kafka) build_kafka ;;
    stepline) build_stepline ;;
    all) build_base; build_kafka; build_stepline ;;
  esac
}

case "${1:-}" in
  build) cmd_build "${2:-all}" ;;
  names) cmd_names ;;
  check) cmd_check ;;
  *)
    echo "usage: $0 build [base|kafka|stepline|all] | names | check" >&2
    exit 2
    ;;
esac
