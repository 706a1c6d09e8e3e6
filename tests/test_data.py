"""One preprocessing for every image, local folders of any depth, and clear errors."""

import io
import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image

from lsun_ddpm.data import (SKIPPED, UPSCALED, DatasetUnavailableError, ImagePreprocessor, ImageReport,
                            PreprocessedStream, load_image_dataset, make_dataloader, make_training_dataset,
                            resize_shorter_side)
from lsun_ddpm.pipelines.ddpm_interpolation import open_rgb


def halves_image(width, height):
    """Left half red, right half blue."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(array)


def test_resize_shorter_side_box_halves_then_bicubic(monkeypatch):
    calls = []
    original = Image.Image.resize

    def spy(self, size, resample=None, *args, **kwargs):
        calls.append((self.size, tuple(size), resample))
        return original(self, size, resample, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    out = resize_shorter_side(Image.new("RGB", (600, 400)), 64)
    assert out.size == (96, 64)
    assert [c[2] for c in calls] == [Image.BOX, Image.BOX, Image.BICUBIC]
    assert [c[1] for c in calls[:2]] == [(300, 200), (150, 100)]


@pytest.mark.parametrize("size", [(40, 17), (17, 40), (16, 16), (300, 16)])
def test_preprocessing_shape_range_and_dtype(size):
    x = ImagePreprocessor(16)(halves_image(*size))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1


def test_preprocessing_scales_to_minus_one_one():
    white = ImagePreprocessor(8)(Image.new("RGB", (8, 8), (255, 255, 255)))
    black = ImagePreprocessor(8)(Image.new("RGB", (8, 8), (0, 0, 0)))
    assert torch.all(white == 1) and torch.all(black == -1)


def test_centre_crop_keeps_the_middle():
    image = Image.new("RGB", (48, 16), (0, 255, 0))
    image.paste((255, 0, 0), (16, 0, 32, 16))  # red middle third
    x = ImagePreprocessor(16, center_crop=True)(image)
    assert torch.all(x[0] == 1) and torch.all(x[1] == -1)


def test_random_flip_flips_about_half_the_time():
    torch.manual_seed(0)
    preprocess = ImagePreprocessor(16, random_flip=True)
    left_red = [bool(preprocess(halves_image(16, 16))[0, 0, 0] > 0) for _ in range(200)]
    assert 70 < sum(left_red) < 130
    assert all(ImagePreprocessor(16)(halves_image(16, 16))[0, 0, 0] > 0 for _ in range(5))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_any_image_mode_becomes_rgb(mode):
    image = halves_image(20, 20).convert(mode) if mode != "I;16" else Image.new("I;16", (20, 20), 1000)
    assert ImagePreprocessor(16)(image).shape == (3, 16, 16)


def test_transparent_pixels_become_white():
    x = ImagePreprocessor(8)(Image.new("RGBA", (8, 8), (0, 0, 0, 0)))
    assert torch.all(x == 1)


def test_jpeg_is_decoded_at_reduced_size_but_not_below_the_resolution():
    buffer = io.BytesIO()
    halves_image(512, 384).save(buffer, format="JPEG")
    image = open_rgb(buffer.getvalue(), resolution=64)
    assert min(image.size) >= 64 and image.size[0] < 512  # DCT-scaled, still big enough
    assert ImagePreprocessor(64)(buffer.getvalue()).shape == (3, 64, 64)


def test_image_folder_of_any_depth_and_format(image_folder):
    dataset = load_image_dataset(train_data_dir=str(image_folder))
    assert len(dataset) == 32 and dataset.column_names == ["image"]
    paths = sorted(row["image"]["path"] for row in dataset)
    assert any("nested/deeper" in p for p in paths)
    assert {p.rsplit(".", 1)[1] for p in paths} == {"png", "jpg", "webp"}
    subset = load_image_dataset(train_data_dir=str(image_folder), max_train_samples=5)
    assert len(subset) == 5


def test_dataloader_yields_full_fp32_batches(image_folder):
    dataset = make_training_dataset(load_image_dataset(train_data_dir=str(image_folder)), ImagePreprocessor(16))
    batches = list(make_dataloader(dataset, batch_size=5))
    assert len(batches) == 6  # 32 // 5, the short last batch dropped
    assert all(b["pixel_values"].shape == (5, 3, 16, 16) and b["pixel_values"].dtype == torch.float32
               for b in batches)


def sorted_images(tensors) -> torch.Tensor:
    """The tensors in a fixed order that does not depend on the order they came in."""
    return torch.stack(sorted(tensors, key=lambda x: x.flatten().tolist()))


def test_streaming_folder_gives_the_same_tensors(image_folder):
    preprocess = ImagePreprocessor(16)  # centre crop, no flip: nothing random
    files = [p for p in image_folder.rglob("*") if p.is_file()]
    expected = sorted_images(preprocess(path.read_bytes()) for path in files)
    stream = load_image_dataset(train_data_dir=str(image_folder), streaming=True)
    batches = list(make_dataloader(make_training_dataset(stream, preprocess, seed=0), 4))
    assert all(batch["pixel_values"].shape == (4, 3, 16, 16) for batch in batches)
    assert torch.equal(sorted_images(torch.cat([b["pixel_values"] for b in batches])), expected)
    downloaded = make_training_dataset(load_image_dataset(train_data_dir=str(image_folder)), preprocess)
    assert torch.equal(sorted_images(downloaded[i]["pixel_values"] for i in range(len(downloaded))), expected)


def test_crops_and_flips_depend_only_on_seed_epoch_and_item(image_folder):
    """Not on the order items are read in, the global RNG, or the DataLoader worker that reads them."""
    dataset = make_training_dataset(load_image_dataset(train_data_dir=str(image_folder)),
                                    ImagePreprocessor(16, center_crop=False, random_flip=True), seed=3)
    dataset.set_epoch(1)
    torch.manual_seed(0)
    forwards = [dataset[i]["pixel_values"] for i in range(len(dataset))]
    torch.manual_seed(1)
    backwards = [dataset[i]["pixel_values"] for i in reversed(range(len(dataset)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forwards, backwards))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    assert torch.equal(torch.cat([b["pixel_values"] for b in loader]), torch.stack(forwards))
    dataset.set_epoch(2)
    assert sum(not torch.equal(dataset[i]["pixel_values"], forwards[i]) for i in range(len(dataset))) > 8


def report_of(items) -> ImageReport:
    """The report the training loop builds from these items' notes."""
    report = ImageReport()
    report.add_batch({"image_notes": torch.stack([item["image_notes"] for item in items])})
    return report


def test_unreadable_image_is_skipped_with_a_warning(tmp_path, caplog):
    for index in range(3):
        halves_image(20, 20).save(tmp_path / f"{index}.png")
    (tmp_path / "1.png").write_bytes(b"not an image at all")
    dataset = make_training_dataset(load_image_dataset(train_data_dir=str(tmp_path)), ImagePreprocessor(16))
    with caplog.at_level(logging.WARNING):
        items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 3 and all(item["pixel_values"].shape == (3, 16, 16) for item in items)
    assert report_of(items).count(SKIPPED) == 1 and "1.png" in caplog.text


def test_unreadable_streamed_image_is_skipped_counted_and_named(tmp_path, caplog):
    for index in range(3):
        halves_image(20, 20).save(tmp_path / f"{index}.png")
    (tmp_path / "1.png").write_bytes(b"not an image at all")
    # Not shuffled: a skip is noted on the next item, so one at the very end of a stream goes unnoted.
    stream = PreprocessedStream(load_image_dataset(train_data_dir=str(tmp_path), streaming=True),
                                ImagePreprocessor(16))
    with caplog.at_level(logging.WARNING):
        items = list(stream)
    assert len(items) == 2 and all(item["pixel_values"].shape == (3, 16, 16) for item in items)
    report = report_of(items)
    assert report.count(SKIPPED) == 1 and "1.png" in report.examples(SKIPPED)[0] and "1.png" in caplog.text


def write_broken_images(folder, count):
    folder.mkdir(exist_ok=True)
    for index in range(count):
        (folder / f"{index:03d}.png").write_bytes(b"not an image at all")
    return folder


@pytest.mark.parametrize("streaming", [True, False])
def test_a_hundred_unreadable_images_in_a_row_are_a_clear_error(tmp_path, streaming):
    images = load_image_dataset(train_data_dir=str(write_broken_images(tmp_path / "broken", 100)),
                                streaming=streaming)
    dataset = make_training_dataset(images, ImagePreprocessor(16), seed=0)
    with pytest.raises(DatasetUnavailableError, match="100 unusable images in a row"):
        list(dataset) if streaming else dataset[0]


def test_ninety_nine_unreadable_images_in_a_row_are_only_skipped(tmp_path):
    images = load_image_dataset(train_data_dir=str(write_broken_images(tmp_path / "broken", 99)), streaming=True)
    stream = make_training_dataset(images, ImagePreprocessor(16), seed=0)
    assert list(stream) == []  # 99 skips, then the end of the stream: no error


def test_too_few_images_for_one_batch_is_a_clear_error(tmp_path):
    halves_image(20, 20).save(tmp_path / "only.png")
    dataset = make_training_dataset(load_image_dataset(train_data_dir=str(tmp_path)), ImagePreprocessor(16))
    with pytest.raises(DatasetUnavailableError, match="fewer than one micro-batch"):
        make_dataloader(dataset, batch_size=8)


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="not a directory"):
        load_image_dataset(train_data_dir=str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetUnavailableError, match="holds no images"):
        load_image_dataset(train_data_dir=str(tmp_path))


def test_hub_dataset_without_network_fails_fast_and_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    started = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match="--train_data_dir"):
        load_image_dataset(dataset_name="pcuenq/lsun-bedrooms")
    assert time.perf_counter() - started < 15  # not datasets' ~25 s of retries


def test_offline_mode_without_a_cached_copy_also_points_to_train_data_dir(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DatasetUnavailableError, match="--train_data_dir"):
        load_image_dataset(dataset_name="someone/not-cached")
