"""The embedded demo: a few minutes of real training on 2 CPU cores, no download.

It trains the `small32` model on four colour photos that ship inside
scikit-image (the only images a fresh install is guaranteed to have; no LSUN
image is redistributed), then makes the paper's figures from the run. Four
photos and ~1,600 steps are what 2 CPU cores can memorise in three minutes:
the samples are recognisably the training pictures, which the neighbour
figure (Fig. 4) shows and measures. This shows the whole recipe working end
to end, not bedroom quality.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .errors import InputError
from .evaluate.lpips_features import MIN_RESOLUTION
from .files import save_image
from .layout import DEMO_OVERVIEW, INTERPOLATION_FIGURE, NEIGHBOURS_FIGURE, NEIGHBOURS_TABLE, RAW_VS_EMA_FIGURE
from .pipelines.ddpm_interpolation import resize_shorter_side
from .train.loop import train
from .train.parsing import check_training_inputs, read_model_config

# scikit-image's bundled colour photographs (see skimage.data): four distinct,
# recognisable pictures. Eight (with the microscopy and space images) were not
# memorised within the time budget: their samples stayed blurry textures.
DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
# Square windows (fraction of the shorter side, horizontal position) cut from each photo.
DEMO_CROPS = ((1.0, 0.5),)


def demo_defaults(output_dir: str = "demo-run") -> dict:
    """Training options of the demo (every one can still be overridden by a flag)."""
    return {
        "train_data_dir": str(Path(output_dir) / "data"),
        "output_dir": output_dir,
        "model_preset": "small32",
        # One micro-batch holds each photo once; unflipped, so samples can be compared with the photos
        # as they are. Cosine decay lets the last few hundred steps settle on sharp copies.
        "train_batch_size": 4,
        "random_flip": False,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 50,
        "max_train_steps": 1600,
        "checkpointing_steps": 800,
        "checkpoints_total_limit": 1,
        "save_images_steps": 800,
        "save_model_steps": 1600,
        "eval_batch_size": 16,
        "ddpm_num_inference_steps": 100,
        "seed": 0,
    }


def run_demo(config) -> None:
    """Train the demo's run (on its photos, written now, or on the user's --train_data_dir), then make the paper's
    figures from it and say where they are."""
    check_training_inputs(config)  # before the demo's photos are written into the output folder
    # Fig. 4 compares the samples under LPIPS (AlexNet): a resolution it cannot take would fail after training.
    size = config.resolution or read_model_config(config)["sample_size"]
    if min(size if isinstance(size, (list, tuple)) else [size]) < MIN_RESOLUTION["alex"]:
        raise InputError(f"--resolution {size}: the demo's Fig. 4 compares images under LPIPS (AlexNet), which "
                         f"takes {MIN_RESOLUTION['alex']} px or more; give a larger --resolution")
    if config.train_data_dir == demo_defaults(config.output_dir)["train_data_dir"]:
        count = write_demo_images(config.train_data_dir)
        print(f"demo: training {config.model_preset} on {count} crops of scikit-image's photos in "
              f"{config.train_data_dir}")
    else:  # the user's own images: read, never written into
        print(f"demo: training {config.model_preset} on the images in {config.train_data_dir}")
    output = train(config)
    save_image(overview(paper_figures(output, config)), output / DEMO_OVERVIEW)
    raw_vs_ema = " raw vs EMA weights (Fig. 1)," if config.use_ema else ""  # a run without EMA has no Fig. 1
    print(f"\ndemo finished. Open {output / DEMO_OVERVIEW}: the paper's figures from this run: samples beside "
          f"the training images (Fig. 2a),{raw_vs_ema} an interpolation (Fig. 2b) and each "
          f"sample's nearest training images (Fig. 4; full figure in {output / NEIGHBOURS_FIGURE}).\n"
          f"Load the model with stock diffusers: DDPMPipeline.from_pretrained({str(output)!r})")


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


def training_images_grid(folder: str | Path, resolution: int, count: int) -> Image.Image:
    """The first `count` training images, preprocessed as training sees them, as a grid."""
    import torch

    from .pipelines.ddpm_interpolation import preprocess
    from .sample.figures import image_grid
    from .sample.sampling import to_pil

    paths = sorted(Path(folder).glob("*.png"))[:count]
    return image_grid(to_pil(torch.stack([preprocess(path, resolution) for path in paths])))


def paper_figures(run_dir: Path, config) -> list[tuple[str, Image.Image]]:
    """The paper's figure set from the demo's own run, captioned; also writes each figure into `run_dir`.

    Fig. 2a: training images and samples from the EMA weights (the training grid's seeds and sampler).
    Fig. 1: the same seeds from the raw and the EMA weights (only when the run kept an EMA).
    Fig. 2b: an interpolation between two training images (slerp, t chosen per pair).
    Fig. 4: each sample beside its nearest training images under LPIPS (`neighbours.png`).
    """
    from .sample.interpolation import Pair, interpolate_pairs, load_interpolation_pipeline, magnified, strip
    from .sample.sampling import SamplingPlan, generate
    from .sample.figures import image_grid, labelled_side_by_side
    from .sample.loading import load_scheduler_config, load_unet

    scale = max(1, 96 // config.resolution)  # small images magnified (NEAREST) so a person can see them

    def grid(images: list[Image.Image]) -> Image.Image:
        return magnified(image_grid(images), scale)

    plan = SamplingPlan("ddpm", config.ddpm_num_inference_steps, config.eval_batch_size, bf16=False)
    scheduler_config = load_scheduler_config(str(run_dir))
    # A run without EMA (--no_use_ema) has only its raw weights: there is no Fig. 1 to draw.
    kinds = ("raw", "ema") if config.use_ema else ("raw",)
    samples = {weights: generate(load_unet(str(run_dir), weights, has_ema=config.use_ema), scheduler_config,
                                 config.eval_batch_size, config.seed or 0, plan) for weights in kinds}
    final = samples["ema" if config.use_ema else "raw"]
    final_label = "EMA" if config.use_ema else "raw weights, no EMA"
    training = magnified(training_images_grid(config.train_data_dir, config.resolution, config.eval_batch_size), scale)
    fig2a = labelled_side_by_side([("training images", training), (f"samples ({final_label})", grid(final))])

    photos = sorted(Path(config.train_data_dir).glob("*.png"))
    pipeline = load_interpolation_pipeline(str(run_dir), has_ema=config.use_ema)
    pair = interpolate_pairs(pipeline, [Pair(str(photos[0]), str(photos[-1]))], t="auto", num_frames=8,
                             num_inference_steps=50, bf16=False)
    save_image(strip(pair), run_dir / INTERPOLATION_FIGURE)
    fig2b = magnified(strip(pair), scale)
    figures = [(f"Fig. 2a: training images | samples from the {'EMA' if config.use_ema else 'raw'} weights", fig2a)]
    if config.use_ema:
        fig1 = labelled_side_by_side([("raw weights", grid(samples["raw"])), ("EMA weights", grid(samples["ema"]))])
        save_image(fig1, run_dir / RAW_VS_EMA_FIGURE)
        figures.append(("Fig. 1: the same seeds from the raw | the EMA weights", fig1))

    fig4 = demo_neighbours(run_dir, config, final)
    return figures + [
        (f"Fig. 2b: two training images and their interpolation (slerp, t = {pair[0].noise_level})", fig2b),
        ("Fig. 4: samples and their nearest training images (LPIPS); red: possible copy", fig4)]


def demo_neighbours(run_dir: Path, config, samples: list[Image.Image]) -> Image.Image:
    """`lsun-ddpm neighbours` on the demo: its samples against its own training crops, into the run folder.

    The ImageNet AlexNet is used when torchvision has it on disk; a fresh
    offline machine has not, and then a seeded random backbone stands in,
    which the figure and neighbours.json say.
    """
    from .data.sources import load_image_dataset
    from .evaluate.lpips_features import imagenet_weights_cached
    from .evaluate.neighbours import find_neighbours
    from .evaluate.neighbours_report import neighbours_figure, write_outputs

    imagenet = imagenet_weights_cached("alex")
    if not imagenet:
        print("demo: torchvision's ImageNet AlexNet is not on this machine; the neighbour figure uses LPIPS "
              "with a seeded random backbone (labelled as such)")
    dataset = load_image_dataset(train_data_dir=config.train_data_dir)
    report = find_neighbours(samples, [f"{i:05d}.png" for i in range(len(samples))], dataset,
                             resolution=config.resolution, k=4, random_backbone=not imagenet,
                             batch_size=32, num_reference=len(dataset), seed=config.seed or 0, progress=False)
    for line in write_outputs(report, None, str(run_dir / NEIGHBOURS_TABLE), str(run_dir)):
        print(f"demo: {line}")
    return neighbours_figure(report, max_rows=6)


def overview(panels: list[tuple[str, Image.Image]], gap: int = 16) -> Image.Image:
    """The captioned figures one under the other, on white.

    Each caption's height and width are measured with the font it is drawn
    in: the canvas is wide enough for the longest caption, and each figure
    starts below its caption, whatever the model's image size.
    """
    from PIL import ImageDraw

    from .sample.figures import caption_font, text_size

    font = caption_font()
    sizes = [text_size(caption, font) for caption, _ in panels]
    width = max(max(image.width, text_width) for (_, image), (text_width, _) in zip(panels, sizes)) + 2 * gap
    height = sum(image.height + text_height + gap // 2 + gap for (_, image), (_, text_height) in zip(panels, sizes))
    canvas = Image.new("RGB", (width, height + gap), "white")
    draw = ImageDraw.Draw(canvas)
    y = gap
    for (caption, image), (_, text_height) in zip(panels, sizes):
        draw.text((gap, y), caption, fill="black", font=font)
        y += text_height + gap // 2
        canvas.paste(image, (gap, y))
        y += image.height + gap
    return canvas
