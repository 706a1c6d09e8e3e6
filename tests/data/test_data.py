"""One preprocessing for every image, local folders of any depth, and clear errors."""

import io
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lsun_ddpm.data.report import ImageReport, SKIPPED, UPSCALED, decode_notes, encode_notes, summarise_image_reports
from lsun_ddpm.errors import DatasetUnavailableError
from lsun_ddpm.data.preprocessing import ImagePreprocessor, augmentation_generator, to_model_input
from lsun_ddpm.data.datasets import PreprocessedStream, make_dataloader, make_training_dataset
from lsun_ddpm.data.sources import load_image_dataset, walk_images
from lsun_ddpm.pipelines.ddpm_interpolation import resize_shorter_side
from lsun_ddpm.pipelines import ddpm_interpolation
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


def test_a_batch_flips_each_image_whose_first_draw_is_below_one_half():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(16)]
    originals = [image.copy() for image in images]
    first_draws = [torch.rand((), generator=torch.Generator().manual_seed(seed)).item() for seed in range(16)]
    flipped = [draw < 0.5 for draw in first_draws]
    assert 0 < sum(flipped) < 16

    batch = ImagePreprocessor(8, random_flip=True).augment_batch(
        images, [torch.Generator().manual_seed(seed) for seed in range(16)])
    assert batch.shape == (16, 8, 8, 3) and batch.dtype == torch.uint8
    for got, original, flip in zip(batch, originals, flipped):
        assert np.array_equal(got.numpy(), np.fliplr(original) if flip else original)
    assert all(np.array_equal(image, original) for image, original in zip(images, originals))  # not written to

    unflipped = ImagePreprocessor(8).augment_batch(images, [torch.Generator().manual_seed(s) for s in range(16)])
    assert np.array_equal(unflipped.numpy(), np.stack(originals))


def test_augmentation_seeds_differ_for_every_seed_epoch_and_position():
    keys = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 0, 2**40)]
    seeds = [augmentation_generator(*key).initial_seed() for key in keys]
    assert len(set(seeds)) == len(keys)
    assert seeds[1] == augmentation_generator(0, 0, 1).initial_seed()  # and the same key, the same seed


def test_dataloader_passes_on_a_batch_read_whole():
    class WholeBatches(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitems__(self, indices):
            return {"pixels": torch.tensor(indices).view(-1, 1, 1, 1).expand(-1, 2, 2, 3).to(torch.uint8)}

    for workers in (0, 1):
        batches = list(make_dataloader(WholeBatches(), batch_size=3, num_workers=workers))
        assert [b["pixels"].shape for b in batches] == [(3, 2, 2, 3)] * 2
        assert sorted(torch.cat([b["pixels"][:, 0, 0, 0] for b in batches]).tolist()) == list(range(6))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_any_image_mode_becomes_rgb(mode):
    image = halves_image(20, 20).convert(mode) if mode != "I;16" else Image.new("I;16", (20, 20), 1000)
    assert ImagePreprocessor(16)(image).shape == (3, 16, 16)


def test_transparent_pixels_become_white():
    x = ImagePreprocessor(8)(Image.new("RGBA", (8, 8), (0, 0, 0, 0)))
    assert torch.all(x == 1)


def test_the_transparent_value_of_a_16_bit_grey_png_becomes_white(tmp_path):
    """tRNS names one 16-bit value transparent: 1000 is drawn white, 30000 stays grey (30000 / 257 → 117)."""
    Image.fromarray(np.array([[1000, 30000]], dtype=np.uint16)).save(tmp_path / "grey.png", transparency=1000)
    pixels = np.asarray(open_rgb(tmp_path / "grey.png"))
    assert pixels.tolist() == [[[255, 255, 255], [117, 117, 117]]]


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


def listed_names(folder) -> list[str]:
    dataset = load_image_dataset(train_data_dir=str(folder))
    return sorted(Path(row["image"]["path"]).relative_to(folder).as_posix() for row in dataset)


def test_file_names_are_names_not_glob_patterns(tmp_path, caplog):
    names = ["b*.png", "b1.png", "b2.png", "photo [1].png", "photo 1.png", "what?.png"]
    for name in [*names, "zz::chained.png"]:
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    with caplog.at_level(logging.WARNING):
        assert listed_names(tmp_path) == sorted(names)  # each file once; `::` cannot be opened by 🤗 datasets
    assert "left out 1 image(s) whose path holds '::'" in caplog.text and "zz::chained.png" in caplog.text


def test_linked_folders_are_read_once_each(tmp_path):
    (tmp_path / "photos" / "inner").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "inner" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "b.png")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "photos")
    (tmp_path / "data" / "linked_again").symlink_to(tmp_path / "photos")  # the same folder twice
    (tmp_path / "photos" / "inner" / "up").symlink_to(tmp_path / "data")  # a loop
    assert listed_names(tmp_path / "data") == ["linked/b.png", "linked/inner/a.png"]


def test_a_folder_is_the_same_dataset_however_it_is_spelled(image_folder, monkeypatch):
    """`prepare` checks the source's fingerprint on resume: `DIR`, `./DIR` and `/abs/DIR` must agree."""
    absolute = load_image_dataset(train_data_dir=str(image_folder))
    monkeypatch.chdir(image_folder.parent)
    relative = load_image_dataset(train_data_dir=f"./{image_folder.name}/../{image_folder.name}")
    assert relative._fingerprint == absolute._fingerprint


def streamed_paths(dataset, workers: int) -> list[str]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=lambda item: item)
    return [item["image"]["path"] for item in loader]


def test_a_streamed_folder_is_a_shard_a_file_shared_out_among_workers(image_folder):
    stream = load_image_dataset(train_data_dir=str(image_folder), streaming=True)
    assert stream.num_shards == 32  # so two DataLoader workers each read half of the files
    assert sorted(streamed_paths(stream, workers=2)) == sorted(walk_images(str(image_folder)))


def test_max_train_samples_of_a_streamed_folder_are_its_first_images_whatever_the_workers(image_folder):
    first_five = sorted(walk_images(str(image_folder)))[:5]
    assert [row["image"]["path"] for row in load_image_dataset(train_data_dir=str(image_folder),
                                                               max_train_samples=5)] == first_five
    stream = load_image_dataset(train_data_dir=str(image_folder), streaming=True, max_train_samples=5)
    assert sorted(streamed_paths(stream, workers=2)) == first_five


def test_dataloader_yields_full_uint8_batches(image_folder):
    dataset = make_training_dataset(load_image_dataset(train_data_dir=str(image_folder)), ImagePreprocessor(16))
    batches = list(make_dataloader(dataset, batch_size=5))
    assert len(batches) == 6  # 32 // 5, the short last batch dropped
    assert all(b["pixels"].shape == (5, 16, 16, 3) and b["pixels"].dtype == torch.uint8 for b in batches)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_model_input_is_pixels_over_127_5_minus_one(memory_format):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    expected = np.transpose(pixels.astype(np.float64) / 127.5 - 1.0, (0, 3, 1, 2))  # NHWC → NCHW
    model_input = to_model_input(torch.from_numpy(pixels), memory_format)
    assert model_input.dtype == torch.float32 and model_input.shape == (4, 3, 5, 6)
    assert model_input.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(model_input.double(), torch.from_numpy(expected), rtol=0, atol=1e-7)


def test_training_pixels_become_the_tensor_the_pipelines_preprocess_makes():
    """One conversion: a training item after `to_model_input` is what interpolation inputs are made into."""
    image = halves_image(24, 16)
    image.putpixel((3, 2), (7, 100, 201))
    pixels = ImagePreprocessor(16).prepare(image).pixels
    assert pixels.dtype == torch.uint8 and pixels.shape == (16, 16, 3)
    assert torch.equal(to_model_input(pixels), ddpm_interpolation.preprocess(image, 16))


def sorted_images(tensors) -> torch.Tensor:
    """The tensors in a fixed order that does not depend on the order they came in."""
    return torch.stack(sorted(tensors, key=lambda x: x.flatten().tolist()))


def test_streaming_folder_gives_the_same_tensors(image_folder):
    preprocess = ImagePreprocessor(16)  # centre crop, no flip: nothing random
    files = [p for p in image_folder.rglob("*") if p.is_file()]
    expected = sorted_images(preprocess.prepare(path.read_bytes()).pixels for path in files)
    stream = load_image_dataset(train_data_dir=str(image_folder), streaming=True)
    batches = list(make_dataloader(make_training_dataset(stream, preprocess, seed=0), 4))
    assert all(batch["pixels"].shape == (4, 16, 16, 3) for batch in batches)
    assert torch.equal(sorted_images(torch.cat([b["pixels"] for b in batches])), expected)
    downloaded = make_training_dataset(load_image_dataset(train_data_dir=str(image_folder)), preprocess)
    assert torch.equal(sorted_images(downloaded[i]["pixels"] for i in range(len(downloaded))), expected)


def test_crops_and_flips_depend_only_on_seed_epoch_and_item(image_folder):
    """Not on the order items are read in, the global RNG, or the DataLoader worker that reads them."""
    dataset = make_training_dataset(load_image_dataset(train_data_dir=str(image_folder)),
                                    ImagePreprocessor(16, center_crop=False, random_flip=True), seed=3)
    dataset.set_epoch(1)
    torch.manual_seed(0)
    forwards = [dataset[i]["pixels"] for i in range(len(dataset))]
    torch.manual_seed(1)
    backwards = [dataset[i]["pixels"] for i in reversed(range(len(dataset)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forwards, backwards))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    assert torch.equal(torch.cat([b["pixels"] for b in loader]), torch.stack(forwards))
    dataset.set_epoch(2)
    assert sum(not torch.equal(dataset[i]["pixels"], forwards[i]) for i in range(len(dataset))) > 8


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
    assert len(items) == 3 and all(item["pixels"].shape == (16, 16, 3) for item in items)
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
    assert len(items) == 2 and all(item["pixels"].shape == (16, 16, 3) for item in items)
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
    with pytest.raises(DatasetUnavailableError, match="100 unreadable images in a row"):
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


# ---------------------------------------------------------------- every image mode


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def pixels(source) -> np.ndarray:
    return np.asarray(open_rgb(source), dtype=np.int16)


def test_grey_becomes_the_same_grey_in_rgb():
    assert (pixels(encoded(Image.new("L", (4, 4), 77))) == 77).all()


def test_palette_with_a_transparent_entry_is_drawn_on_white():
    image = Image.new("P", (4, 2), 0)
    image.putpalette([255, 0, 0, 0, 255, 0])  # entry 0 red, entry 1 green (transparent below)
    image.paste(1, (2, 0, 4, 2))
    rgb = pixels(encoded(image, transparency=1))
    assert (rgb[:, :2] == (255, 0, 0)).all() and (rgb[:, 2:] == 255).all()


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (3, 1))
    image.putdata([(0, 0, 0, 0), (0, 0, 255, 255), (255, 0, 0, 128)])  # invisible black, blue, half red
    rgb = pixels(encoded(image))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == [0, 0, 255]
    assert rgb[0, 2, 0] == 255 and abs(rgb[0, 2, 1] - 127) <= 1 and abs(rgb[0, 2, 2] - 127) <= 1


def test_cmyk_becomes_rgb():
    image = Image.new("CMYK", (3, 1))
    image.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)])  # paper white, cyan ink, black ink
    assert pixels(encoded(image, "TIFF"))[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)  # 1000 / 257 = 3.9 → 4
    data = encoded(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # what PIL reads a 16-bit PNG as
    assert pixels(data)[0, :, 0].tolist() == [0, 128, 255, 4]


def test_sixteen_bit_grey_is_divided_by_257_the_factor_that_maps_65535_to_255():
    """Levels where dividing by 256 and by 257 round to different 8-bit values."""
    values = np.array([[51400, 60000, 30000]], np.uint16)
    by_257 = [round(v / 257) for v in values[0].tolist()]  # 200, 233, 117
    assert by_257 != [round(v / 256) for v in values[0].tolist()]  # 201, 234, 117: the wrong scale
    assert pixels(encoded(Image.fromarray(values)))[0, :, 0].tolist() == by_257


# EXIF orientation → what a viewer does to the stored pixels to display them, as numpy on (H, W, 3) arrays.
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180°
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the top-left diagonal
    6: lambda a: np.rot90(a, k=-1),  # rotated 90° clockwise
    7: lambda a: np.rot90(a, k=-1)[::-1],  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, k=1),  # rotated 90° counter-clockwise
}


@pytest.mark.parametrize("orientation", range(2, 9))
def test_every_exif_orientation_is_shown_as_a_viewer_shows_it(orientation):
    """A stored image with four differently coloured quadrants: after decoding, each quadrant is where the
    EXIF orientation tag says a viewer displays it (mirrorings included)."""
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:16, :24], stored[:16, 24:] = (255, 0, 0), (0, 255, 0)
    stored[16:, :24], stored[16:, 24:] = (0, 0, 255), (255, 255, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    decoded = pixels(encoded(image, "PNG", exif=exif))
    expected = DISPLAYED[orientation](stored)
    assert decoded.shape == expected.shape and np.array_equal(decoded, expected)


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # red top-left corner as stored
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phones write portraits
    rgb = pixels(encoded(stored, "JPEG", exif=exif, quality=95))
    assert rgb.shape == (64, 32, 3)  # displayed as a portrait
    assert np.abs(rgb[4, -5] - (255, 0, 0)).max() < 20  # the stored top-left is now the top-right
    assert np.abs(rgb[4, 4] - (0, 0, 255)).max() < 20


def test_floating_point_image_is_skipped_with_its_reason(tmp_path):
    images = [Image.new("F", (20, 20), 0.5), halves_image(20, 20)]
    dataset = make_training_dataset(datasets_of(images), ImagePreprocessor(16))
    report = report_of([dataset[0]])
    assert report.count(SKIPPED) == 1 and "mode F" in report.examples(SKIPPED)[0]


def datasets_of(images):
    """An in-memory 🤗 dataset of these PIL images, undecoded like the real ones."""
    import datasets

    return datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image(decode=False))


# ---------------------------------------------------------------- small images, skip reports


def test_small_images_are_upscaled_with_a_counted_warning(tmp_path, caplog):
    halves_image(40, 30).save(tmp_path / "big.png")
    halves_image(12, 10).save(tmp_path / "small.png")
    dataset = make_training_dataset(load_image_dataset(train_data_dir=str(tmp_path)), ImagePreprocessor(16))
    with caplog.at_level(logging.WARNING):
        items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 2 and all(item["pixels"].shape == (16, 16, 3) for item in items)
    report = report_of(items)
    assert report.count(UPSCALED) == 1 and report.count(SKIPPED) == 0
    assert "small.png" in report.examples(UPSCALED)[0] and "12x10" in report.examples(UPSCALED)[0]
    assert "small.png" in caplog.text


def test_min_image_size_skips_smaller_images(tmp_path):
    halves_image(40, 30).save(tmp_path / "big.png")
    halves_image(40, 12).save(tmp_path / "short.png")  # shorter side 12
    halves_image(14, 20).save(tmp_path / "upscaled.png")  # 14 ≥ 13: kept, upscaled to 16
    dataset = make_training_dataset(load_image_dataset(train_data_dir=str(tmp_path)),
                                    ImagePreprocessor(16, min_image_size=13))
    report = report_of([dataset[i] for i in range(len(dataset))])
    assert report.count(SKIPPED) == 1 and "short.png" in report.examples(SKIPPED)[0]
    assert report.count(UPSCALED) == 1 and "upscaled.png" in report.examples(UPSCALED)[0]


def test_skip_reports_count_images_decoded_in_dataloader_workers(tmp_path):
    for index in range(9):
        halves_image(20, 20).save(tmp_path / f"{index}.png")
    for index in (2, 6):
        (tmp_path / f"{index}.png").write_bytes(b"not an image at all")
    halves_image(10, 10).save(tmp_path / "4.png")
    dataset = make_training_dataset(load_image_dataset(train_data_dir=str(tmp_path)), ImagePreprocessor(16))
    report = ImageReport()
    for epoch in range(2):  # each file counted once, however often it comes back
        dataset.set_epoch(epoch)
        for batch in make_dataloader(dataset, batch_size=3, num_workers=2):  # 9 items: no batch dropped
            report.add_batch(batch)
    assert report.count(SKIPPED) == 2 and report.count(UPSCALED) == 1
    assert sorted(example.split(":")[0].rsplit("/", 1)[1] for example in report.examples(SKIPPED)) == ["2.png", "6.png"]


def test_notes_that_do_not_fit_are_still_counted():
    notes = [(SKIPPED, f"/data/{index:03d}-{'x' * 100}.png", "cannot identify image file") for index in range(40)]
    report = ImageReport()
    report.add(*decode_notes(encode_notes(notes)))
    assert report.count(SKIPPED) == 40  # a few named, the rest counted without their names
    assert report.examples(SKIPPED)[0].startswith("/data/000-") and len(report.files[SKIPPED]) < 40


# ---------------------------------------------------------------- folders: every image, whatever the sub-folders


def test_train_test_and_val_sub_folders_are_all_read(tmp_path):
    for index, sub_folder in enumerate(["train", "test", "val", "val/deeper", "validation", "other"]):
        (tmp_path / sub_folder).mkdir(parents=True, exist_ok=True)
        for copy in range(2):
            halves_image(20, 20).save(tmp_path / sub_folder / f"{index}-{copy}.png")
    for streaming in (False, True):
        dataset = load_image_dataset(train_data_dir=str(tmp_path), streaming=streaming)
        assert len(list(dataset)) == 12 and dataset.column_names == ["image"]


def test_root_images_next_to_a_val_folder(tmp_path):
    (tmp_path / "val").mkdir()
    for name in ("a.png", "b.jpg", "val/c.png"):
        halves_image(20, 20).save(tmp_path / name)
    paths = sorted(row["image"]["path"].rsplit("/", 1)[1] for row in load_image_dataset(train_data_dir=str(tmp_path)))
    assert paths == ["a.png", "b.jpg", "c.png"]


def test_reports_of_several_processes_add_up_each_file_once():
    first, second = ImageReport(), ImageReport()
    first.add({SKIPPED: 1}, [(SKIPPED, "a.png", "truncated")])
    second.add({SKIPPED: 2, UPSCALED: 1}, [(SKIPPED, "a.png", "truncated"), (SKIPPED, None, "mode F"),
                                          (UPSCALED, "b.png", "8x8 upscaled to 16 px")])
    summary, lines = summarise_image_reports([first, second])  # what gather_object hands the main process
    assert summary["images_skipped"] == 2 and summary["images_upscaled"] == 1
    assert summary["images_skipped_examples"] == ["a.png: truncated", "mode F"]
    assert lines[0] == "2 images skipped; the first:" and lines[1] == "  a.png: truncated"


def test_notes_are_read_from_the_device_in_bulk_not_at_every_micro_batch():
    """Reading a GPU tensor waits for the GPU: a report reads its batches' notes every PENDING_BATCHES."""
    report = ImageReport()
    notes = encode_notes([(SKIPPED, "a.png", "truncated")])
    for _ in range(3):
        report.add_batch({"image_notes": torch.stack([notes, torch.zeros_like(notes)])})
    assert len(report.pending) == 3  # nothing read yet
    assert report.count(SKIPPED) == 1 and report.pending == []


def test_a_negative_min_image_size_is_refused():
    from lsun_ddpm.train.parsing import parse_training_config
    from lsun_ddpm.errors import InputError

    with pytest.raises(InputError, match="--min_image_size must be 0 or more"):
        parse_training_config(["--train_data_dir", "images", "--min_image_size", "-1"])
    assert parse_training_config(["--train_data_dir", "images", "--min_image_size", "64"]).min_image_size == 64
