#!/usr/bin/env bash
# Idempotent setup on a fresh Debian machine (python3 + apt only): .venv with the pinned torch wheel,
# then loraplex editable with its [dev] extras. A stamp keyed by pyproject.toml, the torch spec and the
# interpreter makes a second run a no-op.
#   LORAPLEX_TORCH_SPEC  torch requirement to install first (default: the CPU build torch==2.13.0)
#   PYTHON               interpreter that creates the venv (default: python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
TORCH_SPEC=${LORAPLEX_TORCH_SPEC:-torch==2.13.0}
STAMP=$VENV/.loraplex-setup-stamp

setup_key() {
  { sha256sum pyproject.toml; echo "$TORCH_SPEC"; "$VENV/bin/python" -VV; } | sha256sum | cut -d' ' -f1
}

if [[ -x $VENV/bin/python && -f $STAMP && "$(cat "$STAMP")" == "$(setup_key)" ]]; then
  exit 0
fi

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else echo "setup.sh: '$*' needs root, and sudo is not available" >&2; exit 1
  fi
}

if [[ ! -x $VENV/bin/python ]]; then
  # Debian ships venv without ensurepip; python3-venv brings it.
  if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    echo "setup.sh: installing python3-venv" >&2
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
  fi
  echo "setup.sh: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi

echo "setup.sh: installing $TORCH_SPEC and loraplex[dev] into $VENV" >&2
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet -e '.[dev]'
# TGI's Python client pins huggingface-hub<1, which transformers 5 cannot use; it runs on hub 1.x.
"$VENV/bin/python" -m pip install --quiet --no-deps "text-generation==0.7.0"
setup_key > "$STAMP"
echo "setup.sh: done" >&2
