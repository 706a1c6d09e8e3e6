#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, in one run (about 10 minutes on one H200):
#   bash bench/gpu_paper128.sh OUT_DIR
# 1. paper128 training steps in bf16 + channels_last, eager and compiled, at micro-batch 8, 16, 32 and 64:
#    images/s, peak memory, FLOPs and MFU against the datasheet's dense bf16 peak (989 TFLOP/s for an H200).
# 2. DPM-Solver++ with 25 steps: 64 images in one batch, every step timed, eager and compiled.
# Each writes a table to stdout and its rows as JSON into OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?give the folder for the JSON results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python bench/training_step.py --preset paper128 --batch_sizes 8 16 32 64 --steps 10 \
    --settings bf16+channels_last bf16+channels_last+compile --json "$out/training_step.json"
python bench/sampling_speed.py --preset paper128 --schedulers dpmsolver++ --batch_sizes 64 --timed_steps 0 \
    --json "$out/sampling_speed.json"
