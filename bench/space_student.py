"""Seconds the Space's "Generate" takes for a distilled student: by default 4 images at the student's 2 steps.

    python bench/space_student.py --json bench-space-student.json
    python bench/space_student.py --model path/to/student --num_images 4

Without --model, a student the size of the paper's 128-px model, with random
weights, is written to a temporary folder as `lsun-ddpm distill` writes one (a
stock `DDIMPipeline` whose scheduler predicts v on the student's grid, and its
`distillation.json`): the time of a step does not depend on the weights. The
Space's own `SpaceModel` loads it, as the Space does (freed host memory kept
for reuse on a CPU, bf16 where the device is fast at it), and `generate` is
called as the Generate button calls it, at the student's own sampler and step
count: one warm-up call, then --repeats timed calls, reported as their median
and range, with the time the model took to load.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDIMPipeline

from lsun_ddpm.distill.run import student_scheduler
from lsun_ddpm.hardware import keep_freed_host_memory
from lsun_ddpm.layout import DISTILLATION_FILE
from lsun_ddpm.model.diffusion import make_noise_scheduler
from lsun_ddpm.model.unet import PRESETS, ADMUNet2DModel
from lsun_ddpm.publish.app import SpaceModel
from lsun_ddpm.sample.sampling import pick_device
from lsun_ddpm.train.export import save_pipeline_folder


def write_random_student(folder: Path, preset: str, steps: int) -> None:
    unet = ADMUNet2DModel.from_preset(preset)
    scheduler = student_scheduler(make_noise_scheduler(prediction_type="v_prediction"))
    save_pipeline_folder(unet, scheduler, folder, pipeline_class=DDIMPipeline)
    (folder / DISTILLATION_FILE).write_text(json.dumps({"student_steps": steps, "teacher": "random weights"}))


def time_generate(model: str, num_images: int, repeats: int) -> dict:
    started = time.perf_counter()
    space = SpaceModel(model)
    load_seconds = time.perf_counter() - started
    sampler, steps = space.default_sampler
    space.generate(num_images, sampler, steps, seed=0)  # warm-up: first-call allocations, kernel choices
    seconds = []
    for seed in range(1, repeats + 1):
        started = time.perf_counter()
        space.generate(num_images, sampler, steps, seed=seed)
        seconds.append(time.perf_counter() - started)
    return {"sampler": sampler, "steps": steps, "num_images": num_images, "load_seconds": round(load_seconds, 2),
            "generate_seconds_median": round(statistics.median(seconds), 3),
            "generate_seconds_min": round(min(seconds), 3), "generate_seconds_max": round(max(seconds), 3),
            "repeats": repeats, "resolution": space.resolution, "bf16": space.bf16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a student folder or Hub id (default: a random student of --preset)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper128")
    parser.add_argument("--student_steps", type=int, default=2, help="the random student's step count")
    parser.add_argument("--num_images", type=int, default=4, help="what Generate makes by default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()

    keep_freed_host_memory(pick_device())  # as the Space's main() does
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model is None:
            write_random_student(Path(folder), args.preset, args.student_steps)
            model = folder
        result = time_generate(model, args.num_images, args.repeats)
    result |= {"model": args.model or f"random {args.preset} student", "torch": torch.__version__,
               "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
