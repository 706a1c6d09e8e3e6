"""LSUN's LMDB exports train directly, with the same preprocessing as a folder of the same images."""

import hashlib
import sys

import numpy as np
import pytest
import torch

from conftest import make_image, read_summary, run_training
from lsun_ddpm.data.preprocessing import ImagePreprocessor
from lsun_ddpm.data.sources import load_image_dataset
from lsun_ddpm.data.datasets import make_dataloader, make_training_dataset
from lsun_ddpm.errors import InputError

lmdb = pytest.importorskip("lmdb", reason="the lsun extra (pip install lmdb)")


def write_lmdb(folder, records: dict[bytes, bytes]):
    """An LMDB like LSUN's exports: one `data.mdb`, keys (hex digests) → encoded image bytes."""
    with lmdb.open(str(folder), map_size=1 << 26) as environment, environment.begin(write=True) as transaction:
        for key, value in records.items():
            transaction.put(key, value)
    return folder


def lsun_key(name: str) -> bytes:
    return hashlib.sha1(name.encode()).hexdigest().encode()


def sorted_images(tensors) -> torch.Tensor:
    return torch.stack(sorted(tensors, key=lambda x: x.flatten().tolist()))


def test_lmdb_gives_the_same_tensors_as_the_same_images_in_a_folder(image_folder, tmp_path):
    files = sorted(path for path in image_folder.rglob("*") if path.is_file())
    folder = write_lmdb(tmp_path / "bedroom_train_lmdb", {lsun_key(path.name): path.read_bytes() for path in files})
    preprocess = ImagePreprocessor(16)  # centre crop, no flip: nothing random
    from_folder = make_training_dataset(load_image_dataset(train_data_dir=str(image_folder)), preprocess)
    expected = sorted_images(from_folder[i]["pixels"] for i in range(len(from_folder)))

    records = load_image_dataset(train_data_dir=str(folder))
    assert len(records) == len(files) and records.column_names == ["image"]
    assert records[0]["image"]["path"].endswith(":" + min(lsun_key(path.name) for path in files).decode())
    from_lmdb = make_training_dataset(records, preprocess)
    assert torch.equal(sorted_images(from_lmdb[i]["pixels"] for i in range(len(from_lmdb))), expected)

    stream = load_image_dataset(train_data_dir=str(folder), streaming=True)
    assert stream.n_shards > 1  # DataLoader workers share the decoding
    batches = make_dataloader(make_training_dataset(stream, preprocess, seed=0), batch_size=4, num_workers=2)
    assert torch.equal(sorted_images(torch.cat([batch["pixels"] for batch in batches])), expected)


@pytest.mark.parametrize("streaming", [False, True])
def test_max_train_samples_of_an_lmdb_are_its_first_records_whatever_the_workers(tmp_path, streaming):
    """640 records (64 shards of 10 when streamed), the first 100 of them read by 4 DataLoader workers."""
    keys = [f"{index:04d}".encode() for index in range(640)]
    folder = write_lmdb(tmp_path / "lmdb", {key: key for key in keys})
    records = load_image_dataset(train_data_dir=str(folder), streaming=streaming, max_train_samples=100)
    loader = torch.utils.data.DataLoader(records, batch_size=None, num_workers=4 if streaming else 0,
                                         collate_fn=lambda item: item)
    assert sorted(item["image"]["bytes"] for item in loader) == keys[:100]


def encoded(image, format="WEBP") -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=format, lossless=True)
    return buffer.getvalue()


@pytest.mark.slow
def test_training_on_an_lmdb_reports_its_broken_and_small_records(tmp_path):
    rng = np.random.default_rng(0)
    records = {lsun_key(f"good-{index}"): encoded(make_image(rng, 24, 20)) for index in range(6)}
    records[lsun_key("broken")] = b"\x00not webp"
    records[lsun_key("small")] = encoded(make_image(rng, 12, 12))  # below the 16 px of tiny16
    folder = write_lmdb(tmp_path / "bedroom_train_lmdb", records)
    output_dir = tmp_path / "run"
    # 8 records, micro-batch 4, 2 steps: one epoch, so every record is read (the broken one once).
    result = run_training(tmp_path, output_dir, ["--train_data_dir", str(folder), "--max_train_steps", "2",
                                                 "--gradient_accumulation_steps", "1"])
    summary = read_summary(output_dir)
    assert summary["optimizer_steps"] == 2
    assert summary["images_skipped"] == 1 and summary["images_upscaled"] == 1
    broken, small = lsun_key("broken").decode(), lsun_key("small").decode()
    assert broken in summary["images_skipped_examples"][0] and small in summary["images_upscaled_examples"][0]
    log = result.stdout + result.stderr
    assert "1 image skipped" in log and broken in log.split("1 image skipped", 1)[1]


def test_an_lmdb_without_the_lmdb_package_is_a_clear_error(tmp_path, monkeypatch):
    folder = write_lmdb(tmp_path / "bedroom_train_lmdb", {b"0": encoded(make_image(np.random.default_rng(0), 20, 20))})
    monkeypatch.setitem(sys.modules, "lmdb", None)  # `import lmdb` now raises ImportError
    with pytest.raises(InputError, match=r'needs the lmdb package: pip install "lsun-ddpm\[lsun\]"'):
        load_image_dataset(train_data_dir=str(folder))


def test_an_empty_lmdb_is_a_clear_error(tmp_path):
    folder = write_lmdb(tmp_path / "bedroom_train_lmdb", {})
    with pytest.raises(InputError, match="no records"):
        load_image_dataset(train_data_dir=str(folder))
