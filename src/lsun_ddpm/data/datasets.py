"""Training datasets and their DataLoader: decoded on access (map-style) or streamed, resumably."""

from __future__ import annotations

from typing import Any

import datasets
import torch
from accelerate.utils import gather_object

from ..errors import DatasetUnavailableError
from .preprocessing import ImagePreprocessor, augmentation_generator
from .report import MAX_CONSECUTIVE_UNREADABLE, Note, encode_notes, prepare_or_note, too_many_unreadable

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
