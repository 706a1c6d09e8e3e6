"""Size, compute and training memory of the U-Net presets (device-independent figures).

    python bench/model_stats.py                 # all presets, micro-batch 8
    python bench/model_stats.py --preset paper128 --batch_size 16 --time

Prints, per preset: parameters; FLOPs of one forward pass per image (torch's
FlopCounterMode: a multiply-add counts as 2 FLOPs); the activations autograd
keeps for the backward pass at the given micro-batch, in fp32 and in bf16
autocast (measured with saved-tensor hooks, so it holds for any device); and
the fixed training state (weights, gradients, two Adam moments, EMA). With
--time it also times one CPU training step (fp32, bf16, bf16 + channels_last).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from lsun_ddpm.model.unet import ADMUNet2DModel, PRESETS, count_parameters

GIB = 2**30


def forward_flops(model: torch.nn.Module, size: int) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size), torch.tensor([500]))
    return counter.get_total_flops()


def saved_activation_bytes(model: torch.nn.Module, batch_size: int, size: int, bf16: bool) -> int:
    """Bytes of the tensors autograd saves for backward during one forward pass."""
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(batch_size, 3, size, size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x, torch.randint(0, 1000, (batch_size,))).sample.float().pow(2).mean().backward()
    return sum(seen.values())


def time_training_step(model, batch_size: int, size: int, bf16: bool, channels_last: bool, repeats: int = 2) -> float:
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch_size,))
    timings = []
    for _ in range(repeats + 1):  # the first step warms up kernels
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, t).sample.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - started)
    return min(timings[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), action="append")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--time", action="store_true", help="also time CPU training steps (slow for paper128)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, micro-batch {args.batch_size}")
    print("| preset | px | parameters | GFLOPs/forward/image | state (w+g+Adam+EMA) | activations fp32 | "
          "activations bf16 |" + (" step fp32 | step bf16 | step bf16+CL |" if args.time else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|---|" if args.time else ""))
    for name in args.preset or sorted(PRESETS):
        torch.manual_seed(0)
        model = ADMUNet2DModel.from_preset(name)
        size = model.config.sample_size
        params = count_parameters(model)
        state = params * 4 * 5  # fp32 weights, gradients, Adam m and v, EMA
        row = [name, str(size), f"{params / 1e6:.1f} M", f"{forward_flops(model, size) / 1e9:.1f}",
               f"{state / GIB:.2f} GiB",
               f"{saved_activation_bytes(model, args.batch_size, size, bf16=False) / GIB:.2f} GiB",
               f"{saved_activation_bytes(model, args.batch_size, size, bf16=True) / GIB:.2f} GiB"]
        model.zero_grad(set_to_none=True)
        if args.time:
            for bf16, channels_last in ((False, False), (True, False), (True, True)):
                seconds = time_training_step(model, args.batch_size, size, bf16, channels_last)
                row.append(f"{seconds:.2f} s")
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
