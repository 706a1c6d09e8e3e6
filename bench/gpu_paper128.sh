#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, in two parts that each fit a 10-minute limit on one H200:
#   bash bench/gpu_paper128.sh OUT_DIR [1|2|all]        (default: all, part 1 then part 2)
# Part 1, the cheap and most wanted figures first:
#   - paper128 training steps in bf16 + channels_last, eager, at micro-batch 8, 16, 32 and 64: images/s, peak
#     memory, FLOPs and MFU against the datasheet's dense bf16 peak (989 TFLOP/s for an H200);
#   - DPM-Solver++ with 25 steps: 64 images in one batch, every step timed, eager and compiled.
# Part 2: the same training steps compiled (each micro-batch size compiles in a fresh process: minutes).
# Each benchmark prints its table, logs into OUT_DIR and rewrites its JSON there after every row, so a run stopped
# at a time limit keeps what it had measured. Needs torch with CUDA, diffusers, accelerate and datasets; this
# checkout's src/ is used when lsun_ddpm is not installed; WHEELS=DIR installs diffusers and datasets offline.
# PRESET=tiny16 (and ALLOW_CPU=1) try the script out in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?give the folder for the results}"
part="${2:-all}"
preset="${PRESET:-paper128}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="$(command -v python || command -v python3)"
"$py" -c "import lsun_ddpm" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# A GPU node without internet access: WHEELS=DIR installs what it lacks from a folder of wheels
# (docs/performance.md, "On a GPU", says how to fill it); pip names any requirement the folder misses.
if [[ -n "${WHEELS:-}" ]]; then
    "$py" -m pip install --quiet --no-index --find-links "$WHEELS" diffusers datasets
fi
# Fail in seconds, not after minutes of device time, when something is missing.
"$py" - <<'EOF'
import importlib.util, os, sys
missing = [name for name in ("torch", "diffusers", "accelerate", "datasets", "lsun_ddpm")
           if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"missing Python packages: {' '.join(missing)} (pip install them, or this project, first)")
import torch
if not torch.cuda.is_available() and os.environ.get("ALLOW_CPU") != "1":
    sys.exit("no CUDA device visible to torch: these are the GPU figures")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

train_steps() {  # $1: the setting, $2: the JSON's name
    "$py" bench/training_step.py --preset "$preset" --batch_sizes 8 16 32 64 --steps 10 --settings "$1" \
        --json "$out/$2.json" 2>&1 | tee "$out/$2.log"
}
if [[ "$part" == 1 || "$part" == all ]]; then
    train_steps bf16+channels_last training_step_eager
    "$py" bench/sampling_speed.py --preset "$preset" --schedulers dpmsolver++ --batch_sizes 64 --timed_steps 0 \
        --json "$out/sampling_speed.json" 2>&1 | tee "$out/sampling_speed.log"
fi
if [[ "$part" == 2 || "$part" == all ]]; then
    train_steps bf16+channels_last+compile training_step_compiled
fi
