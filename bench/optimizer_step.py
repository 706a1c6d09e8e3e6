"""Seconds per AdamW step over a preset's parameters: torch's foreach loop against its fused kernel.

    python bench/optimizer_step.py --preset paper128

Training uses the fused kernel where the device has one (see
`training.make_optimizer`); this measures what that buys on this machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from lsun_ddpm.model.unet import PRESETS, build_model


def seconds_per_step(model: torch.nn.Module, implementation: str, repeats: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, **{implementation: True})
    optimizer.step()  # allocates Adam's moments
    timings = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper128")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.preset).to(device)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    print(f"{args.preset} on {device}: | implementation | s/step |")
    for implementation in ("foreach", "fused"):
        print(f"| {implementation} | {seconds_per_step(model, implementation, args.repeats):.3f} |")


if __name__ == "__main__":
    main()
