"""Writing run outputs that a user keeps: pipeline folders, checkpoints, grids.

Everything is written to a temporary sibling first and moved into place with
`os.replace`, so an interrupted save never leaves a half-written folder where
a complete one stood.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from PIL import Image

from .ema import ema_weights

RAW_UNET_SUBFOLDER = "unet_raw"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def replace_path(source: Path, destination: Path) -> None:
    """Move `source` onto `destination`, replacing a file or a whole folder.

    A folder cannot be replaced in one rename when the destination exists, so
    the old one is first renamed aside and deleted only after the new one is
    in place: at every moment a complete copy exists under some name.
    """
    if destination.is_dir() and not destination.is_symlink():
        aside = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, aside)
        os.replace(source, destination)
        shutil.rmtree(aside)
    else:
        os.replace(source, destination)


def save_pipeline_folder(
    unet: UNet2DModel, scheduler: DDPMScheduler, output_dir: str | os.PathLike, ema: EMAModel | None = None
) -> None:
    """Write a stock `DDPMPipeline` folder into `output_dir` (safetensors).

    With `ema`, `unet/` holds the EMA weights and `unet_raw/` the training
    weights, which `unet` keeps (they are swapped back bit-identically). Other
    files in `output_dir` (checkpoints, logs, samples) are left alone.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as staging:
        staging = Path(staging)
        if ema is not None:
            _stock(unet).save_pretrained(staging / RAW_UNET_SUBFOLDER, safe_serialization=True)
        with ema_weights(ema, unet):
            DDPMPipeline(unet=_stock(unet), scheduler=scheduler).save_pretrained(staging, safe_serialization=True)
        for entry in sorted(staging.iterdir()):
            replace_path(entry, output_dir / entry.name)


def _stock(unet: UNet2DModel) -> UNet2DModel:
    """Plain `UNet2DModel` (see `ADMUNet2DModel.to_unet2d`), so exports load without this package."""
    return unet.to_unet2d() if hasattr(unet, "to_unet2d") else unet


def save_image(image: Image.Image, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    image.save(staging, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
    os.replace(staging, path)


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file under a temporary name and move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-<step>` folders in `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint-<step> folder")
    return int(match.group(1))
