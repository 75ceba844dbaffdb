#!/usr/bin/env bash
# Install, then run the test suite (CPU only, a few minutes). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# the browser test drives Debian's chromium (no browser download); installed when we can, else it skips
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "note: could not install chromium; the browser test will be skipped"
fi
# llama.cpp's llama-server (the GGUF tool-call test, bench/serve.py): found, or built once from llama-cpp-python's
# source distribution when cmake and a C++ compiler are there (~6 min on 2 cores), then cached; else that test skips
if [ -f bench/_llama_server.py ] && command -v cmake >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1; then
  python -c "import sys; sys.path.insert(0, 'bench'); import _llama_server as s; print('llama-server:', s.find() or s.build())" \
    || echo "note: could not build llama-server; the GGUF tool-call test will be skipped"
fi
python -m pytest -q "$@"
