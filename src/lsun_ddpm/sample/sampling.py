"""Sampling from a trained U-Net: scheduler choice, reproducible seeds, fast precision, grids."""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel, UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from ..errors import InputError
from ..hardware import compile_in_place, fast_precision_available
from .loading import student_steps
from ..pipelines.ddpm_interpolation import scheduler_model_output

# Clip every x₀ estimate to [-1, 1], as ADM does (`clip_denoised`) and as the
# DDPM/DDIM schedulers do through `clip_sample`: dynamic thresholding with a
# maximum of 1 is exactly that clipping for the multistep solvers.
CLIP_X0 = {"thresholding": True, "sample_max_value": 1.0}
# name → (scheduler class, extra config, default number of steps)
SCHEDULERS: dict[str, tuple[type, dict, int]] = {
    "ddpm": (DDPMScheduler, {}, 1000),  # the paper's ancestral sampler
    "ddim": (DDIMScheduler, {}, 50),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, **CLIP_X0}, 25),
    "unipc": (UniPCMultistepScheduler, {**CLIP_X0}, 25),
}
DEFAULT_SCHEDULER = "dpmsolver++"


def make_scheduler(name: str, config: dict):
    """A fresh scheduler `name` built from the model's DDPM config (`from_config`).

    "trailing" spacing: respaced schedules start at the noisiest step t = T-1,
    as ADM's do; diffusers' default "leading" never visits it.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls, extra, _ = SCHEDULERS[name]
    return cls.from_config(config, timestep_spacing="trailing", **extra)


@contextlib.contextmanager
def inference_precision(unet: UNet2DModel, enabled: bool) -> Iterator[None]:
    """bf16 autocast + channels_last when `enabled` and the hardware runs bf16 fast; fp32 otherwise.

    The latents and the scheduler's arithmetic stay fp32 either way.
    """
    device = unet.device
    if not (enabled and fast_precision_available(device)):
        yield
        return
    unet.to(memory_format=torch.channels_last)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        unet.to(memory_format=torch.contiguous_format)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def launched_process():
    """accelerate's state of this process: its index, the process count and its device under `accelerate
    launch`; one process otherwise. `PartialState` told ACCELERATE_USE_CPU, as an `Accelerator` tells it:
    without it, processes launched on CPUs would each take themselves for the only one."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def this_process_share(num_items: int) -> range:
    """The items of `range(num_items)` this process does: under `accelerate launch`, its contiguous share
    (accelerate's `split_between_processes`, so gathering the shares in process order keeps the order);
    otherwise all of them."""
    with launched_process().split_between_processes(list(range(num_items))) as share:
        return range(share[0], share[-1] + 1) if share else range(0)


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a run seeded with `seed` (independent streams per image)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@dataclass
class SamplingPlan:
    scheduler: str = DEFAULT_SCHEDULER
    num_inference_steps: int | None = None  # default: the scheduler's (25 for dpmsolver++, 1000 for ddpm)
    batch_size: int = 16
    bf16: bool = True
    torch_compile: bool = False  # compile the U-Net's forward first (minutes; no faster on a CPU)
    torch_compile_mode: str = "default"

    @property
    def steps(self) -> int:
        return self.num_inference_steps or SCHEDULERS[self.scheduler][2]


STUDENT_SCHEDULER = "ddim"  # what a distilled student samples with: deterministic DDIM on its own grid


def choose_sampler(model: str, scheduler: str | None, num_inference_steps: int | None) -> tuple[str, int | None]:
    """The sampler and step count for `model`: those asked for, else a distilled student's own (DDIM at the
    N steps it was distilled for), else DPM-Solver++ at its default. A student asked for another sampler or
    step count is told what that does: it samples timesteps the student was never trained at."""
    steps = student_steps(model)
    if steps is None:
        return scheduler or DEFAULT_SCHEDULER, num_inference_steps
    chosen = scheduler or STUDENT_SCHEDULER, num_inference_steps or steps
    if chosen != (STUDENT_SCHEDULER, steps):
        print(f"note: {model} is a student distilled to sample with {STUDENT_SCHEDULER} in {steps} steps; "
              f"{chosen[0]} with {chosen[1]} steps visits timesteps it was not trained at, which usually makes "
              "worse images, not better", flush=True)
    return chosen


def check_inference_steps(plan: SamplingPlan, scheduler_config: dict) -> None:
    """An InputError, before any weights are loaded, for more steps than the model has timesteps.

    diffusers' DDPM and DDIM schedulers refuse them only once sampling starts;
    the multistep solvers would step through repeated timesteps.
    """
    num_train_timesteps = scheduler_config.get("num_train_timesteps", 1000)
    if plan.steps > num_train_timesteps:
        raise InputError(f"{plan.steps} inference steps ({plan.scheduler}) are more than the {num_train_timesteps} "
                         f"timesteps the model was trained with: give --num_inference_steps {num_train_timesteps} "
                         "or fewer")


@torch.no_grad()
def denoise(unet: UNet2DModel, scheduler, noise: torch.Tensor, num_inference_steps: int,
            generators: list[torch.Generator], on_step: Callable[[], None] = lambda: None) -> torch.Tensor:
    """Run `scheduler`'s reverse process from `noise` (x_T) to x₀ in [-1, 1].

    Works for any diffusers scheduler (it applies `init_noise_sigma` and
    `scale_model_input`, which `DDPMPipeline` skips), and for a learned
    variance: DDPM steps use the predicted v, the others ε alone. Stochastic
    steps draw their noise from each image's own generator.
    """
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    step_options = inspect.signature(scheduler.step).parameters
    extra = {"generator": generators} if "generator" in step_options else {}
    if "use_clipped_model_output" in step_options:
        extra["use_clipped_model_output"] = True  # DDIM: ε re-derived from the clipped x₀, as ADM does
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        model_output = scheduler_model_output(scheduler, unet(model_input, t).sample.float(), latents)
        latents = scheduler.step(model_output, t, latents, **extra).prev_sample
        on_step()
    return latents.clamp(-1, 1)


def progress_bar(description: str, enabled: bool = True, leave: bool = True) -> Callable[[int], Callable[[], None]]:
    """A `progress` for `generate`: given the total number of U-Net steps, a tqdm bar and its step function."""
    from tqdm.auto import tqdm

    def start(total: int) -> Callable[[], None]:
        bar = tqdm(total=total, desc=description, unit="step", dynamic_ncols=True, disable=not enabled, leave=leave)
        return lambda: bar.update(1)

    return start


def generate(unet: UNet2DModel, scheduler_config: dict, num_images: int, seed: int = 0,
             plan: SamplingPlan | None = None, progress: Callable[[int], Callable[[], None]] | None = None,
             first_index: int = 0) -> list[Image.Image]:
    """`num_images` samples; image i depends only on (seed, first_index + i), not on the batch size."""
    plan = plan or SamplingPlan()
    device = unet.device
    shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    on_step = progress(math.ceil(num_images / plan.batch_size) * plan.steps) if progress else (lambda: None)
    images = []
    if plan.torch_compile:
        compile_in_place(unet, plan.torch_compile_mode)  # in place: the caller's module stays compiled
    with inference_precision(unet, plan.bf16):
        for start in range(0, num_images, plan.batch_size):
            indices = range(first_index + start, first_index + min(start + plan.batch_size, num_images))
            generators = [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]
            noise = torch.cat([randn_tensor(shape, generator=g) for g in generators]).to(device)
            x0 = denoise(unet, make_scheduler(plan.scheduler, scheduler_config), noise, plan.steps, generators, on_step)
            images += to_pil(x0)
    return images


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] → PIL images."""
    array = ((x.float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]
