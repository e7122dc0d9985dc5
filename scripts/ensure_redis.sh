#!/usr/bin/env bash
# Make sure a `redis-server` binary is on PATH, installing Debian's package if needed.
# Nothing is started here: the tests start (and stop) their own instances.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi

if [[ $(id -u) -eq 0 ]]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  echo "ensure_redis.sh: redis-server is missing and installing it needs root (no sudo available)" >&2
  exit 1
fi

# The package's install hook would start a system-wide redis on :6379; a policy-rc.d that answers 101
# ("action forbidden") keeps it stopped. An existing policy is left alone.
POLICY=/usr/sbin/policy-rc.d
cleanup() { :; }
if [[ ! -e $POLICY ]]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod +x "$POLICY"
  cleanup() { "${SUDO[@]}" rm -f "$POLICY"; }
fi
trap cleanup EXIT

echo "ensure_redis.sh: installing redis-server with apt-get" >&2
"${SUDO[@]}" apt-get update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server

if ! command -v redis-server >/dev/null 2>&1; then
  echo "ensure_redis.sh: apt-get finished but redis-server is still not on PATH" >&2
  exit 1
fi
