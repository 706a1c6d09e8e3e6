"""`lsun-ddpm prepare`: decode and resize every training image once, so training reads pixels without decoding.

A prepared dataset is a folder:

    prepared_dataset.json   what it was made from and with (source, resolution, crop mode, counts)
    shards/shard-00000.arrow ...   Arrow files, memory-mapped by 🤗 datasets (`MemoryMappedTable.from_file`)

Each record is one image after the deterministic part of training's
preprocessing (`ImagePreprocessor.resize`: RGB, shorter side to the
resolution, and the centre crop when it is on):

    pixels   uint8 bytes, (height, width, 3): the layout PIL and training's items
             use, so training converts them exactly as it converts a freshly
             decoded image, and a random crop is a view of them
    height, width   its size: resolution × resolution with the centre crop; with
             `--no_center_crop` the shorter side is the resolution and the other
             is kept, so the random crop is still drawn anew every epoch
    source   the file or LSUN LMDB record it came from (for tracing an image back)

The random flip (and the random crop) stay on the fly, drawn from
`augmentation_generator` like the decoded path's: a prepared dataset gives
training exactly the tensors decoding the originals gives (as long as no image
was skipped: a skipped image is left out here, where decoding per step puts the
next image in its place).

Shards are written with the Arrow files' own writer rather than `save_to_disk`
because `save_to_disk` needs the whole dataset first, and a 3M-image LSUN
category would be written twice.

Resumable and interruptible: the source is cut into fixed runs of
`shard_size` images; shard i always holds run i. A shard is written under a
temporary name (`.shard-00000.arrow.partial-<pid>`), its counts beside it
(`shard-00000.json`), and renamed when complete: a shard's final name means it
is whole, and a rerun skips it (and writes a missing shard anew, removing any partial file of it first). A rerun must have the same plan (source
fingerprint, image count, preprocessing, shard size), recorded in
`prepared_dataset.json` before the first shard; otherwise it is refused. The
dataset is usable only once the file says `"complete": true`, which is written
after the last shard; `--num_proc` workers each write whole shards, so the
result does not depend on how many there were.
"""

from __future__ import annotations

import json
import logging
import multiprocessing.pool
import os
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..errors import InputError, signal_exit_status
from ..files import write_text
from .prepared import FEATURES, FORMAT, FORMAT_VERSION, METADATA_FILE, SHARDS_FOLDER
from .preprocessing import ImagePreprocessor
from .report import (ImageReport, Note, REPORTED_EXAMPLES, SKIPPED, UPSCALED, image_source_name, noting_skips,
                     summarise_image_reports)
from .sources import load_image_dataset

logger = logging.getLogger(__name__)


DEFAULT_SHARD_SIZE = 1000  # ≈ 49 MB at 128 px: a lost shard costs seconds, 3M images make ~3000 files


@dataclass
class SourceOptions:
    """The training images to prepare, named as training's flags name them."""

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    image_column: str = "image"
    cache_dir: str | None = None
    max_train_samples: int | None = None


@dataclass
class ShardJob:
    """Write images [start, stop) of `dataset` as one shard (picklable: it travels to a worker process)."""

    dataset: datasets.Dataset
    preprocess: ImagePreprocessor
    index: int
    start: int
    stop: int
    folder: str


def prepare_dataset(source: SourceOptions, preprocess: ImagePreprocessor, output_dir: str,
                    num_proc: int = 1, shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
    """Write (or finish) the prepared dataset of `source` in `output_dir`; return its metadata."""
    if preprocess.random_flip:
        raise ValueError("the flip is drawn per epoch in training; prepare with random_flip=False")
    if num_proc < 1 or shard_size < 1:
        raise InputError(f"--num_proc and --shard_size must be at least 1, got {num_proc} and {shard_size}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each launched process would write every shard
        raise InputError("prepare runs as one process with --num_proc workers: start it without `accelerate "
                         "launch` (or torchrun)")
    dataset = load_image_dataset(source.dataset_name, source.dataset_config_name, source.train_data_dir,
                                 source.image_column, False, source.cache_dir, source.max_train_samples)
    folder = Path(output_dir)
    plan = preparation_plan(source, preprocess, dataset, shard_size)
    metadata = start_or_resume(folder, plan)
    if metadata.get("complete"):
        print(f"{folder} is already a complete prepared dataset ({metadata['images']} images)")
        return metadata
    jobs = [ShardJob(dataset, preprocess, index, start, min(start + shard_size, len(dataset)), str(folder))
            for index, start in enumerate(range(0, len(dataset), shard_size))]
    try:
        write_missing_shards(jobs, num_proc)
    except KeyboardInterrupt:  # Ctrl-C: the complete shards stay; say so instead of a traceback
        done = sum(shard_path(folder, job.index).is_file() for job in jobs)
        print(f"\ninterrupted: {done} of {len(jobs)} shards in {folder} are complete; the same command "
              "continues from there", file=sys.stderr)
        raise SystemExit(signal_exit_status(signal.SIGINT)) from None
    return finish(folder, plan, len(jobs))


def preparation_plan(source: SourceOptions, preprocess: ImagePreprocessor, dataset: datasets.Dataset,
                     shard_size: int) -> dict[str, Any]:
    """What the shards are made from and with: a rerun that would write other shards is refused."""
    where = dict(asdict(source), cache_dir=None)  # where the download is cached changes no pixel
    if where["train_data_dir"] is not None:
        where["train_data_dir"] = os.path.abspath(where["train_data_dir"])
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "preprocessing": {"resolution": preprocess.resolution, "center_crop": preprocess.center_crop,
                          "min_image_size": preprocess.min_image_size},
        "source": where,
        "source_images": len(dataset),
        "source_fingerprint": dataset._fingerprint,  # 🤗 datasets' hash of the files (or Hub revision) and selection
        "shard_size": shard_size,
        "pixels": "uint8 bytes, (height, width, 3)",
    }


def start_or_resume(folder: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """The metadata recorded in `folder`: the plan written now for a new folder, the old one for a rerun."""
    metadata_path = folder / METADATA_FILE
    if metadata_path.is_file():
        metadata = json.loads(metadata_path.read_text())
        different = [key for key in plan if metadata.get(key) != plan[key]]
        if different:
            key = different[0]
            changed = " (the source images changed)" if key == "source_fingerprint" else ""
            raise InputError(
                f"--output_dir {str(folder)!r} holds a dataset prepared with another {key}{changed} "
                f"({metadata.get(key)} there, {plan[key]} now): finish it with the flags and images it was "
                "started with, or prepare into another --output_dir")
        return metadata
    if folder.exists() and any(folder.iterdir()):
        raise InputError(f"--output_dir {str(folder)!r} is not empty and holds no prepared dataset: "
                         "give a new or empty folder")
    (folder / SHARDS_FOLDER).mkdir(parents=True, exist_ok=True)
    write_text(json.dumps(dict(plan, complete=False), indent=2), metadata_path)
    return plan


def shard_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / SHARDS_FOLDER / f"shard-{index:05d}.arrow"


def write_missing_shards(jobs: list[ShardJob], num_proc: int) -> None:
    """Write the shards not complete yet, `num_proc` at a time, with a progress bar over images."""
    from tqdm.auto import tqdm

    missing = [job for job in jobs if not shard_path(job.folder, job.index).is_file()]
    total = sum(job.stop - job.start for job in jobs)
    with tqdm(total=total, initial=total - sum(job.stop - job.start for job in missing),
              desc="prepare", unit="image", dynamic_ncols=True) as bar:
        if num_proc == 1:
            for job in missing:
                bar.update(write_shard(job))
            return
        with worker_pool(num_proc) as pool:
            for done in pool.imap_unordered(write_shard, missing):
                bar.update(done)


def worker_pool(num_proc: int) -> multiprocessing.pool.Pool:
    """`num_proc` worker processes, started (spawn) with Ctrl-C ignored.

    Spawned, because a forked copy of a process holding torch's and tqdm's
    threads can deadlock. Ctrl-C reaches the whole process group: this process
    alone acts on it (leaving the pool stops the workers), with one message
    instead of a traceback from every worker. A worker inherits the ignored
    signal from the moment it starts, while it is still importing.
    """
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return multiprocessing.get_context("spawn").Pool(num_proc)
    finally:
        signal.signal(signal.SIGINT, previous)


def write_shard(job: ShardJob) -> int:
    """Resize images [start, stop) into the job's shard; return how many source images it covered."""
    final = shard_path(job.folder, job.index)
    # Half-written attempts at this shard (a killed run's, or its orphaned worker's, which may still be writing):
    # each has its process id in its name, so this attempt never writes into one of them.
    for stale in final.parent.glob(f".{final.name}.partial*"):
        stale.unlink(missing_ok=True)
    partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
    notes: list[Note] = []
    images = 0
    writer = datasets.arrow_writer.ArrowWriter(features=FEATURES, path=str(partial))
    try:
        for index in range(job.start, job.stop):
            record = resized_record(job.preprocess, job.dataset[index]["image"], notes)
            if record is not None:
                writer.write(record)
                images += 1
        writer.finalize()
    except BaseException:  # Ctrl-C, a full disk: no half shard is left behind
        partial.unlink(missing_ok=True)
        raise
    finally:
        writer.close()
    write_text(json.dumps(shard_counts(images, notes)), final.with_suffix(".json"))
    os.replace(partial, final)  # the shard is complete only now
    return job.stop - job.start


def resized_record(preprocess: ImagePreprocessor, source: Any, notes: list[Note]) -> dict[str, Any] | None:
    """The stored record of one image, or None when it is skipped (as training skips it: noted in `notes`)."""
    resized = noting_skips(notes, source, preprocess.resolution, lambda: preprocess.resize(source))
    if resized is None:
        return None
    pixels = np.asarray(resized.image, dtype=np.uint8)
    return {"pixels": pixels.tobytes(), "height": pixels.shape[0], "width": pixels.shape[1],
            "source": image_source_name(source)}


def shard_counts(images: int, notes: list[Note]) -> dict[str, Any]:
    """A shard's images, and its skips and upscales (counts, and the first few notes of each kind)."""
    counts = {kind: sum(note[0] == kind for note in notes) for kind in (SKIPPED, UPSCALED)}
    examples = [note for kind in (SKIPPED, UPSCALED) for note in notes if note[0] == kind][:2 * REPORTED_EXAMPLES]
    return {"images": images, "counts": counts, "notes": examples}


def finish(folder: Path, plan: dict[str, Any], num_shards: int) -> dict[str, Any]:
    """Add up the shards' counts and mark the dataset complete (the last write: only now is it usable)."""
    report, shards = ImageReport(), []
    for index in range(num_shards):
        counts = json.loads(shard_path(folder, index).with_suffix(".json").read_text())
        report.add(counts["counts"], [tuple(note) for note in counts["notes"]])
        shards.append({"file": shard_path(folder, index).name, "images": counts["images"]})
    summary, lines = summarise_image_reports([report])
    metadata = dict(plan, complete=True, images=sum(shard["images"] for shard in shards), **summary, shards=shards)
    write_text(json.dumps(metadata, indent=2), folder / METADATA_FILE)
    print(f"prepared {metadata['images']} images at {plan['preprocessing']['resolution']} px in {folder}")
    for line in lines:
        print(line)
    return metadata
