"""Sampling from a trained U-Net: scheduler choice, reproducible seeds, fast precision, grids."""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel,
                       UniPCMultistepScheduler)
from diffusers.utils import make_image_grid
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageDraw, ImageFont

from .errors import InputError, ModelUnavailableError
from .layout import CHECKPOINT_PATTERN, CONFIG_FILE, MODEL_INDEX, SCHEDULER, UNET, WEIGHT_FOLDERS
from .performance import compile_in_place, fast_precision_available
from .pipelines.ddpm_interpolation import scheduler_model_output


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


MODEL_HINT = "pass a pipeline folder written by training or convert-adm, or a Hub repo id (USER/NAME)"


def looks_local(model: str) -> bool:
    """Whether `model` is written as a path rather than a Hub repo id (NAME or USER/NAME): absolute, starting
    with . or ~, or with more than one separator."""
    return os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1 or "\\" in model


def check_model_source(model: str) -> None:
    """A ModelUnavailableError that says what to pass instead, for a MODEL that is a local file or folder
    but no pipeline (a training checkpoint, say), or a path that does not exist; a Hub id is left to the Hub.

    A path is never looked up on the Hub: that would only add a connection error to the real problem.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if any((path / name).exists() for name in (MODEL_INDEX, UNET, SCHEDULER)):
            return  # a pipeline, or enough of one for the loader to name what is missing
        if CHECKPOINT_PATTERN.match(path.name) or (path / "optimizer.bin").is_file():
            raise ModelUnavailableError(
                f"{model} is a training checkpoint (the state training resumes from), not a pipeline folder: pass "
                f"its run folder, {path.parent}, whose unet/ holds the EMA weights of the last export "
                "(--weights raw: the raw ones)")
        raise ModelUnavailableError(f"{model} is a folder but no pipeline folder (it has no model_index.json): "
                                    f"{MODEL_HINT}")
    if path.exists():
        raise ModelUnavailableError(f"{model} is a file, not a pipeline folder: {MODEL_HINT}")
    if looks_local(model):
        raise ModelUnavailableError(f"{model}: no such folder; {MODEL_HINT}")


# ---------------------------------------------------------------- loading


def recorded_training_options(model: str) -> dict:
    """The training options a run recorded (`training_config.yaml`), from a folder or a Hub repo; {} if none.

    Only what a run says about itself is read here (its data, whether it kept
    an EMA), so unlike `run_folder.read_run_config` (which resumes runs) keys
    are not checked against this version's options, a Hub repo is read too, and
    the Space, which does not install `transformers`, can use it. A model
    without the file is taken as a plain pipeline.
    """
    import yaml

    path = Path(model) / CONFIG_FILE
    if not Path(model).is_dir():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, CONFIG_FILE))
        except Exception:  # no such file, no network, or not a repo id: nothing recorded
            return {}
    if not path.is_file():
        return {}
    values = yaml.safe_load(path.read_text())
    return values if isinstance(values, dict) else {}


def has_ema_weights(run_config: dict) -> bool:
    """False for a run trained with `--no_use_ema`: its `unet/` then holds the raw (training) weights."""
    return run_config.get("use_ema", True) is not False


def weights_subfolder(weights: str, has_ema: bool = True) -> str:
    """Where the `weights` ("ema" or "raw") of a run live; without an EMA both are the raw weights in `unet/`."""
    if weights not in WEIGHT_FOLDERS:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FOLDERS)}, got {weights!r}")
    return WEIGHT_FOLDERS[weights] if has_ema else WEIGHT_FOLDERS["ema"]


def load_unet(model: str, weights: str = "ema", has_ema: bool | None = None) -> UNet2DModel:
    """The EMA (`unet/`) or raw (`unet_raw/`) U-Net of a pipeline folder or Hub repo, from safetensors only.

    A run trained without EMA (`has_ema` False; by default read from the
    run's `training_config.yaml`) has only `unet/`, its raw weights.
    """
    check_model_source(model)
    has_ema = has_ema_weights(recorded_training_options(model)) if has_ema is None else has_ema
    subfolder = weights_subfolder(weights, has_ema)
    try:
        return UNet2DModel.from_pretrained(model, subfolder=subfolder, use_safetensors=True).eval()
    except (OSError, ValueError) as error:
        hint = " (runs of this project keep the non-EMA weights in unet_raw/)" if weights == "raw" else ""
        raise ModelUnavailableError(
            f"cannot load the {weights} weights from {model!r}/{subfolder}{hint}: {error}. MODEL is a pipeline "
            "folder written by training, or a Hub repo id (which needs network access, or HF_HUB_OFFLINE=1 and a "
            "cached copy)."
        ) from None


def load_scheduler_config(model: str) -> dict:
    check_model_source(model)
    try:
        return dict(DDPMScheduler.load_config(model, subfolder=SCHEDULER))
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(f"cannot load the scheduler of {model!r}: {error}") from None


def make_scheduler(name: str, config: dict):
    """A fresh scheduler `name` built from the model's DDPM config (`from_config`).

    "trailing" spacing: respaced schedules start at the noisiest step t = T-1,
    as ADM's do; diffusers' default "leading" never visits it.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls, extra, _ = SCHEDULERS[name]
    return cls.from_config(config, timestep_spacing="trailing", **extra)


# ---------------------------------------------------------------- precision


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


# ---------------------------------------------------------------- sampling


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


# ---------------------------------------------------------------- layout


def grid_shape(num_images: int) -> tuple[int, int]:
    """(rows, cols) of the squarest grid that holds exactly `num_images` (64 → 8×8)."""
    rows = int(math.isqrt(num_images))
    while num_images % rows:
        rows -= 1
    return rows, num_images // rows


def image_grid(images: list[Image.Image]) -> Image.Image:
    rows, cols = grid_shape(len(images))
    return make_image_grid(images, rows=rows, cols=cols)


def caption_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The font of every figure caption (PIL's built-in one: no font file is needed)."""
    return ImageFont.load_default()


def text_size(text: str, font=None) -> tuple[int, int]:
    """(width, height) in pixels of `text` drawn at (0, 0) with `font`: the extent of its ink box."""
    left, top, right, bottom = (font or caption_font()).getbbox(text)
    return right, bottom


def labelled_side_by_side(panels: list[tuple[str, Image.Image]], gap: int = 8, margin: int = 2) -> Image.Image:
    """Panels next to each other on white, each with a caption above it (the paper's Fig. 1).

    Each column is as wide as its panel or its caption, whichever is wider, so
    a caption is never cut and never runs into its neighbour's, however small
    the images.
    """
    font = caption_font()
    sizes = [text_size(label, font) for label, _ in panels]
    caption = max(height for _, height in sizes) + 2 * margin
    columns = [max(image.width, width + 2 * margin) for (_, image), (width, _) in zip(panels, sizes)]
    canvas = Image.new("RGB", (sum(columns) + gap * (len(panels) - 1),
                               max(image.height for _, image in panels) + caption), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for (label, image), column in zip(panels, columns):
        draw.text((x + margin, margin), label, fill="black", font=font)
        canvas.paste(image, (x, caption))
        x += column + gap
    return canvas
