"""One pass over a dataset's images, decoded and preprocessed in batches, shared between processes and cached as features."""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import datasets
import torch

from ..data.lmdb import LMDB_DATA_FILE, is_lmdb_export
from ..data.preprocessing import ImagePreprocessor, UNREADABLE_IMAGE_ERRORS
from ..data.report import REPORTED_EXAMPLES, describe_image_source
from ..data.sources import walk_images
from ..errors import InputError
from .lpips_features import LpipsFeatures

CACHE_FORMAT = 1
# The parts of the cache's identity that say which images the data options named when it was written.
CONTENTS_KEYS = ("num_images", "images_sha256")


@dataclass
class DatasetPass:
    """How this process walks the dataset: which batches, how large, and the feature cache."""

    batch_size: int
    process_index: int = 0
    num_processes: int = 1
    cache_dir: Path | None = None
    num_images: int = 0  # filled in as the pass goes
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)  # "file (why)" of the first few skipped

    def owns(self, batch: int) -> bool:
        return batch % self.num_processes == self.process_index

    def cache_file(self, batch: int) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"batch-{batch:08d}.safetensors"


def stream_batches(stream: datasets.IterableDataset, batch_size: int) -> Iterator[tuple[int, list]]:
    """(batch number, [(dataset index, undecoded image)]) for consecutive batches of a stream."""
    batch, members = 0, []
    for index, example in enumerate(stream):
        if index // batch_size != batch:
            yield batch, members
            batch, members = index // batch_size, []
        members.append((index, example["image"]))
    if members:
        yield batch, members


class DecodedBatches(torch.utils.data.Dataset):
    """Item i: (batch number, pixels, indices, skipped) of this process's i-th map-style batch.

    A DataLoader over it decodes batches in worker processes
    (`--dataloader_num_workers`); a batch already in the feature cache is
    not decoded (pixels is None).
    """

    def __init__(self, dataset: datasets.Dataset, plan: DatasetPass, preprocess: ImagePreprocessor):
        self.dataset, self.plan, self.preprocess = dataset, plan, preprocess
        self.batches = range(plan.process_index, math.ceil(len(dataset) / plan.batch_size), plan.num_processes)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, item: int):
        batch = self.batches[item]
        cached = self.plan.cache_file(batch)
        if cached is not None and cached.is_file():
            return batch, None, None, []
        start = batch * self.plan.batch_size
        members = list(enumerate(self.dataset[start:start + self.plan.batch_size]["image"], start))
        return (batch, *decode_batch(members, self.preprocess))


def decoded_batches(dataset, plan: DatasetPass, preprocess: ImagePreprocessor, num_workers: int = 0):
    """(batch number, pixels or None when cached, indices, skipped images) for this process's batches, in order."""
    if isinstance(dataset, datasets.IterableDataset):
        # A stream is read in order by every process, each keeping its own batches (reading
        # undecoded bytes is cheap next to decoding them); it is decoded here, as it arrives.
        for batch, members in stream_batches(dataset, plan.batch_size):
            cached = plan.cache_file(batch)
            if not plan.owns(batch):
                continue
            if cached is not None and cached.is_file():
                yield batch, None, None, []
            else:
                yield (batch, *decode_batch(members, preprocess))
        return
    yield from torch.utils.data.DataLoader(DecodedBatches(dataset, plan, preprocess), batch_size=None,
                                           num_workers=num_workers, collate_fn=_unchanged)


def _unchanged(item):
    return item


def decode_batch(members: list[tuple[int, object]], preprocess: ImagePreprocessor
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(pixels (n, 3, H, W), their dataset indices, "file (why)" of each unreadable image skipped)."""
    pixels, indices, skipped = [], [], []
    for index, source in members:
        try:
            pixels.append(preprocess(source))
            indices.append(index)
        except UNREADABLE_IMAGE_ERRORS as error:
            skipped.append(f"{describe_image_source(source)} ({error})")
            warnings.warn(f"skipping unreadable image {skipped[-1]}")
    empty = torch.empty(0, 3, preprocess.resolution, preprocess.resolution)
    return (torch.stack(pixels) if pixels else empty), torch.tensor(indices, dtype=torch.long), skipped


def featurised_batches(dataset, extractor: LpipsFeatures, preprocess: ImagePreprocessor, plan: DatasetPass,
                       device: torch.device, on_batch: Callable[[int], None] = lambda n: None,
                       num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features, dataset indices) of each of this process's batches, read from or written to the cache.

    A cache file is written under a temporary name and renamed when complete,
    so an interrupted pass leaves only whole files, which the next run reuses.
    """
    from safetensors.torch import load_file, save_file

    for batch, pixels, indices, skipped in decoded_batches(dataset, plan, preprocess, num_workers):
        cached = plan.cache_file(batch)
        if pixels is None:
            stored = load_file(str(cached))
            features, indices, num_skipped = stored["features"], stored["indices"], int(stored["skipped"])
        else:
            features = extractor(pixels.to(device)).cpu() if len(indices) else torch.empty(0, 0)
            num_skipped = len(skipped)
            if cached is not None:  # it keeps the number skipped, not which files
                staging = cached.with_name(f".{cached.name}.partial-{os.getpid()}")
                save_file({"features": features.contiguous(), "indices": indices,
                           "skipped": torch.tensor(num_skipped)}, str(staging))
                os.replace(staging, cached)
            plan.skipped_examples = (plan.skipped_examples + skipped)[:REPORTED_EXAMPLES]
        plan.num_images += len(indices)
        plan.skipped += num_skipped
        on_batch(len(indices) + num_skipped)
        if len(indices):
            yield features.to(device), indices


def prepare_feature_cache(cache_dir: str | None, identity: dict) -> Path | None:
    """The cache folder, checked against what its features were computed from (net, data, resolution...)."""
    if cache_dir is None:
        return None
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    identity = {"format": CACHE_FORMAT, **identity}
    meta = folder / "cache.json"
    if meta.is_file():
        stored = json.loads(meta.read_text())
        different = {key: (stored.get(key), value) for key, value in identity.items() if stored.get(key) != value}
        if different:
            described = ", ".join(f"{key}: cached {old!r}, now {new!r}" for key, (old, new) in different.items())
            if set(different) <= set(CONTENTS_KEYS):
                raise InputError(f"--feature_cache {cache_dir!r} holds features of the training images as they "
                                 f"were before they changed ({described}); give a new folder or delete this one")
            raise InputError(f"--feature_cache {cache_dir!r} holds features of another set-up ({described}); "
                             "give a new folder or the same options")
    else:
        staging = meta.with_name(f".cache.json.partial-{os.getpid()}")
        staging.write_text(json.dumps(identity, indent=2))
        os.replace(staging, meta)
    return folder


def dataset_contents(dataset, train_data_dir: str | None) -> dict:
    """The cache identity's `CONTENTS_KEYS`: how many images `dataset` holds and a hash of what they are.

    The options that name the data stay the same when images are added to
    its folder or changed: cached batches would then be matched against
    shifted indices. A 🤗 map-style dataset has its fingerprint (a hash of its
    source files with their modification times, or of the Hub revision); a
    stream has none (nor a length), so a local folder's files are hashed here.
    """
    if not isinstance(dataset, datasets.IterableDataset):
        return {"num_images": len(dataset), "images_sha256": dataset._fingerprint}
    return {"num_images": None, "images_sha256": files_sha256(train_data_dir) if train_data_dir else None}


def files_sha256(folder: str) -> str:
    """A hash of the image files below `folder` (an LMDB export: its data file): relative names, sizes, mtimes."""
    files = [os.path.join(folder, LMDB_DATA_FILE)] if is_lmdb_export(folder) else sorted(walk_images(folder))
    digest = hashlib.sha256()
    for path in files:
        status = os.stat(path)
        digest.update(f"{os.path.relpath(path, folder)}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
