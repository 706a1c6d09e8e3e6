"""The fast defaults (bf16, channels_last, torch.compile) and what compiling must not change."""

from __future__ import annotations

import pytest
import torch

from lsun_ddpm import cli
from lsun_ddpm import hardware as machine
from lsun_ddpm.train import fast_defaults, setup
from lsun_ddpm.train.options import TrainingConfig
from lsun_ddpm.train.fast_defaults import (COMPILE_BREAK_EVEN_MICRO_BATCHES, default_mixed_precision,
                                           default_torch_compile)
from lsun_ddpm.hardware import compile_in_place, is_compiled

from conftest import random_tiny_unet

CPU = torch.device("cpu")


@pytest.fixture
def hardware(monkeypatch):
    """Set whether the device "runs bf16 fast", and start with accelerate's variable unset."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)

    def set_fast(fast: bool):
        monkeypatch.setattr(fast_defaults, "fast_precision_available", lambda device: fast)

    return set_fast


def test_unset_precision_is_bf16_on_fast_hardware_also_when_accelerate_defaulted_to_no(hardware, monkeypatch):
    hardware(True)
    assert default_mixed_precision(CPU) == "bf16"
    # `accelerate launch` without a config writes "no" for the precision nobody chose
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert default_mixed_precision(CPU) == "bf16"


def test_accelerates_bf16_or_fp16_is_kept_and_slow_hardware_trains_in_fp32(hardware, monkeypatch):
    hardware(False)
    assert default_mixed_precision(CPU) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert default_mixed_precision(CPU) == "fp16"
    hardware(True)
    assert default_mixed_precision(CPU) == "fp16"


@pytest.mark.parametrize("given, fast, expected", [
    ({}, True, ("bf16", True)),
    ({}, False, ("no", False)),
    ({"mixed_precision": "no"}, True, ("no", False)),  # the user's fp32 stays fp32, and so without channels_last
    ({"channels_last": False}, True, ("bf16", False)),
    ({"mixed_precision": "bf16", "channels_last": True}, False, ("bf16", True)),
])
def test_training_fills_in_only_what_the_user_left_unset(hardware, given, fast, expected):
    hardware(fast)
    config = TrainingConfig(train_data_dir="images", **given)
    setup.choose_precision(config)
    assert (config.mixed_precision, config.channels_last) == expected


def test_compile_is_on_by_default_only_for_cuda_runs_long_enough_to_repay_it():
    cuda = torch.device("cuda")
    assert not default_torch_compile(cuda, None)  # unknown length
    assert not default_torch_compile(cuda, COMPILE_BREAK_EVEN_MICRO_BATCHES - 1)
    assert default_torch_compile(cuda, COMPILE_BREAK_EVEN_MICRO_BATCHES)
    assert not default_torch_compile(CPU, 10**9)  # measured slower on the CPU, however long the run


def test_compiling_in_place_keeps_the_class_and_every_parameter_name():
    """What checkpoints, the EMA and exports see: a compiled U-Net is the same module with the same keys
    (torch.compile's wrapper would rename every key `_orig_mod.<name>`)."""
    unet = random_tiny_unet()
    names, parameters = list(unet.state_dict()), list(unet.parameters())
    assert compile_in_place(unet) is unet and is_compiled(unet)
    assert type(unet).__name__ == "ADMUNet2DModel"
    assert list(unet.state_dict()) == names
    assert all(a is b for a, b in zip(unet.parameters(), parameters))
    with pytest.raises(ValueError, match="max-autotune"):
        compile_in_place(random_tiny_unet(), "fastest")


@pytest.mark.slow
@pytest.mark.compiles
def test_a_compiled_training_step_agrees_with_the_eager_one():
    """Forward, backward and one Adam step of the same tiny U-Net, compiled and not, on the same batch."""
    eager, compiled = random_tiny_unet(), random_tiny_unet()
    compiled.load_state_dict(eager.state_dict())
    compile_in_place(compiled)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=generator)
    t = torch.tensor([0, 250, 500, 999])
    target = torch.randn(4, 3, 16, 16, generator=generator)
    results = []
    for unet in (eager, compiled):
        unet.train()
        torch.manual_seed(1)  # the same dropout masks
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
        output = unet(x, t).sample
        (output - target).pow(2).mean().backward()
        gradients = [p.grad.clone() for p in unet.parameters()]
        optimizer.step()
        results.append((output.detach(), gradients, [p.detach().clone() for p in unet.parameters()]))
    (out_e, grads_e, weights_e), (out_c, grads_c, weights_c) = results
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e, rtol=1e-3, atol=1e-6)
    # Adam's first step moves each weight by ±lr (sign of its gradient): within 1e-5 of lr, unless a
    # gradient is so close to 0 that float rounding decides its sign
    moved_apart = sum(int(((w_c - w_e).abs() > 1e-4).sum()) for w_c, w_e in zip(weights_c, weights_e))
    assert moved_apart <= 0.001 * sum(w.numel() for w in weights_e)


# ---------------------------------------------------------------- host memory on a CPU run


class RecordingLibc:
    """A C library whose mallopt records its calls and accepts values up to `largest_mmap_threshold`."""

    def __init__(self, largest_mmap_threshold: int = 1 << 62):
        self.calls, self.largest = [], largest_mmap_threshold

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return int(parameter != -3 or value <= self.largest)


@pytest.fixture
def no_malloc_settings(monkeypatch):
    for name in machine.MALLOC_SETTINGS:
        monkeypatch.delenv(name, raising=False)


def test_a_cpu_run_raises_the_mmap_threshold_and_stops_trimming(no_malloc_settings):
    libc = RecordingLibc()
    assert machine.keep_freed_host_memory(CPU, libc)
    # mallopt(3): M_MMAP_THRESHOLD is -3, M_TRIM_THRESHOLD is -1, and a trim threshold of -1 disables trimming.
    assert libc.calls == [(-3, 1 << 30), (-1, -1)]


def test_a_glibc_that_refuses_1_gib_gets_its_documented_maximum(no_malloc_settings):
    libc = RecordingLibc(largest_mmap_threshold=32 << 20)
    assert machine.keep_freed_host_memory(CPU, libc)
    assert libc.calls == [(-3, 1 << 30), (-3, 32 << 20), (-1, -1)]


@pytest.mark.parametrize("setting", ["MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD"])
def test_the_users_malloc_settings_and_gpu_runs_are_left_alone(no_malloc_settings, monkeypatch, setting):
    libc = RecordingLibc()
    assert not machine.keep_freed_host_memory(torch.device("cuda"), libc)
    monkeypatch.setenv(setting, "libjemalloc.so.2" if setting == "LD_PRELOAD" else "1")
    assert not machine.keep_freed_host_memory(CPU, libc)
    assert libc.calls == []


HELD_AFTER_FREE = """
import ctypes, sys, torch
from lsun_ddpm import hardware as machine
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "kept":
    assert machine.keep_freed_host_memory(torch.device("cpu"))
block = torch.empty(100 << 20, dtype=torch.uint8).fill_(1)
del block
print(libc.mallinfo2().fordblks)
"""


@pytest.mark.skipif(machine.glibc() is None or not hasattr(machine.glibc(), "mallinfo2"),
                    reason="needs glibc 2.33 or newer")
def test_with_glibc_a_freed_100_mib_tensor_stays_in_the_heap_for_reuse(no_malloc_settings):
    """By default glibc unmaps the block on free; kept, the heap holds it as free space for the next step."""
    import subprocess
    import sys

    def free_bytes_after(mode: str) -> int:
        result = subprocess.run([sys.executable, "-c", HELD_AFTER_FREE, mode], capture_output=True, text=True,
                                check=True)
        return int(result.stdout.split()[-1])

    assert free_bytes_after("default") < 100 << 20 <= free_bytes_after("kept")


@pytest.mark.parametrize("command, keeps", [("sample", True), ("interpolate", True), ("neighbours", True),
                                            ("evaluate", True), ("prepare", False), ("push", False)])
def test_commands_that_run_a_network_keep_freed_host_memory_on_the_cpu(monkeypatch, command, keeps):
    kept = []
    monkeypatch.setattr(machine, "keep_freed_host_memory", kept.append)
    monkeypatch.setitem(cli.HANDLERS, command, lambda argv: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cli.main([command])
    assert kept == ([torch.device("cpu")] if keeps else [])


@pytest.mark.slow
def test_the_peak_memory_of_a_fresh_process_is_its_own_not_its_launchers(tmp_path):
    """The benchmarks measure each setting in a process they start: its peak must not be the launcher's.
    Here the launcher first holds 2 GiB; the child, which allocates nothing, stays far below that."""
    import subprocess
    import sys

    held = torch.ones(2**29)  # 2 GiB of float32, every page touched
    child = subprocess.run([sys.executable, "-c", "import torch\nfrom lsun_ddpm.hardware import "
                            "peak_memory_bytes\nprint(peak_memory_bytes(torch.device('cpu')))"],
                           capture_output=True, text=True, check=True)
    del held
    assert 50 * 2**20 < int(child.stdout) < 2**30
