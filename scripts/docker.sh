#!/usr/bin/env bash
# A Docker engine for Stepline's container tests, from Debian's packages.
#
#   scripts/docker.sh start     install what is missing (see below), then start
#                               `dockerd` unless an engine already answers; waits
#                               until it answers (DOCKER_START_TIMEOUT s). Idempotent.
#   scripts/docker.sh stop      stop the dockerd that `start` launched (and only it).
#   scripts/docker.sh status    "running <server version>" (exit 0) or "stopped" (exit 3).
#   scripts/docker.sh install   only the packages: docker.io, docker-compose, debootstrap.
#   scripts/docker.sh compose ARGS...
#                               Docker Compose: `docker compose` (v2) where the client has
#                               it, else Debian's `docker-compose` (1.29, which knows
#                               profiles and healthcheck conditions).
#
# Packages come from Debian with apt-get (one `apt-get update` first), so this
# needs root (or sudo without a password) the first time. The engine runs with
# overlay2 and cgroupfs, which work on the CI machines and inside most
# sandboxes; its output goes to $DOCKER_STATE_DIR/dockerd.log.
#
# Exit status: 0 when an engine answers; 1 with the reason on stderr when it
# cannot be had. Under CI=true callers treat that as a failure; elsewhere the
# container tests skip and say why (scripts/images.sh and tests/ read the
# same `status`).
#
# Environment (all optional):
#   DOCKER_STATE_DIR       pid file and dockerd.log  (default <repo>/.docker)
#   DOCKER_START_TIMEOUT   seconds to wait for the engine (default 60)
#   DOCKER_HOST            an engine elsewhere: then nothing is installed or started
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${DOCKER_STATE_DIR:-$ROOT/.docker}"
PID_FILE="$STATE/dockerd.pid"
DAEMON_LOG="$STATE/dockerd.log"
APT_LOG="$STATE/apt.log"
START_TIMEOUT="${DOCKER_START_TIMEOUT:-60}"

log() { echo "docker.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

engine_answers() {
  command -v docker >/dev/null 2>&1 || return 1
  timeout 10 docker version --format '{{.Server.Version}}' 2>/dev/null
}

# --- packages -------------------------------------------------------------------

have_pkg() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

sudo_prefix() {
  if [[ "$(id -u)" == 0 ]]; then
    SUDO=()
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    return 1
  fi
}

cmd_install() {
  # dockerd comes from docker.io; the `docker` client may be another one
  # already on PATH (any client that speaks the engine's API version works).
  local want=(docker.io docker-compose debootstrap) missing=() pkg
  command -v apt-get >/dev/null || die "apt-get not found: install Docker, docker-compose and debootstrap by hand (a Debian-based system is expected)"
  for pkg in "${want[@]}"; do
    have_pkg "$pkg" || missing+=("$pkg")
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  sudo_prefix || die "installing ${missing[*]} needs root: run 'apt-get install ${missing[*]}' as root, or this script with sudo"
  mkdir -p "$STATE"
  log "installing ${missing[*]} with apt-get (output in $APT_LOG)"
  export DEBIAN_FRONTEND=noninteractive
  if ! "${SUDO[@]}" apt-get update -q >"$APT_LOG" 2>&1; then
    tail -n 20 "$APT_LOG" >&2
    die "apt-get update failed (full output: $APT_LOG)"
  fi
  # --no-install-recommends keeps out docker.io's suggested extras; dockerd
  # itself needs containerd, runc, iptables and tini, which are Depends.
  if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$APT_LOG" 2>&1; then
    tail -n 20 "$APT_LOG" >&2
    die "apt-get install ${missing[*]} failed (full output: $APT_LOG)"
  fi
  log "installed ${missing[*]}"
}

# --- the daemon --------------------------------------------------------------------

our_pid() {  # the pid of the dockerd we started, if it is alive
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q dockerd || return 1
  echo "$pid"
}

# A dockerd killed with SIGKILL leaves its own and its containerd's pid files
# behind; the next dockerd then refuses to start, or waits for that
# containerd ("still running") until it gives up. Remove each file unless its
# pid is still that live process.
clear_stale_pid_files() {
  local f pid name
  for f in /var/run/docker/containerd/containerd.pid "$STATE/dockerd.daemon.pid"; do
    [[ -f "$f" ]] || continue
    name="$(basename "$f" .pid)"
    name="${name%.daemon}"
    pid="$(cat "$f" 2>/dev/null || true)"
    # A zombie's cmdline is empty, so it counts as gone too.
    if [[ ! "$pid" =~ ^[0-9]+$ ]] || ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$name"; then
      log "removing the stale $f (pid ${pid:-?} is no $name)"
      "${SUDO[@]}" rm -f "$f"
    fi
  done
}

cmd_start() {
  local version
  if version="$(engine_answers)"; then
    log "engine answers (server $version)"
    return 0
  fi
  if [[ -n "${DOCKER_HOST:-}" ]]; then
    die "DOCKER_HOST=$DOCKER_HOST is set but no engine answers there"
  fi
  cmd_install
  command -v dockerd >/dev/null || die "dockerd is not on PATH after installing docker.io"
  command -v docker >/dev/null || die "no docker client on PATH after installing docker.io"
  sudo_prefix || die "starting dockerd needs root"
  mkdir -p "$STATE"
  if our_pid >/dev/null; then
    log "dockerd (pid $(our_pid)) is running but does not answer yet; waiting"
  else
    clear_stale_pid_files
    log "starting dockerd (overlay2, cgroupfs; log $DAEMON_LOG)"
    # setsid: the daemon outlives this script and the caller's Ctrl-C; its
    # own containerd is started and stopped by it.
    # shellcheck disable=SC2016 # $$ belongs to the inner shell
    "${SUDO[@]}" setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$PID_FILE" \
      dockerd --storage-driver=overlay2 --exec-opt native.cgroupdriver=cgroupfs \
      --pidfile "$STATE/dockerd.daemon.pid" \
      </dev/null >"$DAEMON_LOG" 2>&1 9>&- &
    local i
    for ((i = 0; i < 50; i++)); do  # the pid file, written before exec
      [[ -s "$PID_FILE" ]] && break
      sleep 0.1
    done
  fi
  local deadline=$((SECONDS + START_TIMEOUT))
  while ! version="$(engine_answers)"; do
    if ! our_pid >/dev/null; then
      tail -n 30 "$DAEMON_LOG" >&2 || true
      die "dockerd exited during start-up (log: $DAEMON_LOG)"
    fi
    if ((SECONDS > deadline)); then
      tail -n 30 "$DAEMON_LOG" >&2 || true
      die "dockerd did not answer within ${START_TIMEOUT}s (log: $DAEMON_LOG)"
    fi
    sleep 0.5
  done
  log "engine up (server $version, dockerd pid $(our_pid || echo '?'))"
}

cmd_stop() {
  local pid i
  if ! pid="$(our_pid)"; then
    log "no dockerd started by this script is running"
    rm -f "$PID_FILE"
    return 0
  fi
  log "stopping dockerd (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do  # up to 30 s: it stops its containers first
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "dockerd did not stop after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PID_FILE"
}

cmd_status() {
  local version
  if version="$(engine_answers)"; then
    echo "running $version"
    return 0
  fi
  echo "stopped"
  return 3
}

cmd_compose() {
  if docker compose version >/dev/null 2>&1; then
    exec docker compose "$@"
  fi
  command -v docker-compose >/dev/null || die "no Docker Compose: neither 'docker compose' nor 'docker-compose' (run: scripts/docker.sh install)"
  exec docker-compose "$@"
}

main() {
  local cmd="${1:-}"
  shift || true
  case "$cmd" in
    start | stop | install)
      mkdir -p "$STATE"
      exec 9>"$STATE/.lock"
      flock 9
      "cmd_$cmd"
      ;;
    status) cmd_status ;;
    compose) cmd_compose "$@" ;;
    *)
      echo "usage: $0 start|stop|status|install|compose ARGS..." >&2
      exit 2
      ;;
  esac
}

main "$@"
