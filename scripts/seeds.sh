#!/usr/bin/env bash
# RL-gain experiment: the tiny preset with step budgets (about what a 2-core CPU fits in the preset's time
# budgets), one run per seed, in parallel. Usage: bash scripts/seeds.sh <log_dir> <cpu|cuda> <threads> <seed>...
set -u
out=$1; dev=$2; threads=$3; shift 3
STEPS="--set pretrain.time_minutes=0 --set pretrain.max_steps=260 --set midtrain.time_minutes=0
       --set midtrain.max_steps=150 --set sft.time_minutes=0 --set sft.max_steps=75 --set rl.time_minutes=0
       --set rl.steps=30"
for s in "$@"; do
  OMP_NUM_THREADS=$threads python3 -m exocortex speedrun --run $dev-s$s --set seed=$s --set rl.seed=$s \
    --set device=$dev $STEPS > "$out/$dev-s$s.log" 2>&1 &
done
wait
