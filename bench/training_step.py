"""Images/s, peak memory, FLOPs and model FLOPs utilisation of one training step, per precision setting,
against a plain diffusers-style loop measured in the same run.

    python bench/training_step.py --json bench-training-step.json            # this machine, paper128, micro-batch 8
    python bench/training_step.py --batch_sizes 8 16 32 64 --settings bf16+channels_last bf16+channels_last+compile

Settings (each in a fresh process, so that its peak memory and its compile caches are its own):

- `diffusers-baseline`: what diffusers' `train_unconditional.py` example does: a
  stock `UNet2DModel` of the same config, fp32, NCHW, images decoded from JPEG
  and transformed with torchvision every step, torch's default (foreach) AdamW,
  diffusers' `EMAModel`, `loss.item()` every step.
- `fp32`, `bf16`, `bf16+channels_last`, `bf16+channels_last+compile`: this
  project's step (`training.train_micro_batch`, `apply_or_skip_step`, the EMA,
  one host sync per step) on a prepared dataset (`lsun-ddpm prepare`: no
  decoding), under an Accelerator with that precision, and on a CPU with freed
  host memory kept for reuse as `train()` keeps it
  (`performance.keep_freed_host_memory`; `--glibc_malloc_defaults` times them
  without it). The baseline runs under glibc's defaults, as the example does.

The first step of each setting is left out of the rate (kernel warm-up, Adam's
moments allocated; for `+compile` the compilation, reported as its own
column). FLOPs per step come from torch's FlopCounterMode (a multiply-add is 2
FLOPs) on one forward and backward; utilisation = achieved FLOP/s ÷ the
device's peak: on CUDA the datasheet's dense bf16/fp32 peak for known GPUs
(`--peak_tflops` for others); on a CPU the best rate of a large bf16 / fp32
matmul measured in this run (the practical peak of the cores torch uses).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lsun_ddpm.model.unet import PRESETS, build_model
from lsun_ddpm.hardware import keep_freed_host_memory, peak_memory_bytes

MIB = 2**20
SETTINGS = ("diffusers-baseline", "fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile")
# Dense (no sparsity) peaks from the vendors' datasheets, TFLOP/s: (bf16, fp32 without TF32).
GPU_PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5)}


# ---------------------------------------------------------------- one setting, in this process


def measure(setting: str, preset: str, batch_size: int, steps: int, images: Path, keep_freed: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    kept = setting != "diffusers-baseline" and keep_freed and keep_freed_host_memory(device)
    step, model = (baseline_step if setting == "diffusers-baseline" else project_step)(setting, preset, batch_size,
                                                                                      device, images)
    baseline_memory = peak_memory_bytes(device)
    timings = []
    for _ in range(steps + 1):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        timings.append(time.perf_counter() - started)
    seconds = statistics.median(timings[1:])
    return {"setting": setting, "preset": preset, "batch_size": batch_size, "device": device_name(device),
            "seconds_per_step": seconds, "images_per_second": batch_size / seconds,
            "first_step_seconds": timings[0], "step_timings": timings, "host_memory_kept": kept,
            "peak_mib": peak_memory_bytes(device) / MIB, "peak_above_model_mib": (peak_memory_bytes(device) - baseline_memory) / MIB,
            "parameters": sum(p.numel() for p in model.parameters())}


def project_step(setting: str, preset: str, batch_size: int, device: torch.device, images: Path):
    """This project's training step on a prepared dataset, as `training.train` runs it."""
    from accelerate import Accelerator

    from lsun_ddpm.model import diffusion
    from lsun_ddpm.data.preprocessing import ImagePreprocessor, to_model_input
    from lsun_ddpm.data.datasets import make_dataloader
    from lsun_ddpm.train.ema import make_ema
    from lsun_ddpm.hardware import compile_in_place
    from lsun_ddpm.data.prepared import load_prepared_images
    from lsun_ddpm.train.step_stats import StepStats
    from lsun_ddpm.train.loop import apply_or_skip_step, train_micro_batch
    from lsun_ddpm.train.setup import make_optimizer

    bf16, channels_last, compiled = "bf16" in setting, "channels_last" in setting, "compile" in setting
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=device.type == "cpu")
    model = build_model(preset)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if compiled:
        compile_in_place(model)
    preprocess = ImagePreprocessor(model.config.sample_size, True, True)
    dataloader = accelerator.prepare(make_dataloader(load_prepared_images(str(images / "prepared"), preprocess, 0),
                                                     batch_size, 0))
    optimizer = make_optimizer(model, _Options(), accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    unet = accelerator.unwrap_model(model)
    ema = make_ema(unet)  # the paper's decay, ramped as training ramps it
    objective = diffusion.Objective(diffusion.make_noise_scheduler())
    stats = StepStats(accelerator.device)
    batches = _forever(dataloader)

    def step():
        clean_images = to_model_input(next(batches)["pixels"], memory_format)
        noise = torch.randn_like(clean_images)
        timesteps = diffusion.sample_timesteps(clean_images.shape[0], 1000, clean_images.device)
        losses, grad_norm = train_micro_batch(accelerator, model, objective, clean_images, noise, timesteps, 1.0)
        stats.add(losses, diffusion.timestep_quarter(timesteps, 1000))
        outcome = stats.finish_step(accelerator, 1000, grad_norm, [])
        apply_or_skip_step(accelerator, optimizer, lr_scheduler, ema, unet, outcome.finite)

    return step, unet


class _Options:
    """The optimizer options of training's defaults (the paper's Adam)."""

    learning_rate, adam_beta1, adam_beta2, adam_weight_decay, adam_epsilon = 3e-4, 0.9, 0.999, 0.0, 1e-8


def baseline_step(setting: str, preset: str, batch_size: int, device: torch.device, images: Path):
    """The loop of diffusers' example script, reduced to one step: stock model, fp32, decoded images."""
    import torch.nn.functional as F
    from datasets import load_dataset
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel
    from torchvision import transforms

    model = UNet2DModel.from_config(dict(build_model(preset).config)).to(device).train()
    resolution = model.config.sample_size
    augment = transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize([0.5], [0.5]),
    ])
    dataset = load_dataset("imagefolder", data_dir=str(images / "jpeg"), split="train")
    dataset.set_transform(lambda batch: {"input": [augment(image.convert("RGB")) for image in batch["image"]]})
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    batches = _forever(dataloader)

    def step():
        clean_images = next(batches)["input"].to(device)
        noise = torch.randn(clean_images.shape, device=device)
        timesteps = torch.randint(0, 1000, (clean_images.shape[0],), device=device).long()
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        loss = F.mse_loss(model(noisy_images, timesteps).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        loss.detach().item()  # the example logs the loss of every step

    return step, model


def _forever(dataloader):
    while True:
        yield from dataloader


# ---------------------------------------------------------------- FLOPs and the device's peak


def training_flops(preset: str, batch_size: int) -> int:
    """FLOPs of one forward and backward pass of `preset` at `batch_size` (FlopCounterMode, on the meta device:
    the count depends on shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(preset)
        size = model.config.sample_size
        x = torch.randn(batch_size, 3, size, size)
        t = torch.randint(0, 1000, (batch_size,))
    with FlopCounterMode(display=False) as counter:
        model(x, t).sample.float().pow(2).mean().backward()
    return counter.get_total_flops()


@functools.cache
def peak_tflops(device: torch.device, bf16: bool, override: float | None) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from) for MFU."""
    if override:
        return override, "given with --peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16_peak, fp32_peak) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (bf16_peak if bf16 else fp32_peak), f"{key} datasheet, dense {'bf16' if bf16 else 'fp32'}"
        return float("nan"), f"unknown GPU {name}: give --peak_tflops"
    return measured_matmul_tflops(torch.bfloat16 if bf16 else torch.float32), \
        f"best {'bf16' if bf16 else 'fp32'} 4096x4096 matmul measured here"


def measured_matmul_tflops(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e12


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


# ---------------------------------------------------------------- helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def write_images(folder: Path, count: int, resolution: int) -> None:
    """`count` 256-px JPEGs cut from scikit-image's photos (LSUN's shorter side is 256), and the prepared copy
    of them that the project's settings read."""
    sys.path.insert(0, str(Path(__file__).parent))
    from dataloader_speed import write_test_images

    from lsun_ddpm.data.preprocessing import ImagePreprocessor
    from lsun_ddpm.data.prepare import SourceOptions, prepare_dataset

    folders = write_test_images(folder, count)
    prepare_dataset(SourceOptions(train_data_dir=str(folders["JPEG"])), ImagePreprocessor(resolution, center_crop=True),
                    str(folder / "prepared"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper128")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting, after the first")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--peak_tflops", type=float, help="the device's peak, for utilisation (default: see above)")
    parser.add_argument("--glibc_malloc_defaults", action="store_true",
                        help="time this project's settings under glibc's malloc defaults, as the baseline runs")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: "setting,batch_size,images folder"
    args = parser.parse_args()
    if args.one:
        setting, batch_size, images = args.one.split(",", 2)
        print(json.dumps(measure(setting, args.preset, int(batch_size), args.steps, Path(images),
                                 not args.glibc_malloc_defaults)))
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolution = build_model(args.preset).config.sample_size
    rows = []
    for bf16 in {"bf16" in setting for setting in args.settings}:  # measured once, before the steps
        peak_tflops(device, bf16, args.peak_tflops)
    with tempfile.TemporaryDirectory() as folder:
        write_images(Path(folder), max(args.num_images, 2 * max(args.batch_sizes) * (args.steps + 1)), resolution)
        for batch_size in args.batch_sizes:
            flops = training_flops(args.preset, batch_size)
            for setting in args.settings:
                row = measure_in_child(args, setting, batch_size, folder)
                if "error" not in row:
                    peak, source = peak_tflops(device, "bf16" in setting, args.peak_tflops)
                    row |= {"flops_per_step": flops, "peak_tflops": peak, "peak_source": source,
                            "mfu": flops / row["seconds_per_step"] / (peak * 1e12)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if args.json:  # after every row: a run stopped at a time limit keeps what it measured
                    Path(args.json).write_text(json.dumps(rows, indent=2))
    print_table(rows)


def measure_in_child(args: argparse.Namespace, setting: str, batch_size: int, folder: str) -> dict:
    """One setting in a fresh process; a setting that fails (out of memory, say) is reported, and the rest run."""
    command = [sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps),
               "--one", f"{setting},{batch_size},{folder}"]
    command += ["--glibc_malloc_defaults"] if args.glibc_malloc_defaults else []
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode == 0:
        return json.loads(child.stdout)
    print(child.stderr[-4000:], file=sys.stderr)
    last_line = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
    return {"setting": setting, "batch_size": batch_size, "error": last_line}


def print_table(rows: list[dict]) -> None:
    for row in rows:
        if "error" in row:
            print(f"{row['setting']} at micro-batch {row['batch_size']} failed: {row['error']}")
    rows = [row for row in rows if "error" not in row]
    if not rows:
        return
    first = rows[0]
    print(f"{first['preset']} ({first['parameters'] / 1e6:.1f} M parameters), {first['device']}, torch {torch.__version__}")
    print("| setting | micro-batch | freed host memory kept | s/step | images/s | × baseline | first step (compile) s | "
          "peak memory MiB | TFLOP/step | achieved TFLOP/s | peak used | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    baselines = {row["batch_size"]: row["images_per_second"] for row in rows if row["setting"] == "diffusers-baseline"}
    for row in rows:
        baseline = baselines.get(row["batch_size"])
        ratio = f"{row['images_per_second'] / baseline:.2f}" if baseline else "-"
        achieved = row["flops_per_step"] / row["seconds_per_step"] / 1e12
        kept = "yes" if row["host_memory_kept"] else "no"
        print(f"| {row['setting']} | {row['batch_size']} | {kept} | {row['seconds_per_step']:.2f} | "
              f"{row['images_per_second']:.2f} | {ratio} | {row['first_step_seconds']:.1f} | {row['peak_mib']:.0f} | "
              f"{row['flops_per_step'] / 1e12:.2f} | {achieved:.2f} | {row['peak_tflops']:.1f} ({row['peak_source']}) | "
              f"{row['mfu']:.1%} |")


if __name__ == "__main__":
    main()
