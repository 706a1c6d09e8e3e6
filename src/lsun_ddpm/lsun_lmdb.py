"""LSUN's original release: one LMDB per category (`bedroom_train_lmdb/data.mdb`, keys → WebP bytes).

Read as a 🤗 dataset with the same `image` column as an image folder
({"bytes", "path"} dicts, `path` naming the record), so the preprocessing and
everything after it are unchanged. `lmdb` is an optional dependency
(`pip install "lsun-ddpm[lsun]"`).
"""

from __future__ import annotations

import os
from typing import Iterator

import datasets

from .data import DatasetUnavailableError

LMDB_DATA_FILE = "data.mdb"
FEATURES = datasets.Features({"image": datasets.Image(decode=False)})


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


def open_readonly(folder: str):
    """The LMDB environment, read-only and without a lock file (the export may sit on a read-only disk)."""
    return import_lmdb().open(folder, readonly=True, lock=False, readahead=False, meminit=False, max_readers=256)


def read_records(folder: str, fingerprint: tuple) -> Iterator[dict]:
    """Every record as {"image": {"bytes", "path": "<folder>:<key>"}}, in key order.

    `fingerprint` is unused here: it is part of the generator's arguments so that
    🤗 datasets' cache is rebuilt when the LMDB changes.
    """
    with open_readonly(folder) as environment, environment.begin(buffers=False) as transaction:
        for key, value in transaction.cursor():
            yield {"image": {"bytes": value, "path": f"{folder}:{key.decode(errors='replace')}"}}


def count_records(folder: str) -> int:
    with open_readonly(folder) as environment:
        return environment.stat()["entries"]


def load_lmdb_dataset(folder: str, streaming: bool = False,
                      cache_dir: str | None = None) -> datasets.Dataset | datasets.IterableDataset:
    """The LMDB at `folder` as a dataset with one column, `image` ({"bytes", "path"} dicts).

    Map-style, the records are copied once into 🤗 datasets' cache (as much disk
    as the LMDB; later runs reuse the copy); streaming reads the LMDB directly.
    """
    folder = os.path.abspath(folder)
    entries = count_records(folder)
    if entries == 0:
        raise DatasetUnavailableError(f"--train_data_dir {folder!r} is an LMDB with no records: point it at a filled LSUN export")
    stat = os.stat(os.path.join(folder, LMDB_DATA_FILE))
    gen_kwargs = {"folder": folder, "fingerprint": (entries, stat.st_size, stat.st_mtime_ns)}
    if streaming:
        return datasets.IterableDataset.from_generator(read_records, features=FEATURES, gen_kwargs=gen_kwargs)
    return datasets.Dataset.from_generator(read_records, features=FEATURES, gen_kwargs=gen_kwargs, cache_dir=cache_dir)
