"""Micro-batches epoch after epoch, from where a run (or its resumed checkpoint) left off."""

from __future__ import annotations

from typing import Iterator

from accelerate import Accelerator

from ..data.datasets import PreprocessedStream
from .options import TrainingConfig

def micro_batches(accelerator: Accelerator, dataloader, global_step: int, steps_per_epoch: int | None,
                  config: TrainingConfig) -> Iterator[dict]:
    """Micro-batches forever, epoch after epoch, starting where `global_step` left off.

    On resume the batches already trained on are skipped by the sampler
    (`skip_first_batches`), without decoding them. A stream instead resumes
    from the position its checkpointed state holds (`streamed_micro_batches`).
    """
    stream = preprocessed_stream(dataloader)
    if stream is not None:
        yield from streamed_micro_batches(dataloader, stream)
        return
    epoch, skip = 0, 0
    if global_step:
        epoch, steps_into_epoch = divmod(global_step, steps_per_epoch)
        skip = steps_into_epoch * config.gradient_accumulation_steps
    while True:
        dataloader.set_epoch(epoch)  # the sampler's shuffle
        if hasattr(dataloader.dataset, "set_epoch"):  # the random crops and flips (accelerate may not tell it)
            dataloader.dataset.set_epoch(epoch)
        yield from accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        epoch, skip = epoch + 1, 0


def preprocessed_stream(dataloader) -> PreprocessedStream | None:
    """The stream a prepared DataLoader reads, also when accelerate wrapped it to shard it; None for map-style data."""
    dataset = dataloader.dataset
    dataset = getattr(dataset, "dataset", dataset)  # accelerate's IterableDatasetShard
    return dataset if isinstance(dataset, PreprocessedStream) else None


def streamed_micro_batches(dataloader, stream: PreprocessedStream) -> Iterator[dict]:
    """A stream's micro-batches from its current epoch and position on (a resumed run: the checkpoint's).

    Each batch is recorded as trained on when the loop takes it, so a
    checkpoint holds the position after the batches actually trained on, not
    after the one accelerate has read ahead.
    """
    epoch = stream.epoch
    while True:
        dataloader.set_epoch(epoch)
        stream.set_epoch(epoch)  # the shuffle, the crops and flips (accelerate may not tell it)
        for batch in dataloader:
            stream.record(batch)
            yield batch
        epoch += 1
