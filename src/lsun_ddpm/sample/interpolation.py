"""The paper's Fig. 2b from any pipeline folder: interpolation strips (one row per pair) and GIFs.

The interpolation itself is `pipelines/ddpm_interpolation.py` (importable as
`lsun_ddpm.pipelines.ddpm_interpolation`), the same file users load with
`custom_pipeline=`; this module only loads the model, reads pairs and lays out
the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from diffusers import DDPMScheduler

from ..errors import InputError
from ..pipelines.ddpm_interpolation import DDPMInterpolationPipeline, preprocess
from ..model.step_grids import trailing_grid
from .loading import load_scheduler_config, load_unet, student_steps
from .sampling import inference_precision, pick_device, to_pil

@dataclass
class Pair:
    """Two endpoints: seeds (ints) whose samples become the endpoints, or two images
    (paths, PIL images, or (3, H, W) tensors in [-1, 1] already preprocessed)."""

    a: str | int | Image.Image | torch.Tensor
    b: str | int | Image.Image | torch.Tensor


@dataclass
class InterpolatedPair:
    endpoints: tuple[Image.Image, Image.Image]
    frames: list[Image.Image]
    noise_level: int


DEFAULT_NOISE_LEVEL = 500  # t; an integer, or "auto"
DEFAULT_STEPS = 50  # denoising steps from t


@dataclass(frozen=True)
class InterpolationSteps:
    t: int | str  # the noise level, or "auto" (chosen per pair)
    steps: int  # denoising steps from t
    endpoint_steps: int  # steps that sample an endpoint from a seed, from T − 1


def choose_interpolation_steps(model: str, t: int | str | None, num_inference_steps: int | None,
                               num_train_timesteps: int, default_t: int | str = DEFAULT_NOISE_LEVEL,
                               default_steps: int = DEFAULT_STEPS) -> InterpolationSteps:
    """What was asked; where not: `default_t` and `default_steps`, or for a distilled student of N steps the
    point of its grid nearest 500 and its own steps from there (N for an endpoint). A student given a t or a
    step count off its grid is told what that does."""
    student = student_steps(model)
    if student is None:
        steps = num_inference_steps or default_steps
        return InterpolationSteps(default_t if t is None else t, steps, steps)
    grid = trailing_grid(student, num_train_timesteps)
    if t is None:
        t = min(grid, key=lambda point: abs(point - DEFAULT_NOISE_LEVEL))
    own_steps = sum(point <= t for point in grid) if t in grid else None
    steps = num_inference_steps or own_steps or student
    if own_steps is None or steps != own_steps:
        print(f"note: {model} is a student distilled for the {student} timesteps {grid}; t = {t} with {steps} "
              "steps from it visits timesteps it was not trained at, which usually makes worse images", flush=True)
    return InterpolationSteps(t, steps, student)


def load_interpolation_pipeline(model: str, weights: str = "ema", device: torch.device | None = None,
                                has_ema: bool | None = None):
    """The interpolation pipeline on `model`'s EMA or raw U-Net (`has_ema`: see `sampling.load_unet`)."""
    unet = load_unet(model, weights, has_ema).to(device or pick_device())
    scheduler = DDPMScheduler.from_config(load_scheduler_config(model))
    return DDPMInterpolationPipeline(unet=unet, scheduler=scheduler)


def read_pairs(path: str | Path) -> list[Pair]:
    """A pairs file: one pair a line, two items (seeds or image paths, relative to the file); # comments."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read the pairs file {str(path)!r} ({error}); give a text file of pairs") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        items = line.split("#", 1)[0].split()
        if not items:
            continue
        if len(items) != 2:
            raise InputError(f"{path}:{number}: expected two items (seeds or image paths), got {len(items)}")
        pair = Pair(*(_seed_or_path(item, path.parent) for item in items))
        if isinstance(pair.a, int) != isinstance(pair.b, int):
            raise InputError(f"{path}:{number}: a pair is two seeds or two image paths, not one of each")
        pairs.append(pair)
    if not pairs:
        raise InputError(f"{path}: no pairs; write one pair a line (two seeds or two image paths)")
    return pairs


def check_pair_images(pairs: list[Pair]) -> None:
    """Open and decode every image file the pairs name, so a bad one is reported before the first pair runs."""
    for pair in pairs:
        for item in (pair.a, pair.b):
            if isinstance(item, (str, Path)):
                check_image_file(item)


def check_image_file(path: str | Path) -> None:
    """An InputError naming `path` unless it is an image file PIL can decode."""
    if not Path(path).is_file():
        raise InputError(f"no image file at {str(path)!r}; check the path")
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"{str(path)!r} is not an image PIL can read ({error}); give a PNG, JPEG or WebP file") \
            from None


def _seed_or_path(item: str, base: Path) -> str | int:
    if item.lstrip("-").isdigit():
        return int(item)
    candidate = Path(item) if Path(item).is_absolute() else base / item
    return str(candidate)


def interpolate_pairs(pipeline: DDPMInterpolationPipeline, pairs: list[Pair], t: int | str = DEFAULT_NOISE_LEVEL,
                      num_frames: int = 8, method: str = "slerp", num_inference_steps: int = DEFAULT_STEPS,
                      seed: int = 0, bf16: bool = True, on_pair: Callable[[int, int], None] = lambda i, t: None,
                      first_index: int = 0, endpoint_steps: int | None = None) -> list[InterpolatedPair]:
    """Interpolate each pair; the q-sample/ancestral noise of pair i is seeded by (seed + first_index + i).
    Endpoints from seeds are sampled in `endpoint_steps` (default: `num_inference_steps`) from T − 1."""
    results = []
    with inference_precision(pipeline.unet, bf16):
        for index, pair in enumerate(pairs, start=first_index):
            a, b = _endpoint_tensors(pipeline, pair, endpoint_steps or num_inference_steps)
            output = pipeline(image_a=a, image_b=b, t=t, num_frames=num_frames, method=method,
                              num_inference_steps=num_inference_steps,
                              generator=torch.Generator().manual_seed(seed + index))
            endpoints = tuple(to_pil(torch.stack([a, b])))
            results.append(InterpolatedPair(endpoints, output.images, output.noise_level))
            on_pair(index, output.noise_level)
    return results


def _endpoint_tensors(pipeline: DDPMInterpolationPipeline, pair: Pair, num_inference_steps: int):
    """Both endpoints as (3, H, W) tensors in [-1, 1]: preprocessed images, or samples from seeds."""
    if isinstance(pair.a, int) and isinstance(pair.b, int):
        generated = pipeline.endpoints_from_seeds((pair.a, pair.b), num_inference_steps).float().cpu()
        return generated[0], generated[1]
    if isinstance(pair.a, int) or isinstance(pair.b, int):
        raise InputError(f"a pair is two seeds or two images, not one of each: {pair}")
    return _image_tensor(pair.a, pipeline.resolution), _image_tensor(pair.b, pipeline.resolution)


def _image_tensor(image, resolution: int) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image
    if isinstance(image, (str, Path)) and not Path(image).is_file():
        raise FileNotFoundError(f"no image at {image}")
    return preprocess(image, resolution)


def strip(results: list[InterpolatedPair], gap: int = 4) -> Image.Image:
    """One row per pair: input A | frames | input B, like the paper's Fig. 2b."""
    size = results[0].frames[0].width
    columns = len(results[0].frames) + 2
    width = columns * size + gap * 2
    canvas = Image.new("RGB", (width, len(results) * size + (len(results) - 1) * gap), "white")
    for row, result in enumerate(results):
        y = row * (size + gap)
        canvas.paste(result.endpoints[0], (0, y))
        for column, frame in enumerate(result.frames):
            canvas.paste(frame, (size + gap + column * size, y))
        canvas.paste(result.endpoints[1], (size + 2 * gap + len(result.frames) * size, y))
    return canvas


def magnified(image: Image.Image, scale: int) -> Image.Image:
    """`image` enlarged `scale` times with NEAREST, so small samples stay sharp on screen."""
    return image if scale <= 1 else image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def save_gif(results: list[InterpolatedPair], path: str | Path, frame_ms: int = 120, scale: int = 1) -> None:
    """An animated GIF going A → B → A; each GIF frame shows frame k of every pair, stacked."""
    size = results[0].frames[0].width
    count = len(results[0].frames)
    order = list(range(count)) + list(range(count - 2, 0, -1))
    sheets = []
    for k in order:
        sheet = Image.new("RGB", (size, size * len(results)))
        for row, result in enumerate(results):
            sheet.paste(result.frames[k], (0, row * size))
        sheets.append(magnified(sheet, scale))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    sheets[0].save(staging, format="GIF", save_all=True, append_images=sheets[1:], duration=frame_ms, loop=0)
    staging.replace(path)
