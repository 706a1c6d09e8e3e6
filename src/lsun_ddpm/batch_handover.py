"""How DataLoader workers hand their batches to the training process: pixels through shared-memory slots made once.

torch's DataLoader sends every tensor a worker returns through a new
shared-memory segment, whose file descriptor the training process fetches from
the worker over a socket and maps again, batch after batch. On this project's
CPU that hand-over, not the data, capped a worker at about 5,600–6,000 images
per second at micro-batch 8, even with batches that cost nothing to make, and
cost the training thread 110–280 µs per image, more than reading a prepared
dataset itself; through the slots below, 15,500–17,800 images per second and
half the training thread's time (docs/performance.md).

`BatchSlots` is made in the training process before the workers start
(`make_dataloader`): `prefetch_factor + 1` slots per worker, each the size of
one micro-batch of pixels. A worker copies its batch's pixels into its next
slot and sends only the slot's number (`SlotCollate`); the training process
copies them out as it unpickles that message (`take_pixels`), so the batch it
trains on is its own and the slot is free again. The batch's other, small
tensors (skip notes, a stream's positions) travel inside the message, by value.

Why `prefetch_factor + 1` slots are enough: torch gives a worker at most
`prefetch_factor` batches to make at a time, and its next index only once
the training process has taken one of its batches, which it takes in the
order the worker made them. So when a worker makes its batch n +
prefetch_factor + 1, the training process has taken its batches up to n + 1
at least, and the slot it writes again, batch n's, is free (one to spare).
Each slot also holds a ticket (the writer's process id and batch number, 0
while it writes): a batch whose ticket changed before it was copied out
raises instead of training on a mix of two batches.
"""

from __future__ import annotations

import os
import uuid
import weakref
from typing import Any, Callable

import torch

# The training process's slots by id: a worker's message names its slots, and unpickling finds them here.
_SLOTS: weakref.WeakValueDictionary[str, "BatchSlots"] = weakref.WeakValueDictionary()
_WRITING = 0


class BatchOverwritten(RuntimeError):
    """A worker wrote a slot again before the training process had copied its batch out."""


class BatchSlots:
    """Shared-memory slots for the pixel batches of `num_workers` DataLoader workers, `slots_per_worker` each,
    every slot one uint8 batch of up to `batch_size` images of `image_shape` (H, W, 3)."""

    def __init__(self, num_workers: int, slots_per_worker: int, batch_size: int, image_shape: tuple[int, ...]):
        self.id = uuid.uuid4().hex
        self.num_workers, self.slots_per_worker = num_workers, slots_per_worker
        slots = num_workers * slots_per_worker
        self.pixels = torch.empty((slots, batch_size, *image_shape), dtype=torch.uint8).share_memory_()
        self.tickets = torch.zeros(slots, dtype=torch.int64).share_memory_()
        self.batches_written = 0  # by this process: each worker counts its own
        _SLOTS[self.id] = self

    def fits(self, worker: int, pixels: torch.Tensor) -> bool:
        return (worker < self.num_workers and pixels.dtype == torch.uint8
                and len(pixels) <= self.pixels.shape[1] and pixels.shape[1:] == self.pixels.shape[2:])

    def put(self, worker: int, pixels: torch.Tensor) -> "PixelsInSlot":
        """In worker `worker`: copy `pixels` into its next slot; what to send instead of them."""
        slot = worker * self.slots_per_worker + self.batches_written % self.slots_per_worker
        self.batches_written += 1
        ticket = os.getpid() << 32 | self.batches_written
        self.tickets[slot] = _WRITING
        self.pixels[slot, :len(pixels)].copy_(pixels)
        self.tickets[slot] = ticket
        return PixelsInSlot(self.id, slot, len(pixels), ticket)

    def take(self, slot: int, count: int, ticket: int) -> torch.Tensor:
        """In the training process: a copy of the `count` images in `slot`, if the slot still holds that batch."""
        pixels = self.pixels[slot, :count].clone()
        # Read after the copy: a write begun before or during it has set the ticket to 0 or another's
        # (tickets are never reused), so the ticket still being this batch's means the copy is this batch.
        if int(self.tickets[slot]) != ticket:
            raise BatchOverwritten(
                "a DataLoader worker wrote over a batch before the training process took it (each worker has "
                f"{self.slots_per_worker} batch slots, which two iterators of one DataLoader at once would "
                "share): iterate one at a time, or use --dataloader_num_workers 0")
        return pixels


class PixelsInSlot:
    """What a worker sends in place of a batch's pixels; unpickled in the training process, the pixels themselves."""

    def __init__(self, slots_id: str, slot: int, count: int, ticket: int):
        self.slots_id, self.slot, self.count, self.ticket = slots_id, slot, count, ticket

    def __reduce__(self):
        return take_pixels, (self.slots_id, self.slot, self.count, self.ticket)


def take_pixels(slots_id: str, slot: int, count: int, ticket: int) -> torch.Tensor:
    return _SLOTS[slots_id].take(slot, count, ticket)


class ByValue:
    """A small tensor sent inside the worker's message, instead of through a shared-memory segment of its own."""

    def __init__(self, tensor: torch.Tensor):
        self.array = tensor.numpy()

    def __reduce__(self):
        return torch.from_numpy, (self.array,)


class SlotCollate:
    """A DataLoader's `collate_fn`: `collate` (a dict of tensors), then, in a worker, the batch's "pixels" put
    into `slots` and its other tensors sent by value. In the training process itself (no workers), `collate`."""

    def __init__(self, collate: Callable[[Any], dict[str, Any]], slots: BatchSlots):
        self.collate, self.slots = collate, slots

    def __call__(self, items: Any) -> dict[str, Any]:
        batch = self.collate(items)
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            return batch
        return {key: self._hand_over(key, value, worker.id) for key, value in batch.items()}

    def _hand_over(self, key: str, value: Any, worker: int) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if key == "pixels" and self.slots.fits(worker, value):
            return self.slots.put(worker, value)
        return ByValue(value)
