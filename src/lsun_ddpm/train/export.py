"""The pipeline folder a run exports: a stock pipeline with the EMA weights, and the raw ones beside."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from diffusers import DDPMPipeline, DiffusionPipeline, UNet2DModel
from diffusers.training_utils import EMAModel

from ..files import replace_path
from ..layout import RAW_UNET
from .ema import ema_weights

def save_pipeline_folder(unet: UNet2DModel, scheduler, output_dir: str | os.PathLike, ema: EMAModel | None = None,
                         pipeline_class: type[DiffusionPipeline] = DDPMPipeline) -> None:
    """Write a stock pipeline folder into `output_dir` (safetensors): a `DDPMPipeline`, or the class that
    samples with `scheduler` (a distilled student's `DDIMPipeline`).

    With `ema`, `unet/` holds the EMA weights and `unet_raw/` the training
    weights, which `unet` keeps (they are swapped back bit-identically). Other
    files in `output_dir` (checkpoints, logs, samples) are left alone.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as staging:
        staging = Path(staging)
        if ema is not None:
            _stock(unet).save_pretrained(staging / RAW_UNET, safe_serialization=True)
        with ema_weights(ema, unet):
            pipeline_class(unet=_stock(unet), scheduler=scheduler).save_pretrained(staging, safe_serialization=True)
        for entry in sorted(staging.iterdir()):
            replace_path(entry, output_dir / entry.name)


def _stock(unet: UNet2DModel) -> UNet2DModel:
    """Plain `UNet2DModel` (see `ADMUNet2DModel.to_unet2d`), so exports load without this package."""
    return unet.to_unet2d() if hasattr(unet, "to_unet2d") else unet
