"""One preprocessing for every image the project feeds to a model: ADM's resize, the crop, the flip.

Training, interpolation inputs and neighbour search all go through
`ImagePreprocessor` (built on the interpolation pipeline file's functions), so
a model never sees two different resizings of the same photo.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from ..pipelines.ddpm_interpolation import crop_square, open_image, resize_shorter_side, to_rgb

# What PIL raises for a truncated, corrupt or absurdly large file, or a mode it cannot convert
# (ValueError, which ImageTooSmall also is): such an image is skipped and counted.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageTooSmall(ValueError):
    """An image whose shorter side is below `--min_image_size` (skipped and counted like an unreadable one)."""


@dataclass
class PreparedImage:
    pixels: torch.Tensor  # uint8 (H, W, 3); `to_model_input` makes the model's input of it
    original_size: tuple[int, int]  # (width, height) as stored, before any resizing
    upscaled: bool  # its shorter side was below the resolution


@dataclass
class ResizedImage:
    """An image after the deterministic part of the preprocessing (RGB, resize, centre crop if asked)."""

    image: Image.Image
    original_size: tuple[int, int]  # (width, height) as stored, before any resizing
    upscaled: bool  # its shorter side was below the resolution


@dataclass
class ImagePreprocessor:
    """RGB → shorter side resized to `resolution` → crop → optional flip → uint8 (H, W, 3) pixels
    (`prepare`), or the model's CHW float in [-1, 1] (calling it).

    Random choices (crop offset, flip) are drawn from `generator`, or from
    torch's global RNG without one. An image whose shorter side is below
    `min_image_size` raises `ImageTooSmall`; one below `resolution` is upscaled
    (`prepare` says so).

    It runs in two stages, `resize` (the same every epoch) and `augment` (the
    random crop and flip, drawn anew each epoch), so that a prepared dataset
    (`lsun_ddpm.data.prepare`) can store the first and run only the second per step.
    """

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    min_image_size: int = 0

    def __call__(self, source: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        return to_model_input(self.prepare(source, generator).pixels)

    def prepare(self, source: Any, generator: torch.Generator | None = None) -> PreparedImage:
        resized = self.resize(source)
        return PreparedImage(self.augment(np.asarray(resized.image), generator), resized.original_size,
                             resized.upscaled)

    def resize(self, source: Any) -> ResizedImage:
        """The deterministic stage: RGB, shorter side to `resolution`, and the centre crop when it is on."""
        stored = open_image(source)  # its size is known before its pixels are decoded
        width, height = stored.size
        if min(width, height) < self.min_image_size:
            raise ImageTooSmall(f"{width}x{height} is smaller than --min_image_size {self.min_image_size}")
        image = resize_shorter_side(to_rgb(stored, self.resolution), self.resolution)
        if self.center_crop:
            image = crop_square(image, self.resolution)
        return ResizedImage(image, (width, height), min(width, height) < self.resolution)

    def augment(self, pixels: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """The random stage, on `resize`'s pixels (uint8 (H, W, 3)): the random crop (when not centred), then
        the flip, into a uint8 (resolution, resolution, 3) tensor of its own (`pixels` may be a read-only
        memory map). A prepared dataset runs only this stage per step, so it is a view, a copy and torch's
        flip (a tenth of the cost of copying numpy's reversed view of 3-byte pixels)."""
        if not self.center_crop:
            left = int(torch.randint(0, pixels.shape[1] - self.resolution + 1, (), generator=generator))
            top = int(torch.randint(0, pixels.shape[0] - self.resolution + 1, (), generator=generator))
            pixels = pixels[top:top + self.resolution, left:left + self.resolution]
        image = torch.from_numpy(np.array(pixels))
        if self.draws_flip(generator):
            image = image.flip(1)
        return image

    def augment_batch(self, images: list[np.ndarray], generators: list[torch.Generator]) -> torch.Tensor:
        """`augment` of each image with its generator, as one uint8 (B, resolution, resolution, 3) batch.

        With the centre crop (`resize`'s images are then all resolution ×
        resolution) it is one copy of all the images into the batch, and those
        drawn to flip are flipped in place, rather than a copy per image and a
        stack of the copies."""
        if not self.center_crop:
            return torch.stack([self.augment(image, generator) for image, generator in zip(images, generators)])
        batch = torch.from_numpy(np.stack(images))
        for image, generator in zip(batch, generators):
            if self.draws_flip(generator):
                image.copy_(image.flip(1))  # in place, image by image: boolean indexing costs 6 times as much
        return batch

    def draws_flip(self, generator: torch.Generator | None) -> bool:
        """Whether an image is flipped: the draw after the crop's (`augment`), none without `random_flip`."""
        return self.random_flip and torch.rand((), generator=generator).item() < 0.5


def to_model_input(pixels: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
                   ) -> torch.Tensor:
    """uint8 pixels (..., H, W, 3) → the model's float32 (..., 3, H, W) in [-1, 1], the values `to_tensor`
    gives; `memory_format` for a batch (torch.channels_last).

    Training items carry uint8 pixels, and the training loop converts a batch once it is on the device:
    a DataLoader worker then hands over a quarter of the bytes (docs/performance.md), a batch goes to a GPU
    in a quarter of the time, and channels_last
    costs no transposition, since (H, W, 3) already is its layout.
    """
    return pixels.movedim(-1, -3).float().div_(127.5).sub_(1.0).contiguous(memory_format=memory_format)


# The one column of every training dataset: images left undecoded ({"bytes", "path"} dicts).
UNDECODED_IMAGES = datasets.Features({"image": datasets.Image(decode=False)})


def augmentation_generator(seed: int, epoch: int, *position: int) -> torch.Generator:
    """The generator of the random crop and flip of the item at `position` in `epoch`.

    `position` is an item's index in a map-style dataset, or (DataLoader
    worker, index in that worker's stream) for a streamed one. The draws depend
    on nothing else: not on the process or DataLoader worker that decodes the
    item, and not on the global RNG, which also draws the noise. accelerate's
    DataLoader reads one batch ahead, so a checkpoint's RNG state already holds
    the next batch's draws; a resumed run that drew that batch's flips from it
    again would flip other images and shift all later noise.

    Its seed is a hash of (seed, epoch, position): a prepared dataset makes
    one generator per image per step, and numpy's SeedSequence, which would do
    the same job, costs 7 times as much.
    """
    key = (seed, epoch, *position)
    digest = hashlib.blake2b(struct.pack(f"<{len(key)}q", *key), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))
