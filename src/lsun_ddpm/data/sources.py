"""Where training images come from: a Hub dataset, a local folder of images, or an LSUN LMDB export."""

from __future__ import annotations

import glob
import logging
import os
from typing import Iterator

import datasets

from ..errors import DatasetUnavailableError
from .preprocessing import UNDECODED_IMAGES

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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
    from .lmdb import is_lmdb_export, load_lmdb_dataset

    if is_lmdb_export(folder):
        return load_lmdb_dataset(folder, streaming, cache_dir, max_train_samples)
    from .prepared import is_prepared_dataset

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
