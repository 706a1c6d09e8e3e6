"""Grids and captioned figures of images."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont
from diffusers.utils import make_image_grid

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
