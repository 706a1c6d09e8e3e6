"""Interpolation between two images with a DDPM: noise both part way, interpolate, denoise.

A diffusers community-style pipeline. It works with any `DDPMPipeline` folder
(a `UNet2DModel` that predicts ε, or [ε, v] with a learned variance, and a
`DDPMScheduler`):

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(
        "path/or/user/model", custom_pipeline="ddpm_interpolation", trust_remote_code=True)
    frames = pipe(image_a=photo_a, image_b=photo_b, t="auto", num_frames=8, method="slerp").images

The name, without ".py", is this file's in the model folder or repo (`lsun-ddpm
push` publishes it there); a name ending in ".py" is read as a path from the
working directory instead.

This file imports only the standard library, torch, diffusers and the two
packages diffusers itself requires (numpy, Pillow), so it runs wherever
diffusers does. `lsun_ddpm` uses this same file (as
`lsun_ddpm.pipelines.ddpm_interpolation`), including its image preprocessing,
which is also the preprocessing of the training data.

Methods (all take the noise level `t`, a training timestep in [1, T-1]):

- `lerp` (the paper's): q-sample both images to t with *independent* noise,
  mix them linearly, denoise from t with ancestral DDPM steps. Independent
  draws are what the paper's procedure does (each image is noised on its own);
  they are also why its midpoint looks faded and blurry: (1-λ)ε_a + λε_b has
  standard deviation √((1-λ)² + λ²) < 1, e.g. 0.71 at λ = ½, so the model is
  handed a frame with less noise than t implies and under-denoises it.
- `slerp`: the same, but the noised images are interpolated on the sphere. For
  independent Gaussian noise (nearly orthogonal in high dimension) this keeps
  the norm, so every frame has the noise level the model was trained on at t.
- `ddim`: deterministic DDIM inversion of both images to t, slerp of the two
  latents, DDIM decoding. Smooth, and frame 0 / frame N-1 reproduce the inputs
  (up to the inversion error, which grows with t).

`t="auto"` picks the noise level per pair (see `auto_noise_level`).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

METHODS = ("lerp", "slerp", "ddim")
EXIF_ORIENTATION = 0x0112

# ---------------------------------------------------------------- preprocessing (shared with training)


def open_image(source) -> PIL.Image.Image:
    """A path, bytes, 🤗 datasets image dict ({"bytes", "path"}), PIL image or [-1, 1]
    tensor (C, H, W) as a PIL image, as stored: a file's pixels are not decoded yet,
    so its size can be checked first."""
    if isinstance(source, torch.Tensor):
        array = ((source.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
        return PIL.Image.fromarray(array.squeeze(0).permute(1, 2, 0).numpy())
    if isinstance(source, PIL.Image.Image):
        return source
    if isinstance(source, dict):
        data = source.get("bytes")
        # b"" is an empty record (e.g. in an LMDB), not "read the path instead".
        return PIL.Image.open(io.BytesIO(data)) if data is not None else PIL.Image.open(source["path"])
    if isinstance(source, (bytes, bytearray)):
        return PIL.Image.open(io.BytesIO(source))
    if isinstance(source, (str, os.PathLike)):
        return PIL.Image.open(source)
    raise TypeError(f"cannot read an image from {type(source).__name__}")


# Modes whose pixels can be (partly) transparent; palette and grey images can
# also name one transparent value (`info["transparency"]`).
TRANSPARENT_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: PIL.Image.Image, resolution: int | None = None) -> PIL.Image.Image:
    """Any image as the RGB picture a photo viewer shows.

    - EXIF orientation is applied (phones store portraits as rotated landscapes).
    - Transparency is composited on white, as browsers and viewers show it on a
      page: a transparent PNG's visible content stays as drawn, and the hidden
      colour of transparent pixels (often black) never leaks in.
    - 16-bit grey is scaled to 8 bits (65535 → 255), not clipped; 32-bit "I"
      images are read as 16-bit, which is what PIL's older versions gave for 16-bit PNGs.
    - Floating-point images have no agreed range: ValueError (the caller skips them).
    - Everything else (L, 1, P, CMYK, YCbCr) goes through PIL's conversion.

    With `resolution`, JPEGs are decoded directly at a reduced size (PIL's `draft`:
    DCT scaling) whose shorter side is still at least `resolution`.
    """
    if resolution is not None and image.format == "JPEG":
        image.draft("RGB", (resolution, resolution))
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_GREY_MODES:
        image = eight_bit_grey(image)
    elif image.mode == "F":
        raise ValueError("floating-point image (mode F): convert it to 8 or 16 bits per channel")
    if image.mode in TRANSPARENT_MODES or "transparency" in image.info:
        image = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def eight_bit_grey(image: PIL.Image.Image) -> PIL.Image.Image:
    """A 16-bit grey image scaled to 8 bits (65535 → 255); its transparent value (a PNG's tRNS), if it
    names one, becomes an alpha channel ("LA"), since after scaling other values would share it."""
    values = np.asarray(image, dtype=np.float64)
    grey = PIL.Image.fromarray(np.round(np.clip(values, 0, 65535) / 257).astype(np.uint8))  # 65535 / 257 = 255
    if "transparency" not in image.info:
        return grey
    alpha = np.where(values == image.info["transparency"], 0, 255).astype(np.uint8)
    return PIL.Image.merge("LA", (grey, PIL.Image.fromarray(alpha)))


def open_rgb(source, resolution: int | None = None) -> PIL.Image.Image:
    """Any image source (see `open_image`) as an RGB PIL image (see `to_rgb`)."""
    return to_rgb(open_image(source), resolution)


def resize_shorter_side(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """ADM's anti-aliased resize: halve with a BOX filter while the shorter side is
    at least twice `size`, then BICUBIC so that the shorter side is exactly `size`."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=PIL.Image.BOX)
    scale = size / min(image.size)
    return image.resize(tuple(max(size, round(x * scale)) for x in image.size), resample=PIL.Image.BICUBIC)


def crop_square(image: PIL.Image.Image, size: int, left: int | None = None, top: int | None = None):
    """A `size` square at (left, top); centred where they are None."""
    left = (image.width - size) // 2 if left is None else left
    top = (image.height - size) // 2 if top is None else top
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def preprocess(source, resolution: int) -> torch.Tensor:
    """The deterministic preprocessing: RGB, shorter side to `resolution`, centre crop, [-1, 1]."""
    image = resize_shorter_side(open_rgb(source, resolution), resolution)
    return to_tensor(crop_square(image, resolution))


# ---------------------------------------------------------------- the math


def q_sample(x0: torch.Tensor, alpha_bar: float, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε."""
    return math.sqrt(alpha_bar) * x0 + math.sqrt(1.0 - alpha_bar) * noise


def lerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    return (1.0 - weight) * a + weight * b


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation between a and b (each flattened per batch item)."""
    a_flat, b_flat = a.flatten(1).double(), b.flatten(1).double()
    cosine = (a_flat * b_flat).sum(1) / (a_flat.norm(dim=1) * b_flat.norm(dim=1))
    theta = torch.arccos(cosine.clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    nearly_parallel = sin_theta < 1e-6  # fall back to lerp, where slerp's formula is 0/0
    safe = torch.where(nearly_parallel, torch.ones_like(sin_theta), sin_theta)
    coef_a = torch.where(nearly_parallel, 1.0 - weight + 0 * theta, torch.sin((1.0 - weight) * theta) / safe)
    coef_b = torch.where(nearly_parallel, weight + 0 * theta, torch.sin(weight * theta) / safe)
    shape = (-1,) + (1,) * (a.ndim - 1)
    return (coef_a.view(shape) * a.double() + coef_b.view(shape) * b.double()).to(a.dtype)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar_from: float, alpha_bar_to: float) -> torch.Tensor:
    """Deterministic DDIM (η = 0) move from noise level ᾱ_from to ᾱ_to, in either direction.

    As in ADM, the x₀ estimate is clipped to [-1, 1] and ε re-derived from it,
    which keeps an imperfect model's estimates inside the data range.
    """
    x0 = ((x - math.sqrt(1.0 - alpha_bar_from) * eps) / math.sqrt(alpha_bar_from)).clamp(-1.0, 1.0)
    if alpha_bar_from < 1.0:
        eps = (x - math.sqrt(alpha_bar_from) * x0) / math.sqrt(1.0 - alpha_bar_from)
    return math.sqrt(alpha_bar_to) * x0 + math.sqrt(1.0 - alpha_bar_to) * eps


def scheduler_model_output(scheduler, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The part of a U-Net's output that `scheduler.step` takes.

    A learned-variance U-Net outputs [ε, v] (twice the image's channels).
    `DDPMScheduler` with variance_type "learned"/"learned_range" splits that
    itself and uses v for its noise; every other scheduler (DDIM, the multistep
    solvers) and every deterministic step here takes ε, the first channels.
    """
    channels = sample.shape[1]
    if model_output.shape[1] == channels:
        return model_output
    if isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type in ("learned", "learned_range"):
        return model_output
    return model_output[:, :channels]


def auto_noise_level(
    x_a: torch.Tensor, x_b: torch.Tensor, alphas_cumprod: torch.Tensor, ratio: float = 0.2,
    t_min: int = 100, t_max: int = 900,
) -> int:
    """The noise level for a pair: the smallest t at which noise hides their difference.

    Too small a t gives an alpha blend (both images are still visible under the
    noise); too large a t forgets them. With d the RMS pixel difference of the
    pair (in [-1, 1] units), the signal difference left at t is √ᾱ_t·d while the
    noise has standard deviation √(1 − ᾱ_t). The criterion picks the smallest t
    with √ᾱ_t·d ≤ ratio·√(1 − ᾱ_t), clamped to [t_min, t_max]: a near-identical
    pair needs little noise, a very different pair much more. With the default
    ratio 0.2, pairs of LSUN bedrooms at 128 px (d ≈ 0.5–1.0) get t ≈ 440–570.
    """
    d = (x_a.double() - x_b.double()).pow(2).mean().sqrt().item()
    alpha_bar = alphas_cumprod.double()
    hidden = (alpha_bar.sqrt() * d <= ratio * (1.0 - alpha_bar).sqrt()).nonzero()
    t = int(hidden[0]) if len(hidden) else len(alpha_bar) - 1
    return int(min(max(t, t_min), t_max))


def respaced_timesteps(t: int, num_steps: int) -> list[int]:
    """Ascending timesteps from near 0 up to and including t, `num_steps` of them (at most t + 1), spaced as
    diffusers' "trailing" spacing spaces a sampler's below T: from t = T − 1, exactly the timesteps a
    `DDIMScheduler(timestep_spacing="trailing")` of `num_steps` visits, so that a distilled student is run
    on its own grid (from t on its grid too)."""
    num_steps = max(1, min(num_steps, t + 1))
    return sorted(round((t + 1) - j * (t + 1) / num_steps) - 1 for j in range(num_steps))


@dataclass
class InterpolationOutput(BaseOutput):
    """`images`: the frames (PIL images, a (N, H, W, 3) array or a (N, 3, H, W) tensor in [0, 1]);
    `noise_level`: the t that was used (chosen per pair when t="auto")."""

    images: list | np.ndarray | torch.Tensor
    noise_level: int


class DDPMInterpolationPipeline(DiffusionPipeline):
    """Interpolate between two images (or two seeds) through the DDPM's noise space.

    Components: `unet` (a `UNet2DModel` predicting ε) and `scheduler` (a
    `DDPMScheduler`; its ᾱ schedule defines the noise levels).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def resolution(self) -> int:
        size = self.unet.config.sample_size
        return size if isinstance(size, int) else size[0]

    def _alpha_bar(self, t: int) -> float:
        return float(self.scheduler.alphas_cumprod[t]) if t >= 0 else 1.0

    def _model_output(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The U-Net's output at t: ε, or [ε, v] for a learned variance."""
        timestep = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return self.unet(x.to(self.unet.dtype), timestep).sample.float()

    def _eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """ε at x_t; from a U-Net that predicts v (a distilled student), ε = √(1 − ᾱ_t) x_t + √ᾱ_t v."""
        prediction = self._model_output(x, t)[:, : x.shape[1]]
        if self.scheduler.config.get("prediction_type", "epsilon") != "v_prediction":
            return prediction
        alpha_bar = self._alpha_bar(t)
        return math.sqrt(1.0 - alpha_bar) * x + math.sqrt(alpha_bar) * prediction

    # These steps are also called on their own, outside __call__'s no_grad: the graph of every
    # U-Net call would be kept, a large share of memory per step at 128 px.
    @torch.no_grad()
    def ddim_invert(self, x0: torch.Tensor, t: int, num_inference_steps: int = 50) -> torch.Tensor:
        """x₀ → x_t along the deterministic DDIM path (ε evaluated at the level it leaves)."""
        x, previous = x0.float(), -1
        for step in self.progress_bar(respaced_timesteps(t, num_inference_steps)):
            x = ddim_step(x, self._eps(x, max(previous, 0)), self._alpha_bar(previous), self._alpha_bar(step))
            previous = step
        return x

    @torch.no_grad()
    def ddim_decode(self, x_t: torch.Tensor, t: int, num_inference_steps: int = 50) -> torch.Tensor:
        """x_t → x₀ along the deterministic DDIM path; the exact reverse of `ddim_invert`'s grid."""
        path = respaced_timesteps(t, num_inference_steps)
        x = x_t.float()
        for step, target in self.progress_bar(list(zip(reversed(path), [*reversed(path[:-1]), -1]))):
            x = ddim_step(x, self._eps(x, step), self._alpha_bar(step), self._alpha_bar(target))
        return x

    @torch.no_grad()
    def ancestral_decode(self, x_t: torch.Tensor, t: int, num_inference_steps: int, generator=None) -> torch.Tensor:
        """x_t → x₀ with the paper's stochastic DDPM steps, respaced to `num_inference_steps`."""
        scheduler = DDPMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(timesteps=list(reversed(respaced_timesteps(t, num_inference_steps))))
        x = x_t.float()
        for step in self.progress_bar(scheduler.timesteps):
            model_output = scheduler_model_output(scheduler, self._model_output(x, int(step)), x)
            x = scheduler.step(model_output, step, x, generator=generator).prev_sample
        return x

    def noised_frames(self, x_a, x_b, t: int, num_frames: int, method: str, generator=None) -> torch.Tensor:
        """The interpolated x_t frames, before lerp/slerp denoising: (num_frames, C, H, W).

        Frame 0 is exactly the q-sample of `x_a`, the last exactly that of `x_b`.
        """
        alpha_bar = self._alpha_bar(t)
        noise = randn_tensor((2, *x_a.shape[1:]), generator=generator, device=x_a.device, dtype=torch.float32)
        noised_a, noised_b = q_sample(x_a, alpha_bar, noise[:1]), q_sample(x_b, alpha_bar, noise[1:])
        mix = lerp if method == "lerp" else slerp
        return torch.cat([mix(noised_a, noised_b, w) for w in _weights(num_frames)])

    @torch.no_grad()
    def endpoints_from_seeds(self, seeds, num_inference_steps: int = 50) -> torch.Tensor:
        """Two images generated deterministically (DDIM from t = T-1) from two seeds."""
        shape = (1, self.unet.config.in_channels, self.resolution, self.resolution)
        noise = torch.cat([randn_tensor(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        t_max = self.scheduler.config.num_train_timesteps - 1
        return self.ddim_decode(noise.to(self._execution_device), t_max, num_inference_steps).clamp(-1, 1)

    @torch.no_grad()
    def __call__(
        self,
        image_a=None,
        image_b=None,
        seed_a: int | None = None,
        seed_b: int | None = None,
        t: int | str = 500,
        num_frames: int = 8,
        method: str = "slerp",
        num_inference_steps: int = 50,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> InterpolationOutput | tuple:
        """Interpolate from image A to image B.

        Args:
            image_a, image_b: the endpoints: PIL images, paths, bytes or (3, H, W) tensors in [-1, 1],
                any size (resized and centre-cropped like the training data). Or give
                `seed_a`/`seed_b` to generate the endpoints first.
            t: noise level, a timestep in [1, T-1], or "auto" to choose it for this pair.
            num_frames: frames from A (frame 0) to B (frame num_frames-1), at least 2.
            method: "lerp" (the paper's), "slerp" or "ddim" (see the module docstring).
            num_inference_steps: denoising steps from t to 0 (the paper's full chain: t).
            generator: seeds the q-sample noise and the ancestral steps (lerp, slerp).
            output_type: "pil", "np" ((N, H, W, 3) in [0, 1]) or "pt" ((N, 3, H, W) in [0, 1]).

        Returns:
            `InterpolationOutput(images, noise_level)`, or `(images, noise_level)`.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if num_frames < 2:
            raise ValueError(f"num_frames must be at least 2, got {num_frames}")
        if num_inference_steps < 1:  # respacing would otherwise quietly run one step
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        device = self._execution_device
        x_a, x_b = self._endpoints(image_a, image_b, seed_a, seed_b, num_inference_steps, device)
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if t == "auto":
            t = auto_noise_level(x_a, x_b, self.scheduler.alphas_cumprod)
        t = int(t)
        if not 1 <= t < num_train_timesteps:
            raise ValueError(f"t must be 'auto' or a timestep in [1, {num_train_timesteps - 1}], got {t}")

        if method == "ddim":
            latents = self.ddim_invert(torch.cat([x_a, x_b]), t, num_inference_steps)
            frames = torch.cat([slerp(latents[:1], latents[1:], w) for w in _weights(num_frames)])
            frames = self.ddim_decode(frames, t, num_inference_steps)
        else:
            frames = self.noised_frames(x_a, x_b, t, num_frames, method, generator)
            frames = self.ancestral_decode(frames, t, num_inference_steps, generator)

        images = _postprocess(frames, output_type, self.numpy_to_pil)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, t
        return InterpolationOutput(images=images, noise_level=t)

    def _model_input(self, image) -> torch.Tensor:
        """A (3, H, W) tensor in [-1, 1] already at the model's size is used as it is (it was
        preprocessed by the caller); anything else goes through `preprocess`."""
        size = (3, self.resolution, self.resolution)
        if isinstance(image, torch.Tensor) and tuple(image.shape) in (size, (1, *size)):
            return image.float().clamp(-1, 1).reshape(3, self.resolution, self.resolution)
        return preprocess(image, self.resolution)

    def _endpoints(self, image_a, image_b, seed_a, seed_b, num_inference_steps, device):
        if image_a is not None and image_b is not None:
            pair = torch.stack([self._model_input(image) for image in (image_a, image_b)]).to(device)
            return pair[:1], pair[1:]
        if seed_a is not None and seed_b is not None:
            endpoints = self.endpoints_from_seeds((seed_a, seed_b), num_inference_steps)
            return endpoints[:1], endpoints[1:]
        raise ValueError("give two images (image_a, image_b) or two seeds (seed_a, seed_b)")


def _weights(num_frames: int) -> list[float]:
    return [k / (num_frames - 1) for k in range(num_frames)]


def _postprocess(frames: torch.Tensor, output_type: str, numpy_to_pil):
    images = (frames / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    images = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return numpy_to_pil(images) if output_type == "pil" else images
