"""LSUN's original release: one LMDB per category (`bedroom_train_lmdb/data.mdb`, keys → WebP bytes).

Read as a 🤗 dataset with the same `image` column as an image folder
({"bytes", "path"} dicts, `path` naming the record), so the preprocessing and
everything after it are unchanged. `lmdb` is an optional dependency
(`pip install "lsun-ddpm[lsun]"`).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from contextlib import contextmanager
from typing import Iterator

import datasets

from ..errors import DatasetUnavailableError
from .preprocessing import UNDECODED_IMAGES

LMDB_DATA_FILE = "data.mdb"
# Runs of consecutive keys read as separate shards: DataLoader workers (and 🤗 datasets'
# stream shuffling) share out shards, so a stream of one shard would be decoded by one worker.
NUM_SHARDS = 64


def is_lmdb_export(folder: str) -> bool:
    """Whether `folder` is an LMDB environment (it holds `data.mdb`)."""
    return os.path.isfile(os.path.join(folder, LMDB_DATA_FILE))


def import_lmdb():
    try:
        import lmdb
    except ImportError as error:
        raise DatasetUnavailableError(
            'reading an LSUN LMDB export needs the lmdb package: pip install "lsun-ddpm[lsun]" (or pip install lmdb)'
        ) from error
    return lmdb


# LMDB refuses to open an environment twice in one process, and 🤗 datasets reads the shards
# of a stream from several threads at once: readers share one environment per folder, and the
# last one out closes it, so that DataLoader workers forked later can open their own.
_environments: dict[str, list] = {}  # folder → [environment, readers]
_environments_lock = threading.Lock()


@contextmanager
def shared_environment(folder: str):
    """This process's read-only environment of `folder` (no lock file: the export may sit on a read-only disk)."""
    with _environments_lock:
        entry = _environments.setdefault(folder, [None, 0])
        if entry[0] is None:
            entry[0] = import_lmdb().open(folder, readonly=True, lock=False, readahead=False, meminit=False,
                                          max_readers=256)
        entry[1] += 1
    try:
        yield entry[0]
    finally:
        with _environments_lock:
            entry[1] -= 1
            if entry[1] == 0:
                entry[0].close()
                del _environments[folder]


def read_records(folder: str, fingerprint: tuple, shards: list[tuple[bytes, bytes | None]]) -> Iterator[dict]:
    """The records of `shards` ([first key, first key of the next shard or None)) as
    {"image": {"bytes", "path": "<folder>:<key>"}}, in key order.

    `fingerprint` is unused here: it is part of the generator's arguments so that
    🤗 datasets' cache is rebuilt when the LMDB changes.
    """
    with shared_environment(folder) as environment, environment.begin(buffers=False) as transaction:
        cursor = transaction.cursor()
        for first, stop in shards:
            cursor.set_range(first)
            for key, value in cursor:
                if stop is not None and key >= stop:
                    break
                yield {"image": {"bytes": value, "path": f"{folder}:{key.decode(errors='replace')}"}}


def split_into_shards(folder: str, entries: int) -> list[tuple[bytes, bytes | None]]:
    """The first `entries` keys in up to NUM_SHARDS runs of consecutive keys, as (first key, the key after the
    run or None). Runs, not `take`: 🤗 datasets splits a `take` among DataLoader workers' shards, so the
    images would be the first ones of each worker's shards, not the first `entries`."""
    every = math.ceil(entries / NUM_SHARDS)
    firsts, stop = [], None
    with shared_environment(folder) as environment, environment.begin() as transaction:
        keys = transaction.cursor().iternext(keys=True, values=False)
        for index, key in enumerate(itertools.islice(keys, entries + 1)):
            if index == entries:
                stop = bytes(key)  # the first key left out
            elif index % every == 0:
                firsts.append(bytes(key))
    return list(zip(firsts, firsts[1:] + [stop]))


def count_records(folder: str) -> int:
    with shared_environment(folder) as environment:
        return environment.stat()["entries"]


def load_lmdb_dataset(folder: str, streaming: bool = False, cache_dir: str | None = None,
                      max_records: int | None = None) -> datasets.Dataset | datasets.IterableDataset:
    """The LMDB at `folder` (its first `max_records` records, if given) as a dataset with one column,
    `image` ({"bytes", "path"} dicts).

    Map-style, the records are copied once into 🤗 datasets' cache (as much disk
    as the LMDB; later runs reuse the copy); streaming reads the LMDB directly.
    """
    folder = os.path.abspath(folder)
    entries = count_records(folder)
    if entries == 0:
        raise DatasetUnavailableError(f"--train_data_dir {folder!r} is an LMDB with no records: point it at a filled LSUN export")
    stat = os.stat(os.path.join(folder, LMDB_DATA_FILE))
    gen_kwargs = {"folder": folder, "fingerprint": (entries, stat.st_size, stat.st_mtime_ns),
                  "shards": split_into_shards(folder, min(entries, max_records or entries))}
    if streaming:
        return datasets.IterableDataset.from_generator(read_records, features=UNDECODED_IMAGES, gen_kwargs=gen_kwargs)
    return datasets.Dataset.from_generator(read_records, features=UNDECODED_IMAGES, gen_kwargs=gen_kwargs, cache_dir=cache_dir)
