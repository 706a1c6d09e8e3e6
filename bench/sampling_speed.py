"""Seconds per sampled image for each scheduler, fp32 against bf16 + channels_last.

    python bench/sampling_speed.py --preset paper128 --num_images 4
    python bench/sampling_speed.py --model path/to/pipeline --scheduler dpmsolver++ ddpm

Uses randomly initialised weights when no --model is given: the cost of a
sampling step does not depend on the weights.
"""

from __future__ import annotations

import argparse
import time

import torch

from lsun_ddpm.diffusion import make_noise_scheduler
from lsun_ddpm.models import PRESETS, ADMUNet2DModel
from lsun_ddpm.sampling import SCHEDULERS, SamplingPlan, fast_precision_available, generate, load_scheduler_config, load_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper128")
    parser.add_argument("--model", help="a pipeline folder or Hub id instead of a preset")
    parser.add_argument("--scheduler", nargs="+", choices=sorted(SCHEDULERS), default=["dpmsolver++", "ddim"])
    parser.add_argument("--num_inference_steps", type=int)
    parser.add_argument("--num_images", type=int, default=4)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model:
        unet, config = load_unet(args.model).to(device), load_scheduler_config(args.model)
    else:
        unet, config = ADMUNet2DModel.from_preset(args.preset).to(device).eval(), dict(make_noise_scheduler().config)
    name = args.model or args.preset
    print(f"{name}, {args.num_images} images in one batch, torch {torch.__version__}, {device}, "
          f"{torch.get_num_threads()} threads; bf16 fast here: {fast_precision_available(device)}")
    print("| scheduler | steps | precision | s / image |\n|---|---|---|---|")
    for scheduler in args.scheduler:
        for bf16 in (False, True):
            plan = SamplingPlan(scheduler, args.num_inference_steps, batch_size=args.num_images, bf16=bf16)
            generate(unet, config, 1, plan=SamplingPlan(scheduler, 2, 1, bf16))  # warm-up
            started = time.perf_counter()
            generate(unet, config, args.num_images, plan=plan)
            seconds = (time.perf_counter() - started) / args.num_images
            label = "bf16 + channels_last" if bf16 and fast_precision_available(device) else "fp32"
            print(f"| {scheduler} | {plan.steps} | {label} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
