"""The Gradio app of the Space: Generate, Interpolate, About.

`space/app.py` only calls `main()`. The model comes from MODEL_ID (a Hub repo
id or a local pipeline folder) and is loaded from safetensors only. The app
makes no request to an outside host: analytics are off and the theme uses the
system's fonts instead of Google Fonts. Files made for a request are written
straight into gradio's cache, which `delete_cache` empties; the app keeps none
of its own.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..errors import InputError, ModelUnavailableError
from ..hardware import keep_freed_host_memory
from ..layout import CARD_FILE, NEIGHBOURS_FIGURE
from ..pipelines.ddpm_interpolation import METHODS
from ..sample.figures import image_grid
from ..sample.interpolation import (InterpolatedPair, InterpolationSteps, Pair, choose_interpolation_steps,
                                    interpolate_pairs, load_interpolation_pipeline, magnified, save_gif, strip)
from ..sample.loading import (check_model_source, has_ema_weights, load_scheduler_config, recorded_training_options,
                              student_steps)
from ..sample.sampling import DEFAULT_SCHEDULER, SCHEDULERS, STUDENT_SCHEDULER, SamplingPlan, generate, pick_device
from .card import training_data

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported


SAMPLERS = ("dpmsolver++", "unipc", "ddim", "ddpm")
# gradio's delete_cache (frequency, age) in seconds: every 10 minutes, the files served more than an hour ago
# (grids, GIFs, uploads) are deleted, so a running Space does not fill its disk; all go when it restarts.
CACHE_CLEANUP = (600, 3600)


@dataclass(frozen=True)
class Limits:
    max_images: int = 16
    max_steps: int = 1000
    max_frames: int = 16
    max_upload_pixels: int = 4096 * 4096
    queue_size: int = 16
    concurrency: int = 1


# The queue both requests that run the model wait in.
MODEL_QUEUE = "model"


def _check_range(name: str, value, low: int, high: int) -> int:
    # Not finite (NaN, inf: the API takes any number) fails the comparison before int() could raise.
    if value is None or not low <= value <= high or int(value) != value:
        raise InputError(f"{name} must be a whole number from {low} to {high}, got {value}")
    return int(value)


class SpaceModel:
    """The loaded model and the two things the Space does with it."""

    def __init__(self, model_id: str, limits: Limits = Limits(), bf16: bool = True):
        self.model_id = model_id
        self.limits = limits
        self.bf16 = bf16
        check_model_source(model_id)  # a local path that is no pipeline is one sentence, with no Hub lookup
        run_config = recorded_training_options(model_id)
        self.training_data = training_data(run_config)
        self.has_ema = has_ema_weights(run_config)  # without EMA, unet/ holds the raw weights: those are served
        self.pipeline = load_interpolation_pipeline(model_id, "ema", pick_device(), has_ema=self.has_ema)
        self.pipeline.set_progress_bar_config(disable=True)
        self.scheduler_config = load_scheduler_config(model_id)
        self.student_steps = student_steps(model_id)  # a distilled student samples in its own steps

    @property
    def default_sampler(self) -> tuple[str, int]:
        """What "Generate" offers first: a student's own DDIM steps, else DPM-Solver++ at 25."""
        if self.student_steps is not None:
            return STUDENT_SCHEDULER, self.student_steps
        return DEFAULT_SCHEDULER, SCHEDULERS[DEFAULT_SCHEDULER][2]

    @property
    def default_noise_level(self) -> tuple[bool, int]:
        """What "Interpolate" offers first: t chosen per pair, or for a student the point of its grid that
        `interpolate` takes (an automatic t would fall between its timesteps); the slider's t."""
        if self.student_steps is None:
            return True, (self.max_noise_level + 1) // 2
        return False, self._interpolation_steps(None).t

    def _interpolation_steps(self, t: int | str | None) -> InterpolationSteps:
        return choose_interpolation_steps(self.model_id, t, None, self.max_noise_level + 1, default_steps=25)

    @property
    def resolution(self) -> int:
        return self.pipeline.resolution

    @property
    def max_noise_level(self) -> int:
        """The noisiest step t the model was trained for, T-1 (its scheduler's num_train_timesteps T): the
        interpolation pipeline takes t in [1, T-1]."""
        return self.pipeline.scheduler.config.num_train_timesteps - 1

    @property
    def display_scale(self) -> int:
        """Small models' images are shown enlarged (NEAREST) to at least 128 px."""
        return max(1, 128 // self.resolution)

    def generate(self, num_images, sampler: str, steps, seed, on_progress: Callable[[int, int], None] = None
                 ) -> list[Image.Image]:
        num_images = _check_range("Number of images", num_images, 1, self.limits.max_images)
        steps = _check_range("Steps", steps, 1, self.limits.max_steps)
        seed = _check_range("Seed", seed, 0, 2**32 - 1)
        if sampler not in SAMPLERS:
            raise InputError(f"Sampler must be one of {', '.join(SAMPLERS)}")
        plan = SamplingPlan(sampler, steps, batch_size=num_images, bf16=self.bf16)
        return generate(self.pipeline.unet, self.scheduler_config, num_images, seed, plan,
                        progress=_step_counter(on_progress))

    def interpolate(self, seed_a, seed_b, image_a: Image.Image | None, image_b: Image.Image | None, t, auto_t: bool,
                    frames, method: str) -> tuple[InterpolatedPair, Image.Image]:
        frames = _check_range("Frames", frames, 2, self.limits.max_frames)
        noise_level = "auto" if auto_t else _check_range("Noise level t", t, 1, self.max_noise_level)
        if method not in METHODS:
            raise InputError(f"Method must be one of {', '.join(METHODS)}")
        if image_a is not None or image_b is not None:
            pair = Pair(*(self._uploaded(image, label) for image, label in ((image_a, "A"), (image_b, "B"))))
        else:
            pair = Pair(_check_range("Seed A", seed_a, 0, 2**32 - 1), _check_range("Seed B", seed_b, 0, 2**32 - 1))
        chosen = self._interpolation_steps(noise_level)
        result = interpolate_pairs(self.pipeline, [pair], chosen.t, frames, method, num_inference_steps=chosen.steps,
                                   bf16=self.bf16, endpoint_steps=chosen.endpoint_steps)[0]
        return result, strip([result])

    def _uploaded(self, image: Image.Image | None, label: str) -> Image.Image:
        """An uploaded photo (any mode, any size up to the limit), decoded now; preprocessed like the training
        data later."""
        if image is None:
            raise InputError(f"Upload both photos (photo {label} is missing), or clear both to use seeds")
        if image.width * image.height > self.limits.max_upload_pixels:  # an image given directly (uploads: photo_upload)
            raise InputError(f"Photo {label} is {image.width}×{image.height}; the limit is "
                             f"{self.limits.max_upload_pixels / 10**6:g} megapixels")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise InputError(f"Photo {label} could not be decoded ({error}); upload a PNG, JPEG or WebP photo") \
                from None
        return image


def _step_counter(on_progress: Callable[[int, int], None] | None):
    if on_progress is None:
        return None

    def start(total: int):
        done = [0]

        def step():
            done[0] += 1
            on_progress(done[0], total)

        return step

    return start


def cached_file(component, name: str, write: Callable[[Path], None]) -> str:
    """A file made for one request, written and handed to `component`'s gradio cache, where `delete_cache`
    removes it; the app's own copy is deleted before the request returns."""
    with tempfile.TemporaryDirectory(prefix="lsun-ddpm-") as folder:
        path = Path(folder) / name
        write(path)
        return component.move_resource_to_block_cache(path)


def photo_upload(label: str, max_pixels: int):
    """An image upload whose unreadable or too large files are reported in one sentence.

    gradio decodes an upload before the app sees it and turns a failure into
    a generic "error" toast, so this component's decoding reports it as a
    `gr.Error` instead; and a photo of more than `max_pixels` is refused from
    its header, before its pixels take memory. (Wrapped on the instance: a
    subclass of a gradio component makes gradio write a .pyi file beside this module.)
    """
    import gradio as gr

    upload = gr.Image(type="pil", label=label, sources=["upload"])
    decode = upload.preprocess

    def preprocess(payload):
        if payload is None:
            return None
        name = payload.orig_name or "the uploaded file"
        try:
            with Image.open(payload.path) as header:  # reads the size, not the pixels
                width, height = header.size
            if width * height <= max_pixels:
                return decode(payload)
        except Image.DecompressionBombError:  # a size PIL itself refuses to open
            raise gr.Error(f"{label}: {name} has far more than the limit of {max_pixels / 10**6:g} megapixels") \
                from None
        except (OSError, SyntaxError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise gr.Error(f"{label}: {name} is not an image this app can read ({type(error).__name__}); "
                           "upload a PNG, JPEG or WebP photo") from None
        raise gr.Error(f"{label}: {name} is {width}×{height}; the limit is {max_pixels / 10**6:g} megapixels")

    upload.preprocess = preprocess
    return upload


def model_card_link(model_id: str) -> str:
    """Where the model's card is: its Hub page, a local folder's README.md, or (a run not yet pushed) none."""
    folder = Path(model_id)
    if not folder.is_dir():
        return f"[{model_id}](https://huggingface.co/{model_id})"
    if (folder / CARD_FILE).is_file():
        return f"a local folder (`{folder.name}`); its model card is its README.md"
    return (f"a local run folder (`{folder.name}`); it has no model card yet: `lsun-ddpm push` writes one "
            "(`--dry_run DIR` shows it without uploading)")


def about_markdown(model: SpaceModel) -> str:
    data = model.training_data
    weights = ("the exponential moving average (EMA) of its weights" if model.has_ema
               else "its raw training weights (it was trained without an EMA)")
    return f"""
### About this model

A DDPM (Ho et al., 2020) with the U-Net of *Diffusion Models Beat GANs*, trained on {data.description} at
{model.resolution}×{model.resolution} px; samples come from {weights}. Model: {model_card_link(model.model_id)}.

- **Generate** runs DPM-Solver++ with 25 steps by default (the paper used 1000 ancestral DDPM steps; choose
  `ddpm` and 1000 steps to reproduce it). Each image depends only on the seed and its position.
- **Interpolate** noises two images to step *t*, interpolates and denoises. `slerp` keeps the noise level the
  model expects at every frame; `lerp` is the paper's method (its midpoint fades); `ddim` is deterministic and
  reproduces the two inputs at the ends. *auto* chooses *t* per pair from how different the two images are.

Everything runs on this machine's {'GPU' if torch.cuda.is_available() else 'CPU'}; nothing is sent elsewhere.
"""


def build_demo(model: SpaceModel):
    """The Blocks app: Generate, Interpolate and About tabs, wired to `model`."""
    import gradio as gr

    limits = model.limits

    def run_generate(num_images, sampler, steps, seed, progress=gr.Progress()):
        try:
            images = model.generate(num_images, sampler, steps, seed,
                                    on_progress=lambda done, total: progress((done, total), desc="denoising"))
        except InputError as error:
            raise gr.Error(str(error)) from None
        return images, cached_file(download, "samples.png", image_grid(images).save)

    def run_interpolate(source, seed_a, seed_b, image_a, image_b, t, auto_t, frames, method,
                        progress=gr.Progress(track_tqdm=True)):
        try:
            use_photos = source == "two photos"
            if use_photos and image_a is None and image_b is None:
                raise InputError('Upload photo A and photo B first, or choose "two seeds" as the endpoints')
            result, strip_image = model.interpolate(seed_a, seed_b, image_a if use_photos else None,
                                                    image_b if use_photos else None, t, auto_t, frames, method)
        except InputError as error:
            raise gr.Error(str(error)) from None
        gif = cached_file(gif_view, "interpolation.gif",
                          lambda path: save_gif([result], path, scale=model.display_scale))
        return magnified(strip_image, model.display_scale), gif, f"noise level t = {result.noise_level}"

    subject = model.training_data.subject
    with gr.Blocks(title=f"DDPM: {subject}", delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown(f"# A diffusion model of {subject}\n"
                    "Generate images like the model's training data, or interpolate between two.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    num_images = gr.Slider(1, limits.max_images, value=4, step=1, label="Number of images")
                    default_sampler, default_steps = model.default_sampler
                    sampler = gr.Dropdown(list(SAMPLERS), value=default_sampler, label="Sampler")
                    steps = gr.Slider(1, limits.max_steps, value=default_steps, step=1, label="Steps")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    generate_button = gr.Button("Generate", variant="primary")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="Samples", columns=4, object_fit="contain", elem_id="samples")
                    download = gr.File(label="Download the grid")
            # One model: generating and interpolating share one limit (`MODEL_QUEUE`), not one each.
            generate_button.click(run_generate, [num_images, sampler, steps, seed], [gallery, download],
                                  concurrency_limit=limits.concurrency, concurrency_id=MODEL_QUEUE)
        with gr.Tab("Interpolate"):
            with gr.Row():
                with gr.Column(scale=1):
                    source = gr.Radio(["two seeds", "two photos"], value="two seeds", label="Endpoints")
                    with gr.Row():
                        seed_a = gr.Number(value=1, precision=0, label="Seed A")
                        seed_b = gr.Number(value=2, precision=0, label="Seed B")
                    with gr.Row():
                        image_a = photo_upload("Photo A", limits.max_upload_pixels)
                        image_b = photo_upload("Photo B", limits.max_upload_pixels)
                    default_auto_t, default_t = model.default_noise_level
                    auto_t = gr.Checkbox(value=default_auto_t, label="Choose the noise level automatically")
                    t = gr.Slider(1, model.max_noise_level, value=default_t, step=1,
                                  label="Noise level t (when not automatic)")
                    frames = gr.Slider(2, limits.max_frames, value=8, step=1, label="Frames")
                    method = gr.Radio(list(METHODS), value="slerp", label="Method")
                    interpolate_button = gr.Button("Interpolate", variant="primary")
                with gr.Column(scale=2):
                    strip_view = gr.Image(label="Strip: input A, frames, input B", type="pil", elem_id="strip")
                    gif_view = gr.Image(label="Animation", type="filepath", elem_id="animation")
                    chosen_t = gr.Markdown()
            interpolate_button.click(run_interpolate,
                                     [source, seed_a, seed_b, image_a, image_b, t, auto_t, frames, method],
                                     [strip_view, gif_view, chosen_t], concurrency_limit=limits.concurrency,
                                     concurrency_id=MODEL_QUEUE)
        with gr.Tab("About"):
            gr.Markdown(about_markdown(model))
            neighbours = find_neighbours_figure(model.model_id)
            if neighbours is not None:
                gr.Image(neighbours, label="Samples and their nearest training images (LPIPS)", type="filepath")
    demo.queue(max_size=limits.queue_size, default_concurrency_limit=limits.concurrency)
    return demo


def find_neighbours_figure(model_id: str) -> str | None:
    """The run's nearest-neighbour figure, if it has one (local folder or Hub repo)."""
    if Path(model_id).is_dir():
        path = Path(model_id) / NEIGHBOURS_FIGURE
        return str(path) if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(model_id, NEIGHBOURS_FIGURE)
    except Exception:  # not there, or no network: the tab simply has no figure
        return None


def offline_theme():
    """Gradio's default look with the system's fonts: the default theme loads Google Fonts."""
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])


def main() -> None:
    model_id = os.environ.get("MODEL_ID")
    if not model_id:
        raise SystemExit("set MODEL_ID to a Hub model repo id or a local pipeline folder")
    keep_freed_host_memory(pick_device())  # a CPU Space: a batch's activations are reused, not re-mapped each step
    try:
        model = SpaceModel(model_id)
    except ModelUnavailableError as error:  # one line, not the Hub client's traceback
        raise SystemExit(f"MODEL_ID={model_id}: {error}") from None
    demo = build_demo(model)
    # server name and port: gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT itself.
    demo.launch(theme=offline_theme(), ssr_mode=False, max_file_size="20mb", footer_links=["gradio"])
