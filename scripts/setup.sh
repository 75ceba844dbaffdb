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
# llama-cpp-python (test extra) compiles llama.cpp from source: minutes on 2 cores, once (pip caches the wheel).
# Its multimodal library is not needed here.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
pip install -q -e ".[test]" 2>&1 | grep -v -E "^WARNING: Location|^\s*$" || true
if ! python -c "import llama_cpp" >/dev/null 2>&1; then
  # no compiler, say: install the rest of the test extra so everything else runs; the llama.cpp tests skip
  echo "note: llama-cpp-python did not build; the llama.cpp tests will be skipped"
  python -c "import tomllib; print('\n'.join(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']
    ['optional-dependencies']['test'] if not d.startswith('llama-cpp-python')))" | xargs pip install -q -e . \
    2>&1 | grep -v -E "^WARNING: Location|^\s*$" || true
fi
python -c "import exocortex, torch, tiktoken, rustbpe; print(f'exocortex ready: torch {torch.__version__}')"
