"""Training images: a Hub dataset or a local folder → one preprocessing → a DataLoader.

Every image the project feeds to a model (training, interpolation inputs,
neighbour search) goes through the same functions (`ImagePreprocessor` here,
`preprocess` in the interpolation pipeline file, which both build on), so a
model never sees two different resizings of the same photo.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from accelerate.utils import gather_object
from PIL import Image

from .pipelines.ddpm_interpolation import crop_square, open_rgb, resize_shorter_side, to_tensor

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


# What PIL raises for a truncated, corrupt or absurdly large file: such an image is skipped and counted.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DatasetUnavailableError(RuntimeError):
    """The requested dataset cannot be loaded (no network, unknown repo, wrong column)."""


# ---------------------------------------------------------------- preprocessing
# The image functions live in the interpolation pipeline file, which must stand
# alone for users who load it with `custom_pipeline=`; training uses the same
# functions, so training data and interpolation inputs are prepared identically.


@dataclass
class ImagePreprocessor:
    """RGB → shorter side resized to `resolution` → crop → optional flip → CHW float in [-1, 1].

    Random choices (crop offset, flip) are drawn from `generator`, or from
    torch's global RNG without one.
    """

    resolution: int
    center_crop: bool = True
    random_flip: bool = False

    def __call__(self, source: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        image = resize_shorter_side(open_rgb(source, self.resolution), self.resolution)
        if self.center_crop:
            image = crop_square(image, self.resolution)
        else:
            left = int(torch.randint(0, image.width - self.resolution + 1, (), generator=generator))
            top = int(torch.randint(0, image.height - self.resolution + 1, (), generator=generator))
            image = crop_square(image, self.resolution, left, top)
        if self.random_flip and torch.rand((), generator=generator) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(image)


# ---------------------------------------------------------------- sources


def check_hub_dataset_reachable(dataset_name: str) -> None:
    """Fail in a fraction of a second, with a useful message, when the Hub can't be reached.

    `datasets.load_dataset` retries for ~25 s before giving up with a generic
    error. In offline mode (HF_HUB_OFFLINE=1) the check is skipped, so a cached
    copy of the dataset still loads.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return
    try:
        HfApi().dataset_info(dataset_name, timeout=10)
    except RepositoryNotFoundError as error:
        raise DatasetUnavailableError(
            f"dataset {dataset_name!r} was not found on the Hugging Face Hub (or needs a token: "
            "`hf auth login` or HF_TOKEN). To train on local images use --train_data_dir DIR."
        ) from error
    except HfHubHTTPError:
        return  # reachable; let `datasets` report anything more specific
    except Exception as error:  # connection refused, DNS failure, timeout, proxy
        raise DatasetUnavailableError(
            f"cannot reach the Hugging Face Hub to load dataset {dataset_name!r} ({type(error).__name__}: "
            f"{error}). Without network access, train on a local folder of images with --train_data_dir DIR, "
            "or set HF_HUB_OFFLINE=1 to use a copy already in the datasets cache."
        ) from error


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    image_column: str = "image",
    streaming: bool = False,
    cache_dir: str | None = None,
    max_train_samples: int | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """The training split with one column, `image`, left undecoded ({"bytes", "path"} dicts).

    `train_data_dir` wins over `dataset_name`: it is read with 🤗 datasets'
    `imagefolder` builder, which walks sub-folders to any depth; sub-folder
    names are not turned into labels.
    """
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise DatasetUnavailableError(f"--train_data_dir {train_data_dir!r} is not a directory")
        if not any(walk_images(train_data_dir)):
            raise DatasetUnavailableError(
                f"--train_data_dir {train_data_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        dataset = datasets.load_dataset(
            "imagefolder", data_dir=train_data_dir, split="train", drop_labels=True,
            drop_metadata=True, cache_dir=cache_dir, streaming=streaming,
        )
        image_column = "image"
    elif dataset_name is not None:
        check_hub_dataset_reachable(dataset_name)
        try:
            dataset = datasets.load_dataset(
                dataset_name, dataset_config_name, split="train", streaming=streaming, cache_dir=cache_dir
            )
        except ConnectionError as error:
            raise DatasetUnavailableError(
                f"could not load {dataset_name!r}: {error}. Use --train_data_dir DIR for local images."
            ) from error
    else:
        raise DatasetUnavailableError("give --dataset_name (a Hub dataset) or --train_data_dir (a local folder)")

    columns = dataset.column_names or []
    if columns and image_column not in columns:
        raise DatasetUnavailableError(
            f"--image_column {image_column!r} is not a column of the dataset; its columns are {columns}"
        )
    dataset = dataset.select_columns([image_column])
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    if max_train_samples is not None:
        if streaming:
            dataset = dataset.take(max_train_samples)
        else:
            dataset = dataset.select(range(min(max_train_samples, len(dataset))))
    return dataset


def walk_images(root: str):
    """Paths of the image files under `root`, at any depth."""
    for directory, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.join(directory, name)


# ---------------------------------------------------------------- torch datasets


def describe_image_source(source: Any) -> str:
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return "<in-memory image>"


MAX_CONSECUTIVE_UNREADABLE = 100


def too_many_unreadable(where: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(f"{MAX_CONSECUTIVE_UNREADABLE} unreadable images in a row {where}")


def augmentation_generator(seed: int, epoch: int, *position: int) -> torch.Generator:
    """The generator of the random crop and flip of the item at `position` in `epoch`.

    `position` is an item's index in a map-style dataset, or (DataLoader
    worker, index in that worker's stream) for a streamed one. The draws depend
    on nothing else: not on the process or DataLoader worker that decodes the
    item, and not on the global RNG, which also draws the noise. accelerate's
    DataLoader reads one batch ahead, so a checkpoint's RNG state already holds
    the next batch's draws; a resumed run that drew that batch's flips from it
    again would flip other images and shift all later noise.
    """
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, *position]).generate_state(1)[0]))


class PreprocessedImages(torch.utils.data.Dataset):
    """A map-style 🤗 dataset, decoded and preprocessed on access.

    An image that cannot be decoded is skipped: a warning names it, and the
    next image takes its place, so every process still gets full, equally
    sized batches (a short batch on one DDP rank would stall the others).
    `set_epoch` gives each epoch new random crops and flips.
    """

    def __init__(self, dataset: datasets.Dataset, preprocess: ImagePreprocessor, seed: int = 0):
        self.dataset = dataset
        self.preprocess = preprocess
        self.seed = seed
        self.epoch = 0
        self.num_skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = augmentation_generator(self.seed, self.epoch, index)
        for offset in range(MAX_CONSECUTIVE_UNREADABLE):
            source = self.dataset[(index + offset) % len(self.dataset)]["image"]
            try:
                return {"pixel_values": self.preprocess(source, generator)}
            except UNREADABLE_IMAGE_ERRORS as error:
                self.num_skipped += 1
                logger.warning("skipping unreadable image %s (%s)", describe_image_source(source), error)
        raise too_many_unreadable(f"near index {index}")


class PreprocessedStream(torch.utils.data.IterableDataset):
    """A streamed 🤗 dataset, decoded and preprocessed as it arrives, that resumes where training stopped.

    Unreadable images are skipped, counted and named in a warning, as in
    `PreprocessedImages`; 100 in a row stop the run.

    Each item carries its place in the stream: `stream_worker` (the DataLoader
    worker that read it; 0 without workers) and `stream_position` (its index in
    that worker's share of this epoch's shuffled stream). Its crop and flip are
    drawn from `augmentation_generator(seed, epoch, worker, position)`. The
    training loop `record`s each batch it trains on; `state_dict()` is then the
    epoch and, per worker, the position after the last trained item (not after
    the batch accelerate has already read ahead). A stream given that state by
    `load_state_dict` passes over the items before it without decoding them, so
    a resumed run trains on exactly the items, crops and flips that the
    uninterrupted run would have. (With several workers each resumes its own
    share exactly, but the DataLoader starts its round of workers again at
    worker 0, so batches may come in another interleaving; a worker shuffles
    its share in another order than the main process, so a run is resumed with
    the `--dataloader_num_workers` it was started with.)

    🤗 datasets' own `IterableDataset.state_dict()` cannot do this: it does not
    hold the content of the shuffle buffer, and a stream restored from it
    refills the buffer from the data that follows (its `load_state_dict` warns
    so), which changes which images come next and in what order. Passing over
    the items re-reads them from the start of the epoch, undecoded: cheap for
    local files, a second download of that part of the epoch for a Hub stream.
    """

    def __init__(self, stream: datasets.IterableDataset, preprocess: ImagePreprocessor, seed: int = 0):
        self.stream = stream
        self.preprocess = preprocess
        self.seed = seed
        self.num_skipped = 0
        self.epoch = 0
        self.start: dict[int, int] = {}  # worker → items of this epoch to pass over (a resumed run)
        self.trained: dict[int, int] = {}  # worker → items of this epoch the recorded batches went up to
        self.pending: list[torch.Tensor] = []  # (worker, last position) of recorded batches, not yet read

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a new epoch starts at its beginning (accelerate also re-sets the current one)
            self.start, self.trained, self.pending = {}, {}, []
        self.epoch = epoch
        self.stream.set_epoch(epoch)  # a new shuffle order

    def record(self, batch: dict[str, torch.Tensor]) -> None:
        """Note that `batch` was trained on: a checkpoint taken now resumes after it."""
        # A batch comes from one worker, in stream order. Its tensors may be on the GPU: reading them now
        # would wait for the GPU at every micro-batch, so they are read in bulk, now and then.
        self.pending.append(torch.stack([batch["stream_worker"][-1], batch["stream_position"][-1]]))
        if len(self.pending) == 64:
            self._read_pending()

    def _read_pending(self) -> None:
        if self.pending:
            for worker, position in torch.stack(self.pending).tolist():
                self.trained[worker] = max(self.trained.get(worker, 0), position + 1)
            self.pending = []

    def state_dict(self) -> dict:
        """The epoch and, per worker, the position after the items trained on by any process.

        accelerate writes this object's state from the main process only, so
        every process's record is gathered here (each process calls it).
        """
        self._read_pending()
        positions: dict[int, int] = {}
        for trained in gather_object([self.trained]):
            for worker, position in trained.items():
                positions[worker] = max(positions.get(worker, 0), position)
        return {"epoch": self.epoch, "positions": positions}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"])
        self.start, self.trained, self.pending = dict(state["positions"]), dict(state["positions"]), []

    def __iter__(self):
        worker_info = torch.utils.data.get_worker_info()
        worker = 0 if worker_info is None else worker_info.id
        start = self.start.get(worker, 0)
        in_a_row = 0
        for position, example in enumerate(self.stream):
            if position < start:
                continue  # trained on before this run was resumed
            generator = augmentation_generator(self.seed, self.epoch, worker, position)
            try:
                pixel_values = self.preprocess(example["image"], generator)
            except UNREADABLE_IMAGE_ERRORS as error:
                self.num_skipped += 1
                in_a_row += 1
                logger.warning("skipping unreadable image %s (%s)", describe_image_source(example["image"]), error)
                if in_a_row == MAX_CONSECUTIVE_UNREADABLE:
                    raise too_many_unreadable("in the stream") from error
                continue
            in_a_row = 0
            yield {"pixel_values": pixel_values, "stream_worker": worker, "stream_position": position}


def make_training_dataset(
    dataset: datasets.Dataset | datasets.IterableDataset,
    preprocess: ImagePreprocessor,
    seed: int | None = None,
    shuffle_buffer_size: int = 10_000,
) -> torch.utils.data.Dataset:
    """Wrap a 🤗 dataset so that items are `{"pixel_values": float tensor (3, H, W)}` (plus, for a stream,
    the item's place in it).

    The shuffle's seed is `seed` (0 if None), never a random one: a resumed
    stream must shuffle as the interrupted one did, and every process alike.
    """
    if isinstance(dataset, datasets.IterableDataset):
        shuffled = dataset.shuffle(seed=seed or 0, buffer_size=shuffle_buffer_size)
        return PreprocessedStream(shuffled, preprocess, seed or 0)
    return PreprocessedImages(dataset, preprocess, seed or 0)


def make_dataloader(
    dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """Full micro-batches only (`drop_last`): the paper's batch size is part of the recipe."""
    is_map_style = not isinstance(dataset, torch.utils.data.IterableDataset)
    if is_map_style and len(dataset) < batch_size:
        raise DatasetUnavailableError(
            f"the dataset has {len(dataset)} images, fewer than one micro-batch (--train_batch_size {batch_size})"
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=is_map_style,
        drop_last=True,
        num_workers=num_workers,
        # Workers are started anew each epoch, with the dataset's current epoch (its crops and flips).
        persistent_workers=False,
        # Every `iter()` draws a seed for the workers (even with none) from this generator; drawn from
        # the global RNG instead, it would shift the noise of a resumed run, which starts a fresh iterator.
        generator=torch.Generator(),
    )
