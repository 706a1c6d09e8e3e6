"""Memory saved and time lost by --gradient_checkpointing, for one training step of a preset.

    python bench/gradient_checkpointing.py --preset paper128 --batch_size 8 --json bench-checkpointing.json

Each setting runs in a fresh process, so that its peak memory is its own: on
CUDA the peak of allocated memory (torch.cuda.max_memory_allocated), on a CPU
the peak resident set size of the process above what it held once the model
existed (the step's activations, gradients and Adam's moments: only the
activations differ between the two settings). Steps run as training runs them on the device: bf16 autocast and
channels_last where the device is fast at bf16, fp32 otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from lsun_ddpm.model.unet import PRESETS, build_model
from lsun_ddpm.hardware import fast_precision_available, peak_memory_bytes

MIB = 2**20


def measure(preset: str, batch_size: int, checkpointing: bool, steps: int) -> dict:
    """One setting, in this process: seconds per step (best of `steps` after a warm-up) and peak memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = fast_precision_available(device)
    torch.manual_seed(0)
    model = build_model(preset).to(device).train()
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    if checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    size = model.config.sample_size
    x = torch.randn(batch_size, 3, size, size, device=device)
    t = torch.randint(0, 1000, (batch_size,), device=device)
    if bf16:
        x = x.contiguous(memory_format=torch.channels_last)
    baseline = peak_memory_bytes(device)
    timings = []
    for _ in range(steps + 1):  # the first step warms up kernels and allocates Adam's moments
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, t).sample.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    return {"preset": preset, "batch_size": batch_size, "gradient_checkpointing": checkpointing,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
            "precision": "bf16 + channels_last" if bf16 else "fp32",
            "seconds_per_step": min(timings[1:]),
            "peak_mib": peak_memory_bytes(device) / MIB, "peak_above_model_mib": (peak_memory_bytes(device) - baseline) / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper128")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting, after one warm-up step")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)  # a child process's setting
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.preset, args.batch_size, args.one == "on", args.steps)))
        return
    rows = []
    for setting in ("off", "on"):
        command = [sys.executable, __file__, "--preset", args.preset, "--batch_size", str(args.batch_size),
                   "--steps", str(args.steps), "--one", setting]
        rows.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
    off, on = rows
    print(f"{args.preset}, micro-batch {args.batch_size}, {off['device']}, {off['precision']}")
    print("| gradient checkpointing | s/step | peak memory | of which the step (above the model) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {'on' if row['gradient_checkpointing'] else 'off'} | {row['seconds_per_step']:.2f} | "
              f"{row['peak_mib']:.0f} MiB | {row['peak_above_model_mib']:.0f} MiB |")
    saved = off["peak_above_model_mib"] - on["peak_above_model_mib"]
    print(f"checkpointing saves {saved:.0f} MiB ({saved / off['peak_above_model_mib']:.0%} of the step's memory) "
          f"for {on['seconds_per_step'] / off['seconds_per_step'] - 1:+.0%} time per step")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=2)


if __name__ == "__main__":
    main()
