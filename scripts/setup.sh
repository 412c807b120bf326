#!/usr/bin/env bash
# Create .venv and install veil with its test tools. Idempotent; safe to run again.
# torch==2.13.0 resolves to the CPU build where one is on local disk, else the registry's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[edge,dev,privacy]'
