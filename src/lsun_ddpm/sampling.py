"""Drawing images from a trained U-Net and laying them out as grids."""

from __future__ import annotations

import math

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils import make_image_grid
from PIL import Image


@torch.no_grad()
def generate_images(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    num_images: int,
    num_inference_steps: int = 1000,
    seed: int = 0,
) -> list[Image.Image]:
    """Ancestral DDPM samples (the paper's sampler) from `unet` as it is now.

    The scheduler is copied, so sampling never changes the training
    scheduler's state (`set_timesteps` mutates it).
    """
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    output = pipeline(
        batch_size=num_images, generator=generator, num_inference_steps=num_inference_steps, output_type="pil"
    )
    return output.images


def grid_shape(num_images: int) -> tuple[int, int]:
    """(rows, cols) of the squarest grid that holds exactly `num_images` (64 → 8×8)."""
    rows = int(math.isqrt(num_images))
    while num_images % rows:
        rows -= 1
    return rows, num_images // rows


def image_grid(images: list[Image.Image]) -> Image.Image:
    rows, cols = grid_shape(len(images))
    return make_image_grid(images, rows=rows, cols=cols)
