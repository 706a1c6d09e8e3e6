"""DataLoader workers hand pixel batches over through shared-memory slots made once, and nothing is lost or mixed."""

import pickle

import pytest
import torch

from lsun_ddpm.batch_handover import BatchOverwritten, BatchSlots
from lsun_ddpm.data import ImagePreprocessor, make_dataloader

SIZE = 4


def pixels_of(index: int) -> torch.Tensor:
    """Image `index` of the datasets below: every byte tells the index (mod 256) and the byte's place."""
    return ((torch.arange(SIZE * SIZE * 3) + 7 * index) % 256).to(torch.uint8).view(SIZE, SIZE, 3)


class IndexedImages(torch.utils.data.Dataset):
    """Training-like items: uint8 pixels, and a small tensor of their own (the index) beside them."""

    preprocess = ImagePreprocessor(SIZE)  # what tells make_dataloader the images' size

    def __init__(self, count: int):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return {"pixels": pixels_of(index), "index": torch.tensor(index)}


class IndexedBatches(IndexedImages):
    """The same images read a whole batch at a time, as a prepared dataset reads them."""

    def __getitems__(self, indices):
        return {"pixels": torch.stack([pixels_of(i) for i in indices]), "index": torch.tensor(indices)}


@pytest.mark.parametrize("dataset", [IndexedImages(60), IndexedBatches(60)], ids=["items", "whole batches"])
@pytest.mark.parametrize("workers", [1, 2])
def test_every_batch_from_workers_arrives_whole_and_stays_the_training_processes_own(dataset, workers):
    """Three epochs of 15 batches, every one kept: the slots are written again and again (3 per worker), and
    no kept batch may change with them. Each arrives as a tensor of the training process's own memory,
    not as torch's shared-memory segment of the batch (the hand-over this replaces)."""
    loader = make_dataloader(dataset, batch_size=4, num_workers=workers)
    kept = [batch for _ in range(3) for batch in loader]
    assert len(kept) == 45
    for batch in kept:
        assert batch["pixels"].shape == (4, SIZE, SIZE, 3) and batch["pixels"].dtype == torch.uint8
        assert torch.equal(batch["pixels"], torch.stack([pixels_of(int(i)) for i in batch["index"]]))
        assert not batch["pixels"].is_shared() and not batch["index"].is_shared()
    assert sorted(int(i) for batch in kept[:15] for i in batch["index"]) == list(range(60))


def test_without_workers_or_slots_the_batches_are_the_same():
    torch.manual_seed(0)
    reference = [b["index"].tolist() for b in make_dataloader(IndexedBatches(12), batch_size=4, num_workers=0)]
    for workers, slots in ((0, True), (2, False), (2, True)):
        torch.manual_seed(0)
        loader = make_dataloader(IndexedBatches(12), batch_size=4, num_workers=workers, batch_slots=slots)
        batches = list(loader)
        assert [b["index"].tolist() for b in batches] == reference
        assert all(torch.equal(b["pixels"], torch.stack([pixels_of(i) for i in b["index"].tolist()]))
                   for b in batches)


def test_a_batch_that_does_not_fit_a_slot_still_arrives():
    """Images of another size than the dataset's preprocessing says go by value instead of through a slot."""

    class LargerImages(IndexedBatches):
        def __getitems__(self, indices):
            return {"pixels": torch.full((len(indices), SIZE + 1, SIZE, 3), indices[0], dtype=torch.uint8)}

    batches = list(make_dataloader(LargerImages(8), batch_size=4, num_workers=1))
    assert [b["pixels"].shape for b in batches] == [(4, SIZE + 1, SIZE, 3)] * 2
    assert all(not b["pixels"].is_shared() and (b["pixels"] == b["pixels"][0, 0, 0, 0]).all() for b in batches)


def test_a_message_carries_the_slot_not_the_pixels_and_a_slot_written_again_is_refused():
    """One worker with 2 slots writes 3 batches: the third goes into the first's slot. Taking the first
    then raises rather than giving the third's pixels; the other two are taken as they were written."""
    slots = BatchSlots(num_workers=1, slots_per_worker=2, batch_size=3, image_shape=(32, 32, 3))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=generator) for _ in range(3)]
    messages = [pickle.dumps(slots.put(0, batch)) for batch in batches]
    assert all(len(message) < 1000 < batches[0].numel() for message in messages)  # the pixels are not in it
    with pytest.raises(BatchOverwritten, match="wrote over a batch"):
        pickle.loads(messages[0])
    for message, batch in zip(messages[1:], batches[1:]):
        taken = pickle.loads(message)
        assert torch.equal(taken, batch) and not taken.is_shared()


def test_a_slot_being_written_is_not_taken():
    slots = BatchSlots(num_workers=1, slots_per_worker=1, batch_size=2, image_shape=(SIZE, SIZE, 3))
    message = pickle.dumps(slots.put(0, torch.stack([pixels_of(0), pixels_of(1)])))
    slots.tickets[0] = 0  # as a worker leaves it while it copies the next batch in
    with pytest.raises(BatchOverwritten):
        pickle.loads(message)
