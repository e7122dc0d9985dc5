#!/usr/bin/env bash
# Make sure Debian's Chromium is installed for the console's browser tests (tests/test_api_console*.py).
# Playwright drives it through `executable_path`: Playwright's own browser download does not work offline.
# Idempotent; installs with apt-get as root (or through sudo) when the binary is missing.
set -euo pipefail

CHROMIUM=${LORAPLEX_CHROMIUM:-/usr/bin/chromium}
if [[ -x $CHROMIUM ]]; then
  exit 0
fi

if [[ $(id -u) -eq 0 ]]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  echo "ensure_chromium.sh: $CHROMIUM is missing and installing it needs root (no sudo available)" >&2
  exit 1
fi

echo "ensure_chromium.sh: installing chromium with apt-get" >&2
"${SUDO[@]}" apt-get update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-dejavu-core

if [[ ! -x $CHROMIUM ]]; then
  echo "ensure_chromium.sh: apt-get finished but $CHROMIUM is still missing" >&2
  exit 1
fi
