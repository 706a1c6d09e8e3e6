"""The neighbour figure (the paper's Fig. 4 with numbers), CSV, neighbours.json, and `lsun-ddpm neighbours`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image

from ..files import write_text
from ..layout import CONFIG_FILE, NEIGHBOURS_FIGURE, UNET
from .neighbours import NeighbourReport, find_neighbours

def summary_dict(report: NeighbourReport) -> dict:
    """neighbours.json: settings, sizes searched, the verdict, and every sample's neighbours."""
    verdict, result = report.verdict, report.result
    n = len(report.sample_names)
    note = (f"Exact LPIPS ({report.settings['net']} backbone, {report.settings['backbone']}) search over all "
            f"{result.num_searched:,} training images at {report.settings['resolution']} px: "
            f"{verdict['num_flagged']} of {n} samples are closer to a training image than 99% of "
            f"{len(result.reference_indices):,} real training images are to their nearest other one "
            f"(median percentile of the samples: {verdict['median_percentile']:.0f}).")
    rows = list(report.rows())
    return {
        "note": note,
        **report.settings,
        "num_samples": n,
        "num_training_images_searched": result.num_searched,
        "num_unreadable_images_skipped": result.num_skipped,
        "num_reference_queries": len(result.reference_indices),
        "reference_nearest_distance": {"p1": finite_or_none(verdict["threshold"]),
                                       "median": finite_or_none(verdict["reference_median_distance"])},
        "copy_threshold": finite_or_none(verdict["threshold"]),
        "num_flagged": verdict["num_flagged"],
        "median_percentile": finite_or_none(verdict["median_percentile"]),
        "samples": [
            {"sample": name, "percentile": finite_or_none(percentile), "possible_copy": bool(flag),
             "neighbours": [{"rank": r, "neighbour": nb, "distance": d} for s, r, nb, d in rows if s == name]}
            for name, percentile, flag in zip(report.sample_names, verdict["percentiles"], verdict["flagged"])
        ],
    }


def write_csv(report: NeighbourReport, path: str | os.PathLike) -> None:
    import csv
    import io

    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["sample", "rank", "neighbour", "distance"])
    for name, rank, neighbour, distance in report.rows():
        writer.writerow([name, rank, neighbour, f"{distance:.6f}"])
    write_text(text.getvalue(), path)


def write_json(data: dict, path: str | os.PathLike) -> None:
    write_text(json.dumps(data, indent=2, allow_nan=False), path)


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: an undefined number (no reference images, no spread) is written as null."""
    return float(value) if value is not None and math.isfinite(value) else None


def neighbours_figure(report: NeighbourReport, min_cell: int = 96, max_rows: int | None = None) -> Image.Image:
    """The paper's Fig. 4 with numbers: a row per sample, the sample then its neighbours, LPIPS under each.

    Small images are magnified (NEAREST) to at least `min_cell` px so the
    captions fit; a sample flagged as a possible copy is framed in red. The
    header summarises all samples, also when only `max_rows` are drawn.
    """
    from PIL import ImageDraw

    from ..sample.sampling import to_pil

    summary = summary_dict(report)
    scale = max(1, math.ceil(min_cell / report.samples.shape[-1]))
    cell, caption, gap = report.samples.shape[-1] * scale, 14, 10
    header = _wrap(summary["note"], max(40, (cell + 2) * (report.settings["k"] + 1) // 6))
    top = 14 * len(header) + 20
    width = gap + cell + gap * 2 + (cell + 2) * report.settings["k"]
    rows = len(report.sample_names) if max_rows is None else min(max_rows, len(report.sample_names))
    height = top + (cell + caption + 4) * rows
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for line_number, line in enumerate(header):
        draw.text((gap, 4 + 14 * line_number), line, fill="black")
    draw.text((gap, top - 14), "sample", fill="black")
    draw.text((gap * 3 + cell, top - 14), f"its {report.settings['k']} nearest training images (LPIPS)", fill="black")
    for row, (name, indices, distances, flagged) in enumerate(zip(
            report.sample_names, report.result.sample_indices.tolist(), report.result.sample_distances.tolist(),
            report.verdict["flagged"])):
        if row == rows:
            break
        y = top + row * (cell + caption + 4)
        canvas.paste(to_pil(report.samples[row:row + 1])[0].resize((cell, cell), Image.NEAREST), (gap, y))
        if flagged:
            draw.rectangle((gap - 3, y - 3, gap + cell + 2, y + cell + 2), outline="red", width=3)
        draw.text((gap, y + cell + 1), ("possible copy" if flagged else _shorten(name, cell)),
                  fill="red" if flagged else "black")
        for column, (index, distance) in enumerate(zip(indices, distances)):
            if not math.isfinite(distance):
                continue
            x = gap * 3 + cell + column * (cell + 2)
            thumbnail = to_pil(report.thumbnails[index][None])[0].resize((cell, cell), Image.NEAREST)
            canvas.paste(thumbnail, (x, y))
            draw.text((x, y + cell + 1), f"{distance:.3f}", fill="black")
    return canvas


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width)


def _shorten(name: str, pixels: int) -> str:
    limit = max(4, pixels // 6)
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


DATA_FIELDS = ("dataset_name", "dataset_config_name", "image_column", "train_data_dir", "max_train_samples",
               "streaming", "cache_dir")


def run_neighbours_command(args) -> None:
    """`lsun-ddpm neighbours`: samples (a folder, or generated), the search, then figure, CSV and JSON.

    Under `accelerate launch` the samples and the dataset pass are shared
    between the processes; the main process writes the outputs.
    """
    from accelerate import Accelerator

    from ..data.sources import load_image_dataset
    from .lpips_features import check_lpips_resolution

    accelerator = Accelerator()
    data = data_options(args)
    resolution = args.resolution or model_resolution(args.model or args.run_dir) or 128
    check_lpips_resolution(args.net, resolution)  # find_neighbours checks it too, but only after the samples are made
    if args.model:
        names, samples = generate_samples(args, accelerator)
    else:
        names, samples = read_sample_folder(args.samples)
    with accelerator.main_process_first():
        dataset = load_image_dataset(**data)
    report = find_neighbours(
        samples, names, dataset, resolution=resolution, k=args.k, net=args.net, lpips_weights=args.lpips_weights,
        random_backbone=args.random_backbone, batch_size=args.batch_size, feature_cache=args.feature_cache,
        num_reference=args.num_reference, seed=args.seed, label_by_path=data["train_data_dir"] is not None,
        dataset_identity=data, num_workers=args.dataloader_num_workers, accelerator=accelerator,
    )
    if accelerator.is_main_process:
        for line in write_outputs(report, args.out, args.csv, args.run_dir):
            print(line)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # ends the process group: a worker exiting with it alive may abort in gloo's threads


def write_outputs(report: NeighbourReport, out: str | None, csv_path: str | None, run_dir: str | None) -> list[str]:
    """Write the figure (+ neighbours.json beside it), the CSV, and the run folder's copies; say what was written."""
    from ..files import save_image

    summary = summary_dict(report)
    figure = neighbours_figure(report)
    targets = [Path(run_dir) / NEIGHBOURS_FIGURE] if run_dir else []
    if out or not run_dir:
        targets.append(Path(out or NEIGHBOURS_FIGURE))
    for path in targets:
        save_image(figure, path)
        write_json(summary, path.with_suffix(".json"))
    if csv_path:
        write_csv(report, csv_path)
    written = ", ".join(str(p) for p in targets + ([Path(csv_path)] if csv_path else []))
    return [summary["note"], f"wrote {written} (and .json beside each figure)"]


def data_options(args) -> dict:
    """The dataset flags, or, when none is given, those of the run folder's `training_config.yaml`."""
    options = {name: getattr(args, name) for name in DATA_FIELDS}
    if options["dataset_name"] or options["train_data_dir"]:
        return options
    for folder in (args.run_dir, args.model):
        config_file = Path(folder) / CONFIG_FILE if folder else None
        if config_file is not None and config_file.is_file():
            from ..train.parsing import read_config_file

            saved = read_config_file(str(config_file))
            return {name: saved.get(name, options[name]) for name in DATA_FIELDS}
    from ..errors import DatasetUnavailableError

    raise DatasetUnavailableError("give the training data: --dataset_name (a Hub dataset) or --train_data_dir "
                                  "(a local folder), or --run_dir of a run whose training_config.yaml names it")


def model_resolution(model: str | None) -> int | None:
    """The U-Net's sample_size of a local pipeline folder or a Hub repo; None when there is none."""
    if not model:
        return None
    from diffusers import UNet2DModel

    try:
        return int(UNet2DModel.load_config(model, subfolder=UNET)["sample_size"])
    except (OSError, ValueError, KeyError):
        return None


def read_sample_folder(folder: str) -> tuple[list[str], list[Path]]:
    """The image files of `folder` (any depth), sorted, named by their path inside it."""
    from ..data.sources import IMAGE_EXTENSIONS, walk_images

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--samples {folder!r} is not a folder")
    paths = sorted(Path(path) for path in walk_images(folder))
    if not paths:
        raise FileNotFoundError(f"--samples {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [str(p.relative_to(root)) for p in paths], paths


def generate_samples(args, accelerator) -> tuple[list[str], list[Image.Image]]:
    """`--num_samples` images from MODEL, image i from (seed, i) as `lsun-ddpm sample` makes them.

    Each process generates its share of the indices; the shares are gathered
    in index order, so the samples do not depend on the number of processes.
    """
    from accelerate.utils import gather_object

    from ..sample.sampling import SamplingPlan, check_inference_steps, choose_sampler, generate
    from ..sample.loading import load_scheduler_config, load_unet

    config = load_scheduler_config(args.model)
    scheduler, steps = choose_sampler(args.model, args.scheduler, args.num_inference_steps)
    plan = SamplingPlan(scheduler, steps, args.batch_size, args.bf16)
    check_inference_steps(plan, config)  # before the weights are loaded
    unet = load_unet(args.model, args.weights).to(accelerator.device)
    with accelerator.split_between_processes(list(range(args.num_samples))) as mine:
        images = generate(unet, config, len(mine), args.seed, plan, first_index=mine[0]) if mine else []
    shares = gather_object([images]) if accelerator.num_processes > 1 else [images]
    return [f"{i:05d}.png" for i in range(args.num_samples)], [image for share in shares for image in share]
