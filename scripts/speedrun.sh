#!/usr/bin/env bash
# The main job: install, then train your own chat model end to end on the tiny preset (~18-20 min on 2 CPU cores).
# Extra arguments go to `exocortex speedrun` (e.g. --data my_texts/ or --run myname).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exocortex speedrun --preset tiny "$@"
