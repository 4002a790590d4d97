#!/usr/bin/env bash
# A headless browser for the dashboard's browser test (tests/test_dashboard.py):
# Debian's `chromium` and `chromium-driver` packages, installed with apt-get
# when either is missing. Idempotent: with both present it only says so.
#
# Needs root (or sudo without a password) to install; prints what it did and
# exits non-zero, with the reason, when the browser cannot be had.
set -euo pipefail

log() { echo "browser.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

PACKAGES=(chromium chromium-driver)
APT_LOG="${TMPDIR:-/tmp}/stepline-browser-apt.log"

missing=()
for pkg in "${PACKAGES[@]}"; do
  # `dpkg-query` says "install ok installed" only for a fully installed package.
  if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]} == 0)); then
  log "chromium and chromium-driver already installed: $(chromium --version 2>/dev/null || echo '?')"
  exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand (a Debian-based system is expected)"

if [[ "$(id -u)" == 0 ]]; then
  SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  die "installing ${missing[*]} needs root: run 'apt-get install ${missing[*]}' as root, or this script with sudo"
fi

log "installing ${missing[*]} with apt-get (output in $APT_LOG)"
export DEBIAN_FRONTEND=noninteractive
# A fresh machine has no package lists yet; refresh them once per install.
if ! "${SUDO[@]}" apt-get update -q >"$APT_LOG" 2>&1; then
  tail -n 20 "$APT_LOG" >&2
  die "apt-get update failed (full output: $APT_LOG)"
fi
if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$APT_LOG" 2>&1; then
  tail -n 20 "$APT_LOG" >&2
  die "apt-get install ${missing[*]} failed (full output: $APT_LOG)"
fi

command -v chromedriver >/dev/null || die "chromium-driver installed but chromedriver is not on PATH"
log "installed ${missing[*]}: $(chromium --version 2>/dev/null || echo '?'), $(chromedriver --version 2>/dev/null || echo '?')"
