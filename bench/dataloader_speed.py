"""Images per second the training DataLoader delivers: decoding 256-px files per step against a prepared dataset.

    python bench/dataloader_speed.py --num_images 512 --json bench-dataloader.json

Writes `--num_images` 256-px images (windows cut at random from the colour
photos scikit-image ships, so no download; 256 × 256–341 like LSUN's shorter
side of 256) as JPEG and as WebP, prepares the JPEGs with `lsun-ddpm prepare`'s
function, then reads each through training's own dataset and DataLoader
(`make_training_dataset`/`load_prepared_images`, `make_dataloader`, centre
crop, random flip) at 128 px with 0 (the main process), 1 and 2 workers, and
converts each batch to the model's float input as the training loop does
(`to_model_input`, channels_last). The last rows read datasets of ready-made
zero tensors: what the DataLoader itself costs to hand over batches from its
workers, the ceiling of any dataset read through workers: uint8 batches made
whole (as the prepared dataset makes them), training's uint8 items collated
one by one (as the decoding paths hand them over), and float32 items. A
configuration is read for whole epochs until `--seconds` have passed, an
epoch being the images repeated to `--epoch_images` items; each epoch's first batch is left out of
the rate (worker start-up, which a 3M-image LSUN epoch amortises). Beside
the rate it gives the main thread's CPU time per image (reading in the main
process, or taking batches over from workers, plus the conversion): on a GPU
that thread also launches the model's kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lsun_ddpm.data.preprocessing import ImagePreprocessor, to_model_input
from lsun_ddpm.data.sources import load_image_dataset
from lsun_ddpm.data.datasets import make_dataloader, make_training_dataset
from lsun_ddpm.data.prepare import SourceOptions, prepare_dataset
from lsun_ddpm.data.prepared import load_prepared_images

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")


def write_test_images(folder: Path, count: int, seed: int = 0) -> dict[str, Path]:
    """`count` 256-px windows of scikit-image's photos, each as JPEG (quality 90) and WebP (quality 80)."""
    from skimage import data as skimage_data

    photos = [Image.fromarray(getattr(skimage_data, name)()).convert("RGB") for name in PHOTOS]
    rng = np.random.default_rng(seed)
    folders = {"JPEG": folder / "jpeg", "WebP": folder / "webp"}
    for path in folders.values():
        path.mkdir(parents=True)
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = 256, int(rng.integers(256, 342))
        if rng.random() < 0.5:
            width, height = height, width
        smallest = max(width / photo.width, height / photo.height)  # the window must fit in the photo
        scale = rng.uniform(smallest, max(smallest, 1.0))
        window = (min(round(width / scale), photo.width), min(round(height / scale), photo.height))
        left = int(rng.integers(0, photo.width - window[0] + 1))
        top = int(rng.integers(0, photo.height - window[1] + 1))
        image = photo.crop((left, top, left + window[0], top + window[1])).resize((width, height), Image.BICUBIC)
        image.save(folders["JPEG"] / f"{index:05d}.jpg", quality=90)
        image.save(folders["WebP"] / f"{index:05d}.webp", quality=80)
    return folders


class ZeroImages(torch.utils.data.Dataset):
    """Items that cost nothing to make: what is left is the DataLoader's own cost. uint8 (H, W, 3) zeros
    are training's item format, handed over as training's are (`preprocess` gives their size); float32
    (3, H, W) zeros the format it had before, four times the bytes, through torch's hand-over."""

    def __init__(self, count: int, resolution: int, dtype: torch.dtype):
        self.count, self.resolution, self.dtype = count, resolution, dtype
        if dtype == torch.uint8:
            self.preprocess = ImagePreprocessor(resolution)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.dtype == torch.uint8:
            return {"pixels": torch.zeros(self.resolution, self.resolution, 3, dtype=torch.uint8)}
        return {"pixel_values": torch.zeros(3, self.resolution, self.resolution)}


class ZeroBatches(ZeroImages):
    """uint8 zeros made a whole (B, H, W, 3) batch at a time, as a prepared dataset hands its batches over
    (`PreparedImages.__getitems__`): no collating, one tensor to share."""

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {"pixels": torch.zeros(len(indices), self.resolution, self.resolution, 3, dtype=torch.uint8)}


class RepeatedImages(torch.utils.data.Dataset):
    """`dataset`'s items again and again, to `length` items: epochs as long as a real dataset's, so that
    starting a DataLoader's workers (each epoch) does not weigh in as it would with a 512-image epoch."""

    def __init__(self, dataset: torch.utils.data.Dataset, length: int):
        self.dataset, self.length = dataset, length

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.dataset[index % len(self.dataset)]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]] | dict[str, torch.Tensor]:
        wrapped = [index % len(self.dataset) for index in indices]
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__(wrapped)
        return [self.dataset[index] for index in wrapped]


def model_input(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float batch the model gets, converted as the training loop converts it (channels_last, as with bf16)."""
    if "pixels" in batch:
        return to_model_input(batch["pixels"], torch.channels_last)
    return batch["pixel_values"].contiguous(memory_format=torch.channels_last)


def read_rates(dataset: torch.utils.data.Dataset, batch_size: int, workers: int, seconds: float
               ) -> tuple[float, float]:
    """Steady-state images/s from training's DataLoader over whole epochs (first batch of each left out), and
    the main thread's CPU time per image (µs): what the data costs the thread that would drive a GPU."""
    images, elapsed, main_thread, epoch = 0, 0.0, 0.0, 0
    while elapsed < seconds:
        dataset.set_epoch(epoch)
        batches = iter(make_dataloader(dataset, batch_size, workers))
        next(batches)
        started, started_cpu = time.perf_counter(), time.thread_time()
        for batch in batches:
            images += model_input(batch).shape[0]
        elapsed += time.perf_counter() - started
        main_thread += time.thread_time() - started_cpu
        epoch += 1
    return images / elapsed, main_thread / images * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8, help="the paper's micro-batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seconds", type=float, default=5.0, help="reading time per configuration")
    parser.add_argument("--epoch_images", type=int, default=16384,
                        help="items per epoch, the images repeated (workers start again each epoch)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(1)

    preprocess = ImagePreprocessor(args.resolution, center_crop=True, random_flip=True)
    with tempfile.TemporaryDirectory() as scratch:
        folders = write_test_images(Path(scratch), args.num_images)
        started = time.perf_counter()
        prepare_dataset(SourceOptions(train_data_dir=str(folders["JPEG"])),
                        ImagePreprocessor(args.resolution, center_crop=True), str(Path(scratch) / "prepared"))
        prepare_rate = args.num_images / (time.perf_counter() - started)
        sources = {f"256-px {kind} decoded per step": make_training_dataset(
                       load_image_dataset(train_data_dir=str(folder)), preprocess, seed=0)
                   for kind, folder in folders.items()}
        sources["prepared dataset (memory-mapped uint8)"] = load_prepared_images(
            str(Path(scratch) / "prepared"), preprocess, seed=0)
        sources["ready-made uint8 zeros, whole batches (the prepared path's transfer ceiling)"] = ZeroBatches(
            args.num_images, args.resolution, torch.uint8)
        sources["ready-made uint8 zeros, item by item (transfer ceiling)"] = ZeroImages(args.num_images,
                                                                                        args.resolution, torch.uint8)
        sources["ready-made float32 zeros (the former item format)"] = ZeroImages(args.num_images, args.resolution,
                                                                                  torch.float32)

        print(f"{args.num_images} images, {args.resolution} px, batch {args.batch_size}, torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs; prepare (1 process, including loading the folder): {prepare_rate:.0f} images/s")
        print("| source | workers | images/s | images/s per worker | main thread's CPU µs per image |\n"
              "|---|---|---|---|---|")
        results = {"num_images": args.num_images, "epoch_images": args.epoch_images, "resolution": args.resolution,
                   "batch_size": args.batch_size, "prepare_images_per_second": prepare_rate, "rows": []}
        for name, dataset in sources.items():
            for workers in args.workers:
                rate, main_thread_us = read_rates(RepeatedImages(dataset, args.epoch_images), args.batch_size,
                                                  workers, args.seconds)
                results["rows"].append({"source": name, "workers": workers, "images_per_second": rate,
                                        "main_thread_cpu_us_per_image": main_thread_us})
                per_worker = f"{rate / workers:.0f}" if workers else "-"
                print(f"| {name} | {workers} | {rate:.0f} | {per_worker} | {main_thread_us:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
