"""The embedded demo: a few minutes of real training on 2 CPU cores, no download.

It trains the `small32` model on the colour photos that ship inside
scikit-image (the only images a fresh install is guaranteed to have; no LSUN
image is redistributed) and writes a sample grid and a pipeline folder. The
model mostly memorises those few photos: this shows that the whole recipe
works end to end, not bedroom quality.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .data import resize_shorter_side
from .sampling import fast_precision_available, pick_device

# scikit-image's bundled colour photographs (see skimage.data).
DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
               "immunohistochemistry", "colorwheel")
# Square windows (fraction of the shorter side, horizontal position) cut from each photo.
DEMO_CROPS = ((1.0, 0.5), (0.8, 0.0), (0.8, 1.0))


def demo_defaults(output_dir: str = "demo-run") -> dict:
    """Training options of the demo (every one can still be overridden by a flag)."""
    fast_bf16 = fast_precision_available(pick_device())
    return {
        "train_data_dir": str(Path(output_dir) / "data"),
        "output_dir": output_dir,
        "model_preset": "small32",
        "train_batch_size": 16,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 50,
        "max_train_steps": 1000,
        "checkpointing_steps": 500,
        "checkpoints_total_limit": 1,
        "save_images_steps": 250,
        "save_model_steps": 1000,
        "eval_batch_size": 16,
        "ddpm_num_inference_steps": 100,
        "seed": 0,
        "mixed_precision": "bf16" if fast_bf16 else "no",
        "channels_last": fast_bf16,
    }


def write_demo_images(folder: str | Path, size: int = 64) -> int:
    """Write square crops of scikit-image's colour photos as `size`-px PNGs; return how many.

    Stored small so that decoding does not dominate a CPU run; training still
    resizes them to its resolution with the usual preprocessing.
    """
    try:
        from skimage import data as skimage_data
    except ImportError as error:
        raise SystemExit("the demo trains on scikit-image's photos: pip install 'lsun-ddpm[demo]'") from error
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for name in DEMO_PHOTOS:
        photo = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
        for index, (fraction, position) in enumerate(DEMO_CROPS):
            side = int(min(photo.size) * fraction)
            left = int((photo.width - side) * position)
            top = (photo.height - side) // 2
            crop = photo.crop((left, top, left + side, top + side))
            resize_shorter_side(crop, size).save(folder / f"{name}_{index}.png")
            count += 1
    return count


def overview(training: Image.Image, samples: Image.Image, scale: int = 4) -> Image.Image:
    """Training images beside samples, captioned and magnified (NEAREST) so 32-px images are visible."""
    from .interpolation import magnified
    from .sampling import labelled_side_by_side

    return magnified(labelled_side_by_side([("training images", training), ("samples (EMA)", samples)]), scale)


def training_images_grid(folder: str | Path, resolution: int, count: int) -> Image.Image:
    """The first `count` training images, preprocessed as training sees them, as a grid."""
    import torch

    from .pipelines.ddpm_interpolation import preprocess
    from .sampling import image_grid, to_pil

    paths = sorted(Path(folder).glob("*.png"))[:count]
    return image_grid(to_pil(torch.stack([preprocess(path, resolution) for path in paths])))
