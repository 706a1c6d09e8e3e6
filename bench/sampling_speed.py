"""Seconds per sampled image for each scheduler and batch size, with and without torch.compile.

    python bench/sampling_speed.py --preset paper128 --json bench-sampling.json
    python bench/sampling_speed.py --model path/to/pipeline --schedulers dpmsolver++ --batch_sizes 64 --timed_steps 0

Uses randomly initialised weights when no --model is given: the cost of a
sampling step does not depend on the weights. Sampling runs as `lsun-ddpm
sample` runs it (`sampling.generate`: bf16 autocast + channels_last where the
device is fast at bf16, unless --fp32). A sample of S steps costs S U-Net
evaluations plus the scheduler's arithmetic, so each row times the first
`--timed_steps` steps after one warm-up step (which also compiles, when
compiling) and reports s/image = (s/step × S) ÷ batch size, S being the
scheduler's full count: DDPM-1000 at batch 16 would take hours on a CPU.
`--timed_steps 0` times every step instead. The first row of each compiled
batch size carries the compile time (warm-up step − steady step). On a CPU
freed memory is kept for reuse as `lsun-ddpm sample` keeps it
(`performance.keep_freed_host_memory`); `--glibc_malloc_defaults` times
glibc's defaults instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lsun_ddpm.model.diffusion import make_noise_scheduler
from lsun_ddpm.model.unet import ADMUNet2DModel, PRESETS
from lsun_ddpm.hardware import compile_in_place, fast_precision_available, keep_freed_host_memory
from lsun_ddpm.sample.sampling import SCHEDULERS, SamplingPlan, generate
from lsun_ddpm.sample.loading import load_scheduler_config, load_unet


class EnoughSteps(Exception):
    """Raised from the step callback once the timed steps are done: the rest of the sample is not needed."""


def time_steps(unet, config: dict, scheduler: str, batch_size: int, bf16: bool, timed_steps: int) -> dict:
    """Seconds of the warm-up step and the median of the next `timed_steps` (all, if 0) steps of one batch."""
    plan = SamplingPlan(scheduler, None, batch_size=batch_size, bf16=bf16)
    wanted = plan.steps if timed_steps == 0 else min(plan.steps, timed_steps + 1)
    stamps = [time.perf_counter()]

    def on_step():
        if unet.device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if len(stamps) > wanted:
            raise EnoughSteps

    try:
        generate(unet, config, batch_size, plan=plan, progress=lambda total: on_step)
    except EnoughSteps:
        pass
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    steady = sorted(durations[1:])[len(durations[1:]) // 2] if len(durations) > 1 else durations[0]
    return {"scheduler": scheduler, "steps": plan.steps, "batch_size": batch_size, "warm_up_step_seconds": durations[0],
            "seconds_per_step": steady, "timed_steps": len(durations) - 1,
            "seconds_per_image": steady * plan.steps / batch_size,
            "seconds_per_batch": steady * plan.steps,
            # with --timed_steps 0, the whole batch's wall time as it ran (the first step and any compiling included)
            "seconds_timed_in_all": sum(durations)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper128")
    parser.add_argument("--model", help="a pipeline folder or Hub id instead of a preset")
    parser.add_argument("--schedulers", nargs="+", choices=sorted(SCHEDULERS), default=["ddpm", "ddim", "dpmsolver++"])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--compile", choices=("both", "off", "on"), default="both")
    parser.add_argument("--timed_steps", type=int, default=4, help="steps timed per row after the warm-up (0: all)")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast / channels_last")
    parser.add_argument("--glibc_malloc_defaults", action="store_true",
                        help="on a CPU, do not keep freed memory for reuse (lsun-ddpm sample does)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model:
        unet, config = load_unet(args.model).to(device), load_scheduler_config(args.model)
    else:
        unet, config = ADMUNet2DModel.from_preset(args.preset).to(device).eval(), dict(make_noise_scheduler().config)
    kept = not args.glibc_malloc_defaults and keep_freed_host_memory(device)
    bf16 = not args.fp32 and fast_precision_available(device)
    name = args.model or args.preset
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}, torch {torch.__version__}, {device_name}, {'bf16 + channels_last' if bf16 else 'fp32'}"
          f"{', freed memory kept for reuse' if kept else ''}")
    rows = []
    for compiled in {"both": (False, True), "off": (False,), "on": (True,)}[args.compile]:
        if compiled:
            compile_in_place(unet)  # every later call runs compiled; each new batch size compiles once more
        for batch_size in args.batch_sizes:
            for scheduler in args.schedulers:
                row = time_steps(unet, config, scheduler, batch_size, bf16, args.timed_steps) | {"compile": compiled}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if args.json:  # after every row: a run stopped at a time limit keeps what it measured
                    Path(args.json).write_text(json.dumps(rows, indent=2))
    print("| scheduler | steps | batch | compile | s/step | s/image | warm-up step s | steps timed |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['scheduler']} | {row['steps']} | {row['batch_size']} | {'on' if row['compile'] else 'off'} | "
              f"{row['seconds_per_step']:.3f} | {row['seconds_per_image']:.2f} | {row['warm_up_step_seconds']:.1f} | "
              f"{row['timed_steps']} |")


if __name__ == "__main__":
    main()
