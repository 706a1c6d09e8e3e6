"""What this machine runs fast: bf16 autocast, torch.compile in place, and host memory kept for reuse.

Training, sampling, evaluation and the Space ask the same questions of the
device; the answers are here, once.
"""

from __future__ import annotations

import ctypes.util
import os
import warnings

import torch

# The modes torch.compile takes (`torch._inductor.list_mode_options()`).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16: bf16 autocast is then several times faster than fp32 on the CPU."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def fast_precision_available(device: torch.device) -> bool:
    """Whether bf16 autocast is fast on `device`: a CUDA GPU with bf16 support, or a CPU with AMX/AVX-512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def compile_in_place(module: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """`module.compile(mode=mode)`: torch.compile of its forward, in place, and return it.

    In place rather than `torch.compile(module)`, whose wrapper prefixes every
    key of a state dict with `_orig_mod.`: the module keeps its class and its
    parameter names, so checkpoints, EMA and exported pipelines are the same
    whether or not it was compiled, and a compiled run resumes an uncompiled
    one's checkpoint and vice versa. Compilation itself happens at the first
    call.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if not is_compiled(module):
        # diffusers' up/downsampling blocks call an lru_cache'd version check; dynamo traces through it and
        # warns once per block that this "could" be wrong. The check is a constant: nothing to act on.
        warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`-wrapped",
                                category=UserWarning)
        module.compile(mode=mode)
    return module


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module.compile()` was called on it (its calls go through torch.compile)."""
    return getattr(module, "_compiled_call_impl", None) is not None


# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Blocks up to this size come from the heap, not from a fresh mmap. An activation of paper128 at
# micro-batch 8 is 32-64 MiB; glibc takes 1 GiB, and glibc versions that refuse it take 32 MiB.
KEPT_BLOCK_BYTES = (1 << 30, 32 << 20)
# The user's own malloc settings: then nothing here is changed.
MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                   "GLIBC_TUNABLES", "LD_PRELOAD")


def keep_freed_host_memory(device: torch.device, libc: ctypes.CDLL | None = None) -> bool:
    """On a CPU with glibc's malloc, keep freed blocks for reuse instead of handing them back to the system.

    A training step on a CPU allocates and frees gigabytes of activations (a
    sampling step at batch 16, hundreds of MiB).
    glibc serves every block of 32 MiB or more with its own mmap, unmaps it
    on free, and returns the top of the heap beyond 128 KiB (M_TRIM_THRESHOLD):
    each step the kernel then maps and zeroes the same memory again, page by
    page. Raising both thresholds (what PyTorch's CPU tuning guide gets from
    jemalloc or tcmalloc, without a library to install) made training and
    sampling steps faster for a little more peak memory (docs/performance.md,
    "Host memory"). Not on a GPU, whose activations live in CUDA's
    caching allocator, and not where the user set malloc up (MALLOC_*,
    GLIBC_TUNABLES, LD_PRELOAD of another allocator). Returns whether it applied.
    """
    if device.type != "cpu" or any(os.environ.get(name) for name in MALLOC_SETTINGS):
        return False
    libc = libc or glibc()
    if libc is None:
        return False
    if not any(libc.mallopt(M_MMAP_THRESHOLD, size) for size in KEPT_BLOCK_BYTES):
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, -1))  # -1: never trim (mallopt(3))


def glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (musl, macOS and Windows have no mallopt of this kind)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this process has held (for the benchmarks): on CUDA the caching allocator's peak, else the
    resident set's high-water mark, VmHWM. Not `ru_maxrss`: an exec'd process inherits its parent's, so each
    setting measured in a fresh process would report the larger of its own peak and its launcher's."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:  # not Linux
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
