"""What training uses when the user leaves precision, memory format and compilation unset: what was
measured fastest on the device (docs/performance.md); anything the user sets wins."""

from __future__ import annotations

import os

import torch

from ..hardware import fast_precision_available

# Unset --torch_compile compiles a CUDA run with at least this many micro-batches (forward + backward
# passes) to train: compiling paper128 takes minutes, and a shorter run (a test, a smoke run) would spend
# more time compiling than it saves. On a CPU it is never on by default: there the compiled step was
# measured no faster than the eager one, after minutes of compiling (docs/performance.md).
COMPILE_BREAK_EVEN_MICRO_BATCHES = 2000


def default_mixed_precision(device: torch.device) -> str:
    """The precision of a run whose --mixed_precision was not given.

    accelerate's own setting (`accelerate config`, `accelerate launch
    --mixed_precision`) arrives as ACCELERATE_MIXED_PRECISION; bf16 or fp16
    there is the user's choice and is kept. Its "no" is also what accelerate
    writes when nobody chose anything, so it cannot mean "fp32 on purpose":
    then bf16 where `device` runs it fast, fp32 elsewhere. `--mixed_precision
    no` trains in fp32 whatever the device.
    """
    from_accelerate = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if from_accelerate != "no":
        return from_accelerate
    return "bf16" if fast_precision_available(device) else "no"


def default_channels_last(mixed_precision: str) -> bool:
    """channels_last unless the user chose: on with bf16 (measured faster on a CPU with AMX, docs/performance.md;
    GPU tensor cores take NHWC convolutions), off in fp32, where it was not measured to help."""
    return mixed_precision == "bf16"


def default_torch_compile(device: torch.device, micro_batches: int | None) -> bool:
    """Compile where it was found to repay its compile time: a CUDA run of at least
    `COMPILE_BREAK_EVEN_MICRO_BATCHES`; never a CPU run, nor a run of unknown length."""
    return device.type == "cuda" and micro_batches is not None and micro_batches >= COMPILE_BREAK_EVEN_MICRO_BATCHES
