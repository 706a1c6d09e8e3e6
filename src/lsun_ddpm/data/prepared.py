"""Reading a prepared dataset (`lsun-ddpm prepare`): its metadata, its checks, its batches read from mapped files."""

from __future__ import annotations

import bisect
import json
import logging
import os
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch

from ..errors import InputError
from .datasets import AugmentedImages
from .preprocessing import ImagePreprocessor, augmentation_generator

logger = logging.getLogger(__name__)

METADATA_FILE = "prepared_dataset.json"
SHARDS_FOLDER = "shards"
FORMAT = "lsun-ddpm prepared dataset"
FORMAT_VERSION = 1

FEATURES = datasets.Features({
    "pixels": datasets.Value("binary"),
    "height": datasets.Value("int32"),
    "width": datasets.Value("int32"),
    "source": datasets.Value("string"),
})


def is_prepared_dataset(folder: str | None) -> bool:
    return folder is not None and os.path.isfile(os.path.join(folder, METADATA_FILE))


def read_prepared_metadata(folder: str) -> dict[str, Any]:
    """The metadata of a complete prepared dataset (an unfinished one is refused)."""
    metadata = json.loads(Path(folder, METADATA_FILE).read_text())
    if not metadata.get("complete"):
        raise InputError(f"--train_data_dir {folder!r} is an unfinished prepared dataset: rerun `lsun-ddpm "
                         "prepare` with the flags it was started with to finish it")
    return metadata


def check_preprocessing(folder: str, recorded: dict[str, Any], preprocess: ImagePreprocessor) -> None:
    """Refuse a prepared dataset made with another resolution, crop mode or minimum image size than the run's."""
    wanted = {"resolution": preprocess.resolution, "center_crop": preprocess.center_crop,
              "min_image_size": preprocess.min_image_size}
    for key, value in wanted.items():
        if recorded[key] != value:
            raise InputError(
                f"--train_data_dir {folder!r} was prepared with {key} {recorded[key]}, but this run uses {key} "
                f"{value}: train with --{key} {recorded[key]}, or prepare the images again with "
                f"{_prepare_flag(key, value)}")


def _prepare_flag(key: str, value: Any) -> str:
    """`lsun-ddpm prepare`'s flag for a setting: its crop mode is a switch, not a value."""
    if key == "center_crop":
        return "--center_crop" if value else "--no_center_crop"
    return f"--{key} {value}"


def load_prepared_images(folder: str, preprocess: ImagePreprocessor, seed: int | None = 0,
                         max_train_samples: int | None = None) -> "PreparedImages":
    """The training dataset of a prepared folder, checked against the run's preprocessing; its crops and flips
    are drawn from `seed` (0 if None), as `data.make_training_dataset` draws them from decoded images."""
    metadata = read_prepared_metadata(folder)
    check_preprocessing(folder, metadata["preprocessing"], preprocess)
    table = datasets.table.concat_tables([
        datasets.table.MemoryMappedTable.from_file(str(Path(folder, SHARDS_FOLDER, shard["file"])))
        for shard in metadata["shards"]
    ])
    if max_train_samples is not None:
        table = table.slice(0, min(max_train_samples, len(table)))
    logger.info("prepared dataset %s: %d images (%d skipped and %d upscaled when it was prepared)", folder,
                len(table), metadata["images_skipped"], metadata["images_upscaled"])
    return PreparedImages(table, preprocess, seed or 0)


class PreparedImages(AugmentedImages):
    """A prepared dataset as training batches: `{"pixels": uint8 (B, H, W, 3)}`, the batch of
    `data.PreprocessedImages`'s items, with the same crops and flips.

    The Arrow files are memory-mapped, so DataLoader workers share the page
    cache instead of each holding a copy. A batch is read whole
    (`__getitems__`, which the DataLoader calls with a batch's indices): its
    images are views of the mapped files (`PixelColumn`), copied once, into
    the batch, and the random flip (and, with `--no_center_crop`, the random
    crop) is drawn per image from `augmentation_generator(seed, epoch, index)`
    as in `data.PreprocessedImages`. One DataLoader worker is enough.
    """

    def __init__(self, table: datasets.table.Table, preprocess: ImagePreprocessor, seed: int = 0):
        super().__init__(datasets.Dataset(table), preprocess, seed)
        self.pixels = PixelColumn(table)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixels": self.__getitems__([index])["pixels"][0]}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        images = [self.pixels.image(index) for index in indices]
        generators = [augmentation_generator(self.seed, self.epoch, index) for index in indices]
        return {"pixels": self.preprocess.augment_batch(images, generators)}


class PixelColumn:
    """The images of a prepared dataset as read-only numpy views of its memory-mapped Arrow files.

    🤗 datasets' own batch read (`dataset[indices]`) copies each image out of
    the page cache into a Python `bytes` and formats the batch, which took
    most of a DataLoader worker's time per batch; a view is nearly free and the
    batch is copied once (docs/performance.md). Pickled (to a spawned DataLoader worker) as its table,
    which 🤗 datasets pickles as the files' paths (and the slice taken of
    them), never as the pixels.
    """

    def __init__(self, table: datasets.table.Table):
        self.table = table
        self.starts, self.batches = [], []
        start = 0
        for batch in table.to_batches():
            self.starts.append(start)
            self.batches.append((*binary_views(batch.column("pixels")), batch.column("height").to_numpy(),
                                 batch.column("width").to_numpy()))
            start += len(batch)
        self.length = start

    def image(self, index: int) -> np.ndarray:
        """Image `index`, uint8 (height, width, 3), a view of the mapped file."""
        if not 0 <= index < self.length:
            raise IndexError(f"image {index} of a prepared dataset of {self.length}")
        batch = bisect.bisect_right(self.starts, index) - 1
        row = index - self.starts[batch]
        offsets, values, heights, widths = self.batches[batch]
        return values[offsets[row]:offsets[row + 1]].reshape(heights[row], widths[row], 3)

    def __reduce__(self):
        return PixelColumn, (self.table,)


def binary_views(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A binary Arrow array as numpy views: its values' offsets (one more than its length: value i is
    `data[offsets[i]:offsets[i + 1]]`) and the data buffer they index, which a slice of an array shares."""
    validity, offsets, data = array.buffers()
    offset_type = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    offsets = np.frombuffer(offsets, dtype=offset_type)[array.offset:array.offset + len(array) + 1]
    return offsets, np.frombuffer(data, dtype=np.uint8)
