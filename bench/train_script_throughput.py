"""Whole-process training throughput: this project's `train_unconditional.py` with its defaults against
diffusers' own example script, same U-Net config, same images, micro-batch 8.

    python bench/train_script_throughput.py --reference_script path/to/diffusers/examples/unconditional_image_generation/train_unconditional.py

The reference is diffusers' `examples/unconditional_image_generation/train_unconditional.py`
(it is not part of the diffusers package: take it from the diffusers repository
at the version of the installed diffusers). Each script runs as a user runs it
(`python SCRIPT ...`, one process) on the same 256-px JPEGs, with the U-Net config
of `--preset` written as a stock `UNet2DModel` config (`--model_config_name_or_path`
for both), micro-batch 8, no accumulation, EMA on, and the best precision each
supports: this project's defaults (bf16 + channels_last where the device is fast
at bf16), the example's `--mixed_precision bf16`. Each script is run for 2 and
for 6 optimizer steps; images/s = 4 steps × 8 images ÷ (time of 6 − time of 2),
so start-up, data loading, the final sample and the final save cancel out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lsun_ddpm.model.unet import PRESETS, build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 16  # 2 optimizer steps of 8 per epoch: the example's only unit of length is the epoch


def project_command(images: Path, model_config: Path, output_dir: Path, steps: int, batch_size: int) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "train_unconditional.py"), "--train_data_dir", str(images),
            "--model_config_name_or_path", str(model_config), "--output_dir", str(output_dir),
            "--train_batch_size", str(batch_size), "--gradient_accumulation_steps", "1", "--max_train_steps", str(steps),
            "--lr_warmup_steps", "0", "--checkpointing_steps", "100000", "--save_images_steps", "100000",
            "--save_model_steps", "100000", "--eval_batch_size", "1", "--ddpm_num_inference_steps", "1"]


def reference_command(script: Path, images: Path, model_config: Path, output_dir: Path, steps: int,
                      batch_size: int, resolution: int) -> list[str]:
    epochs = steps * batch_size // NUM_IMAGES
    return [sys.executable, str(script), "--train_data_dir", str(images),
            "--model_config_name_or_path", str(model_config), "--output_dir", str(output_dir),
            "--resolution", str(resolution), "--train_batch_size", str(batch_size),
            "--gradient_accumulation_steps", "1", "--num_epochs", str(epochs), "--lr_warmup_steps", "0",
            "--use_ema", "--mixed_precision", "bf16", "--checkpointing_steps", "100000",
            "--save_images_epochs", "100000", "--save_model_epochs", "100000", "--eval_batch_size", "1",
            "--ddpm_num_inference_steps", "1", "--dataloader_num_workers", "0", "--center_crop", "--random_flip"]


def timed_run(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:2])} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference_script", type=Path, required=True,
                        help="diffusers' examples/unconditional_image_generation/train_unconditional.py")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper128")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if NUM_IMAGES % args.batch_size:
        raise SystemExit(f"--batch_size must divide {NUM_IMAGES}")

    sys.path.insert(0, str(Path(__file__).parent))
    from dataloader_speed import write_test_images
    from diffusers import UNet2DModel

    resolution = build_model(args.preset).config.sample_size
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        images = write_test_images(scratch / "images", NUM_IMAGES)["JPEG"]
        model_config = scratch / "unet"
        UNet2DModel.from_config(dict(build_model(args.preset).config)).save_config(model_config)
        for name in ("diffusers example", "lsun_ddpm"):
            seconds = {}
            for steps in (2, 6):
                output_dir = scratch / f"{name.replace(' ', '-')}-{steps}"
                if name == "lsun_ddpm":
                    command = project_command(images, model_config, output_dir, steps, args.batch_size)
                else:
                    command = reference_command(args.reference_script.resolve(), images, model_config, output_dir,
                                                steps, args.batch_size, resolution)
                seconds[steps] = timed_run(command, scratch)
                print(f"{name}: {steps} steps in {seconds[steps]:.1f} s", file=sys.stderr, flush=True)
            results[name] = {"seconds_2_steps": seconds[2], "seconds_6_steps": seconds[6],
                             "images_per_second": 4 * args.batch_size / (seconds[6] - seconds[2])}
    reference = results["diffusers example"]
    print(f"{args.preset}, micro-batch {args.batch_size}, {NUM_IMAGES} 256-px JPEGs, one process")
    print("| script | 2 steps s | 6 steps s | images/s (4 steps ÷ difference) | × example |\n|---|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['seconds_2_steps']:.1f} | {row['seconds_6_steps']:.1f} | "
              f"{row['images_per_second']:.2f} | {row['images_per_second'] / reference['images_per_second']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
