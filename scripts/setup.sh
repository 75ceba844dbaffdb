#!/usr/bin/env bash
# Install exocortex into ./.venv (idempotent). Used by speedrun.sh, test.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  # CPU machines: the pinned CPU build (a local wheel on our dev/CI machines); GPU machines: PyPI's CUDA build
  if command -v nvidia-smi >/dev/null 2>&1; then pip install -q torch; else pip install -q torch==2.13.0; fi
fi
pip install -q -e ".[test]" 2>&1 | grep -v -E "^WARNING: Location|^\s*$" || true
python -c "import exocortex, torch, tiktoken, rustbpe; print(f'exocortex ready: torch {torch.__version__}')"
