"""`lsun-ddpm prepare` and training from a prepared dataset."""

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from lsun_ddpm.data import prepare, prepared
from lsun_ddpm.data.datasets import PreprocessedImages, make_dataloader
from lsun_ddpm.data.prepare import SourceOptions, prepare_dataset
from lsun_ddpm.data.prepared import load_prepared_images
from lsun_ddpm.data.preprocessing import ImagePreprocessor
from lsun_ddpm.data.sources import load_image_dataset
from lsun_ddpm.errors import InputError

from conftest import (TINY_RUN, assert_bitwise_equal, exported_weights, make_image, read_summary, run_cli,
                      run_script_directly, run_training)

RESOLUTION = 16


def decoded_tensors(folder, preprocess, epoch):
    """Every item of the decoded-per-step training dataset of `folder`."""
    decoded = PreprocessedImages(load_image_dataset(train_data_dir=str(folder)), preprocess, seed=3)
    decoded.set_epoch(epoch)
    return [decoded[index]["pixels"] for index in range(len(decoded))]


def prepared_tensors(folder, preprocess, epoch):
    """Every item of the prepared dataset, read as the DataLoader reads it: whole batches, shuffled."""
    prepared = load_prepared_images(str(folder), preprocess, seed=3)
    prepared.set_epoch(epoch)
    order = torch.randperm(len(prepared), generator=torch.Generator().manual_seed(epoch)).tolist()
    items = {}
    for start in range(0, len(order), 5):
        indices = order[start:start + 5]
        items.update(zip(indices, prepared.__getitems__(indices)["pixels"]))
    assert torch.equal(prepared[order[0]]["pixels"], items[order[0]])  # one item alone, the same
    return [items[index] for index in range(len(prepared))]


def prepare_folder(source, output, center_crop=True, **options):
    preprocess = ImagePreprocessor(RESOLUTION, center_crop, random_flip=False)
    return prepare_dataset(SourceOptions(train_data_dir=str(source)), preprocess, str(output), **options)


def shard_files(output):
    return sorted(path.name for path in (output / "shards").glob("*.arrow"))


@pytest.mark.parametrize("center_crop", [True, False])
def test_prepared_dataset_gives_exactly_the_decoded_tensors(image_folder, tmp_path, center_crop):
    prepare_folder(image_folder, tmp_path / "prepared", center_crop, shard_size=5)
    for random_flip in (False, True):
        preprocess = ImagePreprocessor(RESOLUTION, center_crop, random_flip)
        for epoch in (0, 1):
            expected = decoded_tensors(image_folder, preprocess, epoch)
            got = prepared_tensors(tmp_path / "prepared", preprocess, epoch)
            assert len(got) == len(expected) == 32
            for a, b in zip(got, expected):
                assert a.dtype == torch.uint8 and torch.equal(a, b)
    # and the flips did happen: epoch 0 and 1 differ for some item
    flipping = ImagePreprocessor(RESOLUTION, center_crop, random_flip=True)
    assert any(not torch.equal(a, b) for a, b in zip(prepared_tensors(tmp_path / "prepared", flipping, 0),
                                                      prepared_tensors(tmp_path / "prepared", flipping, 1)))


@pytest.mark.parametrize("workers", [0, 1])
def test_training_dataloader_hands_over_whole_prepared_batches(image_folder, tmp_path, workers):
    prepare_folder(image_folder, tmp_path / "prepared", shard_size=10)
    preprocess = ImagePreprocessor(RESOLUTION, random_flip=True)
    dataset = load_prepared_images(str(tmp_path / "prepared"), preprocess, seed=3)
    dataset.set_epoch(1)
    batches = list(make_dataloader(dataset, batch_size=4, num_workers=workers))
    assert len(batches) == 8
    assert all(batch.keys() == {"pixels"} and batch["pixels"].shape == (4, RESOLUTION, RESOLUTION, 3)
               and batch["pixels"].dtype == torch.uint8 for batch in batches)
    got = sorted(bytes(image.numpy()) for batch in batches for image in batch["pixels"])
    assert got == sorted(bytes(image.numpy()) for image in decoded_tensors(image_folder, preprocess, 1))


def test_max_train_samples_of_a_prepared_dataset_are_its_first_images(image_folder, tmp_path):
    prepare_folder(image_folder, tmp_path / "prepared", shard_size=5)
    preprocess = ImagePreprocessor(RESOLUTION, random_flip=True)
    first = load_prepared_images(str(tmp_path / "prepared"), preprocess, seed=3, max_train_samples=7)
    assert len(first) == 7
    batch = first.__getitems__(list(range(7)))["pixels"]
    for got, expected in zip(batch, decoded_tensors(image_folder, preprocess, epoch=0)[:7]):
        assert torch.equal(got, expected)
    with pytest.raises(IndexError):
        first.__getitems__([7])


def test_a_prepared_dataset_pickles_as_its_files_not_its_pixels(image_folder, tmp_path):
    """A spawned DataLoader worker gets the dataset pickled: the pixels must stay in the files it maps."""
    prepare_folder(image_folder, tmp_path / "prepared", shard_size=10)
    preprocess = ImagePreprocessor(RESOLUTION, random_flip=True)
    pickled = pickle.dumps(load_prepared_images(str(tmp_path / "prepared"), preprocess, seed=3))
    assert len(pickled) < 32 * RESOLUTION * RESOLUTION * 3 / 4
    unpickled = pickle.loads(pickled)
    for index, expected in enumerate(decoded_tensors(image_folder, preprocess, epoch=0)):
        assert torch.equal(unpickled[index]["pixels"], expected)


@pytest.mark.parametrize("binary_type", [pa.binary(), pa.large_binary()])
def test_binary_views_of_a_sliced_arrow_array(binary_type):
    array = pa.array([b"ab", b"cde", b"", b"fghi", b"j"], type=binary_type).slice(1, 3)
    offsets, data = prepared.binary_views(array)
    assert [bytes(data[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)] == [b"cde", b"", b"fghi"]


def test_records_are_uint8_pixels_with_their_source(image_folder, tmp_path):
    metadata = prepare_folder(image_folder, tmp_path / "prepared", shard_size=10)
    assert metadata["complete"] and metadata["images"] == 32 and len(metadata["shards"]) == 4
    assert metadata["preprocessing"] == {"resolution": RESOLUTION, "center_crop": True, "min_image_size": 0}
    table = load_prepared_images(str(tmp_path / "prepared"), ImagePreprocessor(RESOLUTION)).dataset
    record = table[0]
    assert (record["height"], record["width"]) == (RESOLUTION, RESOLUTION)
    assert len(record["pixels"]) == RESOLUTION * RESOLUTION * 3
    assert record["source"].startswith(str(image_folder)) and record["source"].endswith(".jpg")


def test_interrupted_prepare_resumes_without_redoing_complete_shards(image_folder, tmp_path, monkeypatch):
    output = tmp_path / "prepared"
    original = prepare.resized_record
    calls = {"count": 0}

    def fail_in_the_second_shard(*args):
        calls["count"] += 1
        if calls["count"] == 13:  # the third image of the second shard (10 a shard)
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(prepare, "resized_record", fail_in_the_second_shard)
    with pytest.raises(SystemExit) as interrupted:
        prepare_folder(image_folder, output, shard_size=10)
    assert interrupted.value.code == 130  # as a shell reports Ctrl-C
    assert shard_files(output) == ["shard-00000.arrow"]
    with pytest.raises(InputError, match="unfinished prepared dataset"):
        load_prepared_images(str(output), ImagePreprocessor(RESOLUTION))

    assert not list((output / "shards").glob(".*"))  # the interrupted shard's partial file was removed
    # half-written shards left behind (as by a killed process, and by its orphaned worker) must not be read
    (output / "shards" / ".shard-00001.arrow.partial").write_bytes(b"half a shard")
    (output / "shards" / ".shard-00001.arrow.partial-4242").write_bytes(b"another half")
    written = []
    original_write_shard = prepare.write_shard
    monkeypatch.setattr(prepare, "resized_record", original)
    monkeypatch.setattr(prepare, "write_shard", lambda job: written.append(job.index) or original_write_shard(job))
    metadata = prepare_folder(image_folder, output, shard_size=10)
    assert written == [1, 2, 3]
    assert metadata["images"] == 32
    assert not list((output / "shards").glob(".*"))
    preprocess = ImagePreprocessor(RESOLUTION)
    for a, b in zip(prepared_tensors(output, preprocess, 0), decoded_tensors(image_folder, preprocess, 0),
                    strict=True):
        assert torch.equal(a, b)


def write_images(folder: Path, count: int, rng: np.random.Generator) -> Path:
    """`count` 24x20 PNGs named 0.png, 1.png, ... in `folder`."""
    folder.mkdir()
    for index in range(count):
        make_image(rng, 24, 20).save(folder / f"{index}.png")
    return folder


def test_rerun_with_other_settings_or_changed_images_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    source = write_images(tmp_path / "images", 4, rng)
    prepare_folder(source, tmp_path / "prepared", shard_size=2)
    with pytest.raises(InputError, match="another shard_size"):
        prepare_folder(source, tmp_path / "prepared", shard_size=3)
    make_image(rng, 24, 20).save(source / "1.png")
    with pytest.raises(InputError, match=r"another source_fingerprint \(the source images changed\)"):
        prepare_folder(source, tmp_path / "prepared", shard_size=2)


def test_a_folder_holding_other_files_is_refused(image_folder, tmp_path):
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="is not empty and holds no prepared dataset"):
        prepare_folder(image_folder, tmp_path / "prepared")


def test_bad_images_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    source = write_images(tmp_path / "images", 6, rng)
    (source / "2.png").write_bytes(b"not an image")
    make_image(rng, 12, 10).save(source / "small.png")  # below the resolution: upscaled and counted
    metadata = prepare_folder(source, tmp_path / "prepared", shard_size=4)
    assert metadata["images"] == 6
    assert metadata["images_skipped"] == 1 and metadata["images_skipped_examples"][0].startswith(str(source / "2.png"))
    assert metadata["images_upscaled"] == 1 and "small.png" in metadata["images_upscaled_examples"][0]
    assert len(load_prepared_images(str(tmp_path / "prepared"), ImagePreprocessor(RESOLUTION))) == 6


def test_training_at_another_resolution_is_refused(image_folder, tmp_path):
    prepare_folder(image_folder, tmp_path / "prepared", shard_size=10)
    with pytest.raises(InputError) as error:
        load_prepared_images(str(tmp_path / "prepared"), ImagePreprocessor(32))
    assert str(error.value) == (
        f"--train_data_dir {str(tmp_path / 'prepared')!r} was prepared with resolution 16, but this run uses "
        "resolution 32: train with --resolution 16, or prepare the images again with --resolution 32")
    with pytest.raises(InputError, match="center_crop True, but this run uses center_crop False: train with "
                       "--center_crop True, or prepare the images again with --no_center_crop$"):
        load_prepared_images(str(tmp_path / "prepared"), ImagePreprocessor(RESOLUTION, center_crop=False))


def test_training_with_another_min_image_size_is_refused(image_folder, tmp_path):
    """Prepared without a minimum, the dataset holds images a run with --min_image_size 20 would have skipped."""
    prepare_folder(image_folder, tmp_path / "prepared", shard_size=10)
    with pytest.raises(InputError) as error:
        load_prepared_images(str(tmp_path / "prepared"), ImagePreprocessor(RESOLUTION, min_image_size=20))
    assert str(error.value) == (
        f"--train_data_dir {str(tmp_path / 'prepared')!r} was prepared with min_image_size 0, but this run uses "
        "min_image_size 20: train with --min_image_size 0, or prepare the images again with --min_image_size 20")


@pytest.mark.slow
def test_two_processes_write_the_same_dataset_as_one(image_folder, tmp_path):
    prepare_folder(image_folder, tmp_path / "one", shard_size=10, num_proc=1)
    prepare_folder(image_folder, tmp_path / "two", shard_size=10, num_proc=2)
    assert shard_files(tmp_path / "one") == shard_files(tmp_path / "two")
    for name in shard_files(tmp_path / "one"):
        assert (tmp_path / "one/shards" / name).read_bytes() == (tmp_path / "two/shards" / name).read_bytes()
    one, two = (json.loads((tmp_path / name / "prepared_dataset.json").read_text()) for name in ("one", "two"))
    assert one == two


@pytest.mark.slow
def test_training_from_a_prepared_dataset(image_folder, tmp_path):
    """It trains exactly as from the images it was made of: the same batches, flips and noise (10 steps of
    4 images are more than one pass over the 32, so two epochs' flips), read in the training process or by
    2 DataLoader workers (5 batches each)."""
    run_cli(tmp_path, "prepare", "--train_data_dir", str(image_folder), "--resolution", "16",
            "--output_dir", str(tmp_path / "prepared"), "--shard_size", "16")
    quick = ["--save_images_steps", "100", "--save_model_steps", "100", "--logger", "none"]
    steps = ["--resolution", "16", "--max_train_steps", "10", "--random_flip", "true"]
    run_training(tmp_path, tmp_path / "run", ["--train_data_dir", str(tmp_path / "prepared"), *quick, *steps])
    assert read_summary(tmp_path / "run")["optimizer_steps"] == 10
    run_training(tmp_path, tmp_path / "decoded", ["--train_data_dir", str(image_folder), *quick, *steps])
    assert_bitwise_equal(exported_weights(tmp_path / "decoded"), exported_weights(tmp_path / "run"))
    run_training(tmp_path, tmp_path / "workers", ["--train_data_dir", str(tmp_path / "prepared"), *quick, *steps,
                                                  "--dataloader_num_workers", "2"])
    assert_bitwise_equal(exported_weights(tmp_path / "decoded"), exported_weights(tmp_path / "workers"))
    quick = ["--train_data_dir", str(tmp_path / "prepared"), *quick]
    refused = run_script_directly(tmp_path, *TINY_RUN, *quick, "--output_dir", str(tmp_path / "run32"),
                                  "--resolution", "32", "--max_train_steps", "1")
    assert refused.returncode == 2
    assert "was prepared with resolution 16, but this run uses resolution 32" in refused.stderr


def test_prepare_under_a_multi_process_launch_is_refused(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch and torchrun set it
    with pytest.raises(InputError, match="without `accelerate launch`"):
        prepare_folder(image_folder, tmp_path / "prepared", shard_size=16)
    assert not (tmp_path / "prepared").exists()


def test_a_run_without_a_seed_flips_prepared_images_as_with_seed_0(image_folder, tmp_path):
    """--seed is optional in training (None), as in diffusers' script; decoded images then use seed 0."""
    prepare_folder(image_folder, tmp_path / "prepared", shard_size=16)
    flipping = ImagePreprocessor(RESOLUTION, random_flip=True)
    unseeded = load_prepared_images(str(tmp_path / "prepared"), flipping, seed=None)
    seeded = load_prepared_images(str(tmp_path / "prepared"), flipping, seed=0)
    for index in range(len(seeded)):
        assert torch.equal(unseeded[index]["pixels"], seeded[index]["pixels"])


def test_commands_other_than_training_refuse_a_prepared_folder_clearly(image_folder, tmp_path):
    prepare_folder(image_folder, tmp_path / "prepared", shard_size=10)
    with pytest.raises(InputError, match="is a prepared dataset, which only training reads"):
        load_image_dataset(train_data_dir=str(tmp_path / "prepared"))
