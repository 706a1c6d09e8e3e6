"""Training images: a Hub dataset, a local folder or an LSUN LMDB → one preprocessing → a DataLoader.

Every image the project feeds to a model (training, interpolation inputs,
neighbour search) goes through the same functions (`ImagePreprocessor` here,
`preprocess` in the interpolation pipeline file, which both build on), so a
model never sees two different resizings of the same photo.

An image that cannot be used as it is (unreadable, too small) is skipped or
upscaled, and the item that takes its place carries a note saying so
(`image_notes`), so that the training process learns of it even when the image
was decoded in a DataLoader worker or on another accelerate process; the run's
`ImageReport` adds the notes up.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import datasets
import numpy as np
import torch
from accelerate.utils import gather_object
from PIL import Image

from .errors import DatasetUnavailableError
from .pipelines.ddpm_interpolation import crop_square, open_image, resize_shorter_side, to_rgb

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# What PIL raises for a truncated, corrupt or absurdly large file, or a mode it cannot convert
# (ValueError, which ImageTooSmall also is): such an image is skipped and counted.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageTooSmall(ValueError):
    """An image whose shorter side is below `--min_image_size` (skipped and counted like an unreadable one)."""


# ---------------------------------------------------------------- preprocessing
# The image functions live in the interpolation pipeline file, which must stand
# alone for users who load it with `custom_pipeline=`; training uses the same
# functions, so training data and interpolation inputs are prepared identically.


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
    (`lsun_ddpm.prepare`) can store the first and run only the second per step.
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
    a DataLoader worker then hands over a quarter of the bytes (1.7-2.5× the images per second through
    one worker, docs/performance.md), a batch goes to a GPU in a quarter of the time, and channels_last
    costs no transposition, since (H, W, 3) already is its layout.
    """
    return pixels.movedim(-1, -3).float().div_(127.5).sub_(1.0).contiguous(memory_format=memory_format)


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

    `train_data_dir` wins over `dataset_name`. An LSUN LMDB export (a folder
    holding `data.mdb`) is read record by record (`lsun_lmdb`); any other folder
    is every image below it, at any depth.
    """
    if train_data_dir is not None:
        dataset = load_local_images(train_data_dir, streaming, cache_dir, max_train_samples)
        image_column = "image"
    elif dataset_name is not None:
        check_hub_dataset_reachable(dataset_name)
        try:
            dataset = first_images(datasets.load_dataset(
                dataset_name, dataset_config_name, split="train", streaming=streaming, cache_dir=cache_dir
            ), max_train_samples)
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
    return dataset.cast_column("image", datasets.Image(decode=False))


def first_images(dataset: datasets.Dataset | datasets.IterableDataset, count: int | None):
    """The first `count` images of `dataset` (all of them for None).

    A stream's are the first `count` only without DataLoader workers: 🤗 datasets
    splits `take` among the workers' shards.
    """
    if count is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


# The one column of every training dataset: images left undecoded ({"bytes", "path"} dicts).
UNDECODED_IMAGES = datasets.Features({"image": datasets.Image(decode=False)})


def load_local_images(folder: str, streaming: bool = False, cache_dir: str | None = None,
                      max_train_samples: int | None = None) -> datasets.Dataset | datasets.IterableDataset:
    """An LSUN LMDB export, or every image below `folder` whatever its sub-folders are called (the first
    `max_train_samples` of them, if given).

    The files are listed explicitly (`data_files`): given only the folder,
    🤗 datasets' `imagefolder` would read sub-folders named train/, test/ or val/
    as splits and use train/ alone. Sorted, so the order is the same on every machine.
    """
    if not os.path.isdir(folder):
        raise DatasetUnavailableError(f"--train_data_dir {folder!r} is not a directory")
    from .lsun_lmdb import is_lmdb_export, load_lmdb_dataset  # it imports this module

    if is_lmdb_export(folder):
        return load_lmdb_dataset(folder, streaming, cache_dir, max_train_samples)
    from .prepare import is_prepared_dataset

    if is_prepared_dataset(folder):  # training reads one (training.prepare_training_data); nothing else does
        raise DatasetUnavailableError(f"--train_data_dir {folder!r} is a prepared dataset, which only training "
                                      "reads: give the folder of images it was prepared from")
    # Absolute, so the dataset (and its fingerprint, which `prepare` checks on resume) is the same however
    # the folder is spelled.
    files = sorted(walk_images(os.path.abspath(folder)))
    files = leave_out_url_chains(files)
    if not files:
        raise DatasetUnavailableError(f"--train_data_dir {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if streaming:
        # Each file a shard: DataLoader workers share out shards, and the stream's shuffle permutes them, where
        # `imagefolder` streams the whole list as one shard (one worker, and only the shuffle buffer's mixing).
        # The first files are the first images whatever the workers, which `take` would not be.
        return datasets.IterableDataset.from_generator(undecoded_images, features=UNDECODED_IMAGES,
                                                       gen_kwargs={"files": files[:max_train_samples]})
    # data_files are glob patterns: escaped, `photo [1].jpg` is that file, not `photo 1.jpg`.
    return first_images(datasets.load_dataset(
        "imagefolder", data_files={"train": [glob.escape(file) for file in files]}, split="train", drop_labels=True,
        drop_metadata=True, cache_dir=cache_dir), max_train_samples)


def undecoded_images(files: list[str]) -> Iterator[dict]:
    """The `image` column of `files`, as 🤗 datasets' Image feature holds an image it has not read."""
    for file in files:
        yield {"image": {"path": file, "bytes": None}}


def leave_out_url_chains(files: list[str]) -> list[str]:
    """`files` without the paths 🤗 datasets cannot open: it reads `::` in a path as a chain of URLs."""
    chained = [file for file in files if "::" in file]
    if chained:
        logger.warning("left out %d image(s) whose path holds '::', which 🤗 datasets reads as a chain of URLs "
                       "(rename them to train on them): %s", len(chained), ", ".join(chained[:3]))
    return [file for file in files if "::" not in file]


def walk_images(root: str):
    """Paths of the image files under `root`, at any depth, through linked folders too (each folder once)."""
    seen = {os.path.realpath(root)}  # a link back up, or two links to one folder, would list images twice
    for directory, subfolders, files in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(subfolders):  # of two links to one folder, the first by name is read
            target = os.path.realpath(os.path.join(directory, name))
            if target not in seen:
                seen.add(target)
                kept.append(name)
        subfolders[:] = kept  # os.walk descends into these only
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.join(directory, name)


# ---------------------------------------------------------------- notes on images skipped or upscaled

SKIPPED, UPSCALED = "skipped", "upscaled"
# A note: (SKIPPED or UPSCALED, the file or record — None when the source names none —, why).
Note = tuple[str, "str | None", str]

# Notes travel with each item as a fixed-size byte tensor holding JSON: accelerate can then
# move, split and concatenate them like the pixels (it dispatches streamed batches from the
# main process and accepts tensors only), and DataLoader workers hand them back like any item.
NOTE_BYTES = 512
MAX_NOTE_FIELD = 160  # characters kept of a path (its end) and of a reason (its start)
NO_NOTES = torch.zeros(NOTE_BYTES, dtype=torch.uint8)
REPORTED_EXAMPLES = 5  # files (with reasons) named per kind at the end of a run and in its summary
PENDING_BATCHES = 64  # batches whose notes are read from the device at once


def describe_image_source(source: Any) -> str:
    return image_source_name(source) or "<in-memory image>"


def image_source_name(source: Any) -> str | None:
    """The file (or LMDB record) an image came from, when its source says."""
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return None


def encode_notes(notes: list[Note]) -> torch.Tensor:
    """uint8 (NOTE_BYTES,): the counts per kind exactly, and as many notes as fit."""
    if not notes:
        return NO_NOTES
    counts = {kind: sum(note[0] == kind for note in notes) for kind in (SKIPPED, UPSCALED)}
    shortened = [(kind, where if where is None else where[-MAX_NOTE_FIELD:], reason[:MAX_NOTE_FIELD])
                 for kind, where, reason in notes]
    for kept in range(len(shortened), -1, -1):
        encoded = json.dumps({"counts": counts, "notes": shortened[:kept]}, ensure_ascii=False).encode()
        if len(encoded) <= NOTE_BYTES:
            break
    return torch.frombuffer(bytearray(encoded.ljust(NOTE_BYTES, b"\0")), dtype=torch.uint8)


def decode_notes(encoded: torch.Tensor) -> tuple[dict[str, int], list[Note]]:
    """The counts per kind and the notes that `encode_notes` kept."""
    text = bytes(encoded.cpu().numpy()).rstrip(b"\0")
    if not text:
        return {}, []
    payload = json.loads(text)
    return payload["counts"], [tuple(note) for note in payload["notes"]]


@dataclass
class ImageReport:
    """The images of a run that were skipped or upscaled: each named file counted once
    (it comes back every epoch), notes without a name counted each time."""

    files: dict[str, dict[str, str]] = field(default_factory=lambda: {SKIPPED: {}, UPSCALED: {}})
    unnamed: dict[str, int] = field(default_factory=lambda: {SKIPPED: 0, UPSCALED: 0})
    unnamed_reasons: dict[str, list[str]] = field(default_factory=lambda: {SKIPPED: [], UPSCALED: []})
    pending: list[torch.Tensor] = field(default_factory=list)  # batches' notes not read yet (maybe on the GPU)

    def add_batch(self, batch: dict) -> None:
        """Take the notes of a collated batch (`batch["image_notes"]`, (B, NOTE_BYTES))."""
        notes = batch.get("image_notes")
        if notes is None:
            return
        # On the GPU, reading them now would wait for it at every micro-batch: they are read in bulk.
        self.pending.append(notes)
        if len(self.pending) == PENDING_BATCHES:
            self.collect()

    def collect(self) -> "ImageReport":
        """Read the notes still pending; return the report (now ready for `gather_object`)."""
        if self.pending:
            notes = torch.cat(self.pending).cpu()
            self.pending = []
            for row in notes[(notes != 0).any(dim=1)]:
                self.add(*decode_notes(row))
        return self

    def add(self, counts: dict[str, int], notes: list[Note]) -> None:
        for kind, where, reason in notes:
            if where is None:
                self._add_unnamed(kind, 1, reason)
            else:
                self.files[kind].setdefault(where, reason)
        for kind, count in counts.items():  # notes that did not fit in the tensor
            self._add_unnamed(kind, count - sum(note[0] == kind for note in notes), None)

    def _add_unnamed(self, kind: str, count: int, reason: str | None) -> None:
        self.unnamed[kind] += count
        if count and reason is not None and len(self.unnamed_reasons[kind]) < REPORTED_EXAMPLES:
            self.unnamed_reasons[kind].append(reason)

    def merge(self, other: "ImageReport") -> None:
        for kind in (SKIPPED, UPSCALED):
            for where, reason in other.files[kind].items():
                self.files[kind].setdefault(where, reason)
            self._add_unnamed(kind, other.unnamed[kind], None)
            self.unnamed_reasons[kind].extend(other.unnamed_reasons[kind])
            del self.unnamed_reasons[kind][REPORTED_EXAMPLES:]

    def count(self, kind: str) -> int:
        self.collect()
        return len(self.files[kind]) + self.unnamed[kind]

    def examples(self, kind: str) -> list[str]:
        """The first few "file: reason" lines of a kind."""
        self.collect()
        named = [f"{where}: {reason}" for where, reason in self.files[kind].items()]
        return (named + self.unnamed_reasons[kind])[:REPORTED_EXAMPLES]


def summarise_image_reports(reports: list[ImageReport]) -> tuple[dict[str, Any], list[str]]:
    """All processes' reports (`gather_object`) as the run summary's fields and the end-of-run lines."""
    total = ImageReport()
    for report in reports:
        total.merge(report.collect())
    summary = {"images_skipped": total.count(SKIPPED), "images_upscaled": total.count(UPSCALED),
               "images_skipped_examples": total.examples(SKIPPED),
               "images_upscaled_examples": total.examples(UPSCALED)}
    lines = []
    for kind, advice in ((SKIPPED, ""), (UPSCALED, " (--min_image_size skips such images instead)")):
        count = total.count(kind)
        if count:
            lines.append(f"{count} image{'s' if count != 1 else ''} {kind}{advice}; the first:")
            lines.extend(f"  {example}" for example in total.examples(kind))
    return summary, lines


# How many notes of each kind a process logs as they happen; the rest are only counted.
LOGGED_NOTES = 10
_logged = {SKIPPED: 0, UPSCALED: 0}


def log_note(kind: str, source: Any, reason: str) -> Note:
    """Warn about an image skipped or upscaled (the first few of each kind); return its note."""
    _logged[kind] += 1
    if _logged[kind] <= LOGGED_NOTES:
        logger.warning("%s image %s (%s)%s", kind, describe_image_source(source), reason,
                       "; further ones are only counted" if _logged[kind] == LOGGED_NOTES else "")
    return (kind, image_source_name(source), reason)


def describe_error(error: Exception) -> str:
    """Why an image was skipped, without PIL's "<_io.BytesIO object at 0x...>" (noise in a report)."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image file PIL can identify"
    return str(error) or type(error).__name__


def noting_skips(notes: list[Note], source: Any, resolution: int, make: Callable[[], Any]) -> Any | None:
    """`make()` (a preprocessing stage of `source`), or None when the image must be skipped;
    a skip or an upscale is added to `notes`."""
    try:
        result = make()
    except UNREADABLE_IMAGE_ERRORS as error:
        notes.append(log_note(SKIPPED, source, describe_error(error)))
        return None
    if result.upscaled:
        width, height = result.original_size
        notes.append(log_note(UPSCALED, source, f"{width}x{height} upscaled to {resolution} px"))
    return result


def prepare_or_note(preprocess: ImagePreprocessor, source: Any, generator: torch.Generator | None,
                    notes: list[Note]) -> torch.Tensor | None:
    """The image's uint8 pixels, or None when it must be skipped; a skip or an upscale is added to `notes`."""
    prepared = noting_skips(notes, source, preprocess.resolution, lambda: preprocess.prepare(source, generator))
    return None if prepared is None else prepared.pixels


# ---------------------------------------------------------------- torch datasets

MAX_CONSECUTIVE_UNREADABLE = 100


def too_many_unreadable(where: str, notes: list[Note]) -> DatasetUnavailableError:
    kind, source, reason = notes[-1]
    return DatasetUnavailableError(
        f"{MAX_CONSECUTIVE_UNREADABLE} unreadable images in a row {where} (the last, {source or 'an image'}: "
        f"{reason}): check the data (images below --min_image_size count too)"
    )


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


class AugmentedImages(torch.utils.data.Dataset):
    """Map-style training images whose random crop and flip come from
    `augmentation_generator(seed, epoch, index)`; `set_epoch` gives each epoch new ones."""

    def __init__(self, dataset: datasets.Dataset, preprocess: ImagePreprocessor, seed: int = 0):
        self.dataset = dataset
        self.preprocess = preprocess
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)


class PreprocessedImages(AugmentedImages):
    """A map-style 🤗 dataset, decoded and preprocessed on access.

    An image that cannot be used (unreadable, below --min_image_size) is
    skipped: the next image takes its place, so every process still gets full,
    equally sized batches (a short batch on one DDP rank would stall the
    others), and the item's `image_notes` say what was skipped or upscaled.
    """

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = augmentation_generator(self.seed, self.epoch, index)
        notes: list[Note] = []
        for offset in range(MAX_CONSECUTIVE_UNREADABLE):
            source = self.dataset[(index + offset) % len(self.dataset)]["image"]
            pixels = prepare_or_note(self.preprocess, source, generator, notes)
            if pixels is not None:
                return {"pixels": pixels, "image_notes": encode_notes(notes)}
        raise too_many_unreadable(f"near index {index}", notes)


class PreprocessedStream(torch.utils.data.IterableDataset):
    """A streamed 🤗 dataset, decoded and preprocessed as it arrives, that resumes where training stopped.

    Unusable images are skipped and noted in the next item's `image_notes`, as
    in `PreprocessedImages` (skips after a stream's last image have no item to
    travel with: they are only logged); 100 in a row stop the run.

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
        notes: list[Note] = []  # since the last item: skips, then this item's upscale
        for position, example in enumerate(self.stream):
            if position < start:
                continue  # trained on before this run was resumed
            generator = augmentation_generator(self.seed, self.epoch, worker, position)
            pixels = prepare_or_note(self.preprocess, example["image"], generator, notes)
            if pixels is None:
                if len(notes) == MAX_CONSECUTIVE_UNREADABLE:
                    raise too_many_unreadable("in the stream", notes)
                continue
            yield {"pixels": pixels, "image_notes": encode_notes(notes),
                   "stream_worker": worker, "stream_position": position}
            notes = []


def make_training_dataset(
    dataset: datasets.Dataset | datasets.IterableDataset,
    preprocess: ImagePreprocessor,
    seed: int | None = None,
    shuffle_buffer_size: int = 10_000,
) -> torch.utils.data.Dataset:
    """Wrap a 🤗 dataset so that items are `{"pixels": uint8 tensor (H, W, 3), "image_notes": ...}`
    (plus, for a stream, the item's place in it).

    The shuffle's seed is `seed` (0 if None), never a random one: a resumed
    stream must shuffle as the interrupted one did, and every process alike.
    """
    if isinstance(dataset, datasets.IterableDataset):
        shuffled = dataset.shuffle(seed=seed or 0, buffer_size=shuffle_buffer_size)
        return PreprocessedStream(shuffled, preprocess, seed or 0)
    return PreprocessedImages(dataset, preprocess, seed or 0)


def collate_batch(items: list[dict[str, Any]] | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch's `default_collate` of a batch's items, or the batch itself from a dataset that reads a whole
    batch at once (`prepare.PreparedImages.__getitems__` gives a dict of batched tensors)."""
    return items if isinstance(items, dict) else torch.utils.data.default_collate(items)


def make_dataloader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int = 0
                    ) -> torch.utils.data.DataLoader:
    """Full micro-batches only (`drop_last`): the paper's batch size is part of the recipe. Batches hold
    uint8 pixels, so workers hand over (and the device receives) a quarter of float32's bytes."""
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
        collate_fn=collate_batch,
        # Workers are started anew each epoch, with the dataset's current epoch (its crops and flips).
        persistent_workers=False,
        # Every `iter()` draws a seed for the workers (even with none) from this generator; drawn from
        # the global RNG instead, it would shift the noise of a resumed run, which starts a fresh iterator.
        generator=torch.Generator(),
    )
