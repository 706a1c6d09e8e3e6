"""The exact LPIPS neighbour search (`lsun-ddpm neighbours`), checked against pair-by-pair `lpips.LPIPS` calls.

The ImageNet backbones cannot be downloaded here, so every test uses a seeded
random torchvision backbone, saved as torchvision saves its weights (the file a
user passes with --lpips_weights). The reference LPIPS model gets the same
weights through lpips' own construction path (its call to torchvision is
patched), not through the code under test.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import make_image, offline_env, run_cli_launched
from forked_process import run_forked

RESOLUTION = 64
BUILDERS = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16,
            "squeeze": torchvision.models.squeezenet1_1}


def random_backbone_file(folder: Path, net: str = "alex", seed: int = 1) -> Path:
    """Seed 1: not the seed (0) of `--random_backbone`, so a file that is not loaded shows."""
    torch.manual_seed(seed)
    path = folder / f"{net}-random.pth"
    torch.save(BUILDERS[net]().state_dict(), path)
    return path


def reference_lpips(net: str, weights_file: Path, monkeypatch):
    """`lpips.LPIPS(net)` whose torchvision backbone is built from `weights_file` by lpips itself."""
    import lpips
    import lpips.pretrained_networks as pretrained

    def with_weights(*args, **kwargs):
        model = BUILDERS[net]()
        model.load_state_dict(torch.load(weights_file, weights_only=True))
        return model

    torchvision_name = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}[net]
    monkeypatch.setattr(pretrained.tv, torchvision_name, with_weights)
    return lpips.LPIPS(net=net, verbose=False).eval()


@pytest.fixture(scope="module")
def training_folder(tmp_path_factory) -> Path:
    """30 small photos-to-be of different sizes: the search's training set."""
    root = tmp_path_factory.mktemp("training")
    rng = np.random.default_rng(1)
    for index in range(30):
        folder = root / ("a" if index % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        make_image(rng, int(rng.integers(64, 100)), int(rng.integers(64, 100))).save(folder / f"{index:02d}.png")
    return root


@pytest.fixture(scope="module")
def sample_folder(tmp_path_factory, training_folder) -> Path:
    """Two exact training images (one at another size), one training image with noise, two new images."""
    root = tmp_path_factory.mktemp("samples")
    training = sorted(training_folder.rglob("*.png"))
    Image.open(training[3]).save(root / "copy.png")
    Image.open(training[7]).resize((80, 80), Image.BICUBIC).save(root / "resized_copy.png")
    noisy = np.asarray(Image.open(training[11]), dtype=np.int16) + np.random.default_rng(2).integers(-20, 21, (1,))
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(root / "shifted.png")
    rng = np.random.default_rng(3)
    for index in range(2):
        make_image(rng, 70, 70).save(root / f"new{index}.png")
    return root


def preprocessed(path: Path) -> torch.Tensor:
    """The training preprocessing, written out here: shorter side to 64 (BICUBIC), centre crop, [-1, 1]."""
    image = Image.open(path).convert("RGB")
    scale = RESOLUTION / min(image.size)
    image = image.resize(tuple(max(RESOLUTION, round(x * scale)) for x in image.size), Image.BICUBIC)
    left, top = (image.width - RESOLUTION) // 2, (image.height - RESOLUTION) // 2
    image = image.crop((left, top, left + RESOLUTION, top + RESOLUTION))
    return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)


def pair_by_pair(model, queries: list[Path], training: list[Path]) -> np.ndarray:
    """LPIPS of every (query, training image) pair, one `lpips.LPIPS` call each."""
    distances = np.empty((len(queries), len(training)))
    with torch.no_grad():
        for i, query in enumerate(queries):
            for j, image in enumerate(training):
                distances[i, j] = model(preprocessed(query)[None], preprocessed(image)[None]).item()
    return distances


def run_neighbours(tmp_path: Path, *args: str, processes: int = 1):
    return run_cli_launched(tmp_path, processes, "neighbours", *args)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


# ---------------------------------------------------------------- the identity


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_feature_distance_equals_lpips(net, tmp_path, monkeypatch):
    from lsun_ddpm.evaluate.lpips_features import LpipsFeatures, load_lpips

    weights = random_backbone_file(tmp_path, net)
    features = LpipsFeatures(load_lpips(net, str(weights)))  # before lpips' torchvision call is patched
    reference = reference_lpips(net, weights, monkeypatch)
    torch.manual_seed(0)
    x, y = torch.rand(3, 3, RESOLUTION, RESOLUTION) * 2 - 1, torch.rand(3, 3, RESOLUTION, RESOLUTION) * 2 - 1
    y[0] = x[0] * 0.9  # one close pair: the expanded product must not lose it
    a, b = features(x).double(), features(y).double()
    for i in range(3):
        expected = reference(x[i:i + 1], y[i:i + 1]).item()
        assert (a[i] - b[i]).square().sum().item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- the search, end to end


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, training_folder, sample_folder):
    tmp_path = tmp_path_factory.mktemp("cli")
    weights = random_backbone_file(tmp_path)
    run_neighbours(tmp_path, "--samples", str(sample_folder), "--train_data_dir", str(training_folder),
                   "--resolution", str(RESOLUTION), "--lpips_weights", str(weights), "--batch_size", "8",
                   "--num_reference", "12", "--seed", "5", "--csv", "nb.csv", "--out", "fig.png")
    return tmp_path, weights


def test_search_equals_a_pair_by_pair_lpips_loop(cli_run, training_folder, sample_folder, monkeypatch):
    tmp_path, weights = cli_run
    samples = sorted(sample_folder.glob("*.png"))
    training = sorted(training_folder.rglob("*.png"))
    expected = pair_by_pair(reference_lpips("alex", weights, monkeypatch), samples, training)
    rows = read_csv(tmp_path / "nb.csv")
    assert list(rows[0]) == ["sample", "rank", "neighbour", "distance"]
    assert len(rows) == 5 * len(samples)
    for i, sample in enumerate(samples):
        mine = [row for row in rows if row["sample"] == sample.name]
        order = np.argsort(expected[i], kind="stable")[:5]
        assert [int(row["rank"]) for row in mine] == [1, 2, 3, 4, 5]
        assert [Path(row["neighbour"]).resolve() for row in mine] == [training[j].resolve() for j in order]
        for row, j in zip(mine, order):
            assert float(row["distance"]) == pytest.approx(expected[i, j], rel=1e-4, abs=1e-6)
    copies = {row["sample"]: float(row["distance"]) for row in rows if row["rank"] == "1"}
    assert copies["copy.png"] < 1e-6 and copies["new0.png"] > 1e-3


def test_reference_distances_are_each_real_images_nearest_other_image(training_folder, tmp_path, monkeypatch):
    from lsun_ddpm.data.sources import load_image_dataset
    from lsun_ddpm.evaluate.neighbours import find_neighbours

    weights = random_backbone_file(tmp_path)
    dataset = load_image_dataset(train_data_dir=str(training_folder))
    report = find_neighbours([torch.zeros(3, RESOLUTION, RESOLUTION)], ["grey"], dataset, resolution=RESOLUTION,
                             lpips_weights=str(weights), batch_size=4, num_reference=12, seed=5, progress=False)
    files = [Path(dataset[i]["image"]["path"]) for i in range(len(dataset))]
    # the documented draw: numpy's default_rng(seed), 12 indices without replacement
    drawn = sorted(np.random.default_rng(5).choice(30, 12, replace=False).tolist())
    assert report.result.reference_indices == drawn
    pairs = pair_by_pair(reference_lpips("alex", weights, monkeypatch), [files[i] for i in drawn], files)
    pairs[range(len(drawn)), drawn] = np.inf  # "other": an image is not its own neighbour
    np.testing.assert_allclose(report.result.reference_distances.numpy(), pairs.min(axis=1), rtol=1e-4)


def test_copies_are_flagged_and_new_images_are_not(cli_run):
    tmp_path, _ = cli_run
    report = json.loads((tmp_path / "fig.json").read_text())
    assert report["num_reference_queries"] == 12 and report["num_training_images_searched"] == 30
    flagged = {s["sample"] for s in report["samples"] if s["possible_copy"]}
    assert "copy.png" in flagged and not flagged & {"new0.png", "new1.png"}
    assert report["num_flagged"] == len(flagged)
    copy = next(s for s in report["samples"] if s["sample"] == "copy.png")
    assert copy["percentile"] == 0.0 and copy["neighbours"][0]["distance"] < 1e-6
    assert "all 30 training images" in report["note"] and "weights from alex-random.pth" in report["note"]


def test_figure_shows_a_row_per_sample_with_flagged_copies_framed(cli_run, sample_folder):
    tmp_path, _ = cli_run
    figure = np.asarray(Image.open(tmp_path / "fig.png").convert("RGB")).astype(int)
    samples = sorted(sample_folder.glob("*.png"))
    cell = 64 * 2  # 64-px images magnified ×2 to reach the 96-px minimum
    assert figure.shape[1] >= 6 * cell and figure.shape[0] >= len(samples) * cell
    red = (figure[..., 0] > 200) & (figure[..., 1] < 60) & (figure[..., 2] < 60)
    assert red.sum() > 4 * cell  # at least one frame (the exact copy is flagged)


# ---------------------------------------------------------------- scale out and resume


@pytest.mark.slow
def test_two_processes_give_the_same_answer_as_one(cli_run, training_folder, tiny_pipeline_folder, tmp_path):
    _, weights = cli_run
    common = ["--model", str(tiny_pipeline_folder), "--num_samples", "3", "--num_inference_steps", "5",
              "--train_data_dir", str(training_folder), "--resolution", str(RESOLUTION), "--lpips_weights",
              str(weights), "--batch_size", "4", "--num_reference", "6", "--no_bf16"]
    run_neighbours(tmp_path, *common, "--csv", "one.csv", "--out", "one.png")
    run_neighbours(tmp_path, *common, "--csv", "two.csv", "--out", "two.png", processes=2)
    one, two = read_csv(tmp_path / "one.csv"), read_csv(tmp_path / "two.csv")
    assert len(one) == 15 and one == two
    assert json.loads((tmp_path / "one.json").read_text()) == json.loads((tmp_path / "two.json").read_text())
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()


@pytest.mark.slow
def test_exact_ties_are_listed_in_dataset_order_on_one_process_and_on_two(cli_run, tmp_path):
    """Training image 02 is stored three times (02, 05, 09); a sample is a copy of it, so its distances to the
    three tie exactly. In batches of 4, process 0 of two reads 02 and 09 (batches 0 and 2) and process 1 reads
    05 (batch 1): with k = 2 the two neighbours listed are 02 and 05, the first two in dataset order, on one
    process as on two, whatever order the processes' candidates arrive in."""
    _, weights = cli_run
    rng = np.random.default_rng(7)
    training, samples = tmp_path / "training", tmp_path / "samples"
    training.mkdir()
    samples.mkdir()
    for index in range(16):
        make_image(rng, 40, 40).save(training / f"{index:02d}.png")
    for copy in ("05.png", "09.png"):
        shutil.copy2(training / "02.png", training / copy)
    shutil.copy2(training / "02.png", samples / "a.png")
    make_image(rng, 40, 40).save(samples / "b.png")
    common = ["--samples", str(samples), "--train_data_dir", str(training), "--resolution", str(RESOLUTION),
              "--lpips_weights", str(weights), "--batch_size", "4", "--k", "2", "--num_reference", "4"]
    run_neighbours(tmp_path, *common, "--csv", "one.csv", "--out", "one.png")
    run_neighbours(tmp_path, *common, "--csv", "two.csv", "--out", "two.png", processes=2)
    one, two = read_csv(tmp_path / "one.csv"), read_csv(tmp_path / "two.csv")
    assert one == two
    assert [Path(row["neighbour"]).name for row in one if Path(row["sample"]).name == "a.png"] == ["02.png", "05.png"]


def test_an_interrupted_pass_resumes_from_the_cache(training_folder, sample_folder, tmp_path, monkeypatch):
    from lsun_ddpm.data.sources import load_image_dataset
    from lsun_ddpm.evaluate import dataset_pass, neighbours

    weights = random_backbone_file(tmp_path)
    dataset = load_image_dataset(train_data_dir=str(training_folder))
    samples = sorted(sample_folder.glob("*.png"))
    options = dict(resolution=RESOLUTION, lpips_weights=str(weights), batch_size=8, num_reference=0, progress=False)
    uninterrupted = neighbours.find_neighbours(samples, [p.name for p in samples], dataset, **options)

    decoded = []  # the first dataset index of every batch decoded
    real_decode = dataset_pass.decode_batch

    def decode_and_record(members, preprocess):
        decoded.extend(members[:1])
        return real_decode(members, preprocess)

    def decode_then_stop(members, preprocess):
        if len(decoded) == 2:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the third batch
        return decode_and_record(members, preprocess)

    cache = tmp_path / "cache"
    monkeypatch.setattr(dataset_pass, "decode_batch", decode_then_stop)
    with pytest.raises(KeyboardInterrupt):
        neighbours.find_neighbours(samples, [p.name for p in samples], dataset, feature_cache=str(cache), **options)
    assert sorted(p.name for p in cache.glob("batch-*")) == ["batch-00000000.safetensors", "batch-00000001.safetensors"]
    # A half-written file (as a kill during the write leaves) must never be read.
    (cache / ".batch-00000002.safetensors.partial-1").write_bytes(b"half a file")

    decoded.clear()
    monkeypatch.setattr(dataset_pass, "decode_batch", decode_and_record)
    resumed = neighbours.find_neighbours(samples, [p.name for p in samples], dataset, feature_cache=str(cache),
                                         **options)
    assert [index for index, _ in decoded] == [16, 24]  # batches 0 and 1 came from the cache
    assert torch.equal(resumed.result.sample_indices, uninterrupted.result.sample_indices)
    assert torch.equal(resumed.result.sample_distances, uninterrupted.result.sample_distances)

    with pytest.raises(ValueError, match="batch_size: cached 8, now 4"):
        neighbours.find_neighbours(samples, [p.name for p in samples], dataset, feature_cache=str(cache),
                                   **{**options, "batch_size": 4})


@pytest.mark.parametrize("streaming", [False, True])
def test_a_cache_of_training_images_that_changed_since_is_refused(training_folder, sample_folder, tmp_path, streaming):
    """Added images shift every later index: the cached batches would be matched against the wrong images."""
    from lsun_ddpm.data.sources import load_image_dataset
    from lsun_ddpm.errors import InputError
    from lsun_ddpm.evaluate.neighbours import find_neighbours

    folder = tmp_path / "training"
    folder.mkdir()
    training = sorted(training_folder.rglob("*.png"))
    for path in training[:9]:
        (folder / path.name).write_bytes(path.read_bytes())
    data = {"train_data_dir": str(folder), "streaming": streaming}  # as the command passes them
    samples = sorted(sample_folder.glob("*.png"))[:2]
    options = dict(resolution=RESOLUTION, lpips_weights=str(random_backbone_file(tmp_path)), batch_size=4,
                   num_reference=0, progress=False, feature_cache=str(tmp_path / "cache"), dataset_identity=data)
    find_neighbours(samples, ["a", "b"], load_image_dataset(**data), **options)
    for path in training[9:12]:
        (folder / f"0{path.name}").write_bytes(path.read_bytes())  # sorted first: every old image moves by 3
    changed = "num_images: cached 9, now 12" if not streaming else "images_sha256: cached"
    with pytest.raises(InputError, match=f"training images as they were before they changed .*{changed}"):
        find_neighbours(samples, ["a", "b"], load_image_dataset(**data), **options)


def test_training_data_without_one_readable_image_is_one_error(sample_folder, tmp_path, capsys):
    from lsun_ddpm import cli

    folder = tmp_path / "broken"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.png").write_text("not an image")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["neighbours", "--samples", str(sample_folder), "--train_data_dir", str(folder), "--resolution",
                  str(RESOLUTION), "--random_backbone", "--out", str(tmp_path / "figure.png")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"lsun-ddpm neighbours: error: no readable training images in {folder} (3 skipped: ")
    assert str(folder / "0.png") in message and not (tmp_path / "figure.png").exists()


def test_an_unreadable_sample_is_named(training_folder, sample_folder, tmp_path):
    from lsun_ddpm.data.sources import load_image_dataset
    from lsun_ddpm.errors import InputError
    from lsun_ddpm.evaluate.neighbours import find_neighbours
    from lsun_ddpm.evaluate.neighbours_report import read_sample_folder

    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "good.png").write_bytes(next(sample_folder.glob("*.png")).read_bytes())
    (folder / "half.png").write_bytes((folder / "good.png").read_bytes()[:60])  # cut off mid-file
    names, samples = read_sample_folder(str(folder))
    with pytest.raises(InputError, match=f"sample '{folder / 'half.png'}' is not an image that can be read"):
        find_neighbours(samples, names, load_image_dataset(train_data_dir=str(training_folder)),
                        resolution=RESOLUTION, random_backbone=True, num_reference=0, progress=False)


# The smallest input each backbone takes, measured with `lpips.LPIPS(pnet_rand=True)`.
LPIPS_MIN_RESOLUTION = {"alex": 31, "vgg": 16, "squeeze": 17}


@pytest.mark.parametrize("net", sorted(LPIPS_MIN_RESOLUTION))
def test_a_resolution_too_small_for_the_backbone_names_the_one_that_works(net, training_folder, sample_folder):
    import lpips

    from lsun_ddpm.data.sources import load_image_dataset
    from lsun_ddpm.errors import InputError
    from lsun_ddpm.evaluate.neighbours import find_neighbours

    smallest = LPIPS_MIN_RESOLUTION[net]
    model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    with torch.no_grad():
        model(torch.zeros(1, 3, smallest, smallest), torch.zeros(1, 3, smallest, smallest))  # the minimum works
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, smallest - 1, smallest - 1), torch.zeros(1, 3, smallest - 1, smallest - 1))
    with pytest.raises(InputError, match=f"too small for LPIPS' {net} backbone: give --resolution {smallest} or more"):
        find_neighbours(sorted(sample_folder.glob("*.png"))[:1], ["a"],
                        load_image_dataset(train_data_dir=str(training_folder)), resolution=smallest - 1, net=net,
                        random_backbone=True, num_reference=0, progress=False)


def test_a_small_models_default_resolution_is_refused_before_sampling(tiny_pipeline_folder, training_folder,
                                                                      monkeypatch, capsys):
    from lsun_ddpm import cli
    from lsun_ddpm.evaluate import neighbours_report

    monkeypatch.setattr(neighbours_report, "generate_samples", lambda *args: pytest.fail("samples were generated"))
    with pytest.raises(SystemExit) as exit_info:  # the tiny model makes 16-px images
        cli.main(["neighbours", "--model", str(tiny_pipeline_folder), "--train_data_dir", str(training_folder),
                  "--random_backbone"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "lsun-ddpm neighbours: error: images of 16 px are too small for LPIPS' alex backbone: give --resolution 31 "
        "or more (smaller images are upscaled to it), or --net vgg")


# ---------------------------------------------------------------- inputs and errors


def test_unreadable_training_images_are_skipped_and_counted(training_folder, sample_folder, tmp_path):
    from lsun_ddpm.data.sources import load_image_dataset
    from lsun_ddpm.evaluate.neighbours import find_neighbours
    from lsun_ddpm.evaluate.neighbours_report import summary_dict

    folder = tmp_path / "with_a_bad_file"
    folder.mkdir()
    for path in sorted(training_folder.rglob("*.png"))[:9]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    weights = random_backbone_file(tmp_path)
    samples = sorted(sample_folder.glob("*.png"))[:2]
    with pytest.warns(UserWarning, match="broken.png"):
        report = find_neighbours(samples, ["a", "b"], load_image_dataset(train_data_dir=str(folder)),
                                 resolution=RESOLUTION, lpips_weights=str(weights), batch_size=4,
                                 num_reference=3, progress=False)
    summary = summary_dict(report)
    assert summary["num_training_images_searched"] == 9 and summary["num_unreadable_images_skipped"] == 1
    assert all("broken" not in row[2] for row in report.rows())


def test_memorisation_verdict_against_hand_computed_percentiles():
    from lsun_ddpm.evaluate.neighbours import memorisation_summary

    reference = np.arange(1, 101) / 100  # 0.01 … 1.00
    verdict = memorisation_summary(np.array([0.005, 0.0195, 0.5, 2.0]), reference)
    # 1st percentile by linear interpolation: 0.01 + 0.99 × 0.01 = 0.0199
    assert verdict["threshold"] == pytest.approx(0.0199)
    assert verdict["flagged"].tolist() == [True, True, False, False]
    assert verdict["percentiles"].tolist() == [0.0, 1.0, 49.0, 100.0]
    assert verdict["num_flagged"] == 2 and verdict["median_percentile"] == 25.0


@pytest.mark.slow
def test_offline_without_backbone_weights_is_one_clear_line(sample_folder, training_folder, tmp_path):
    # A closed local port as the proxy: the download fails at once, as it does without network.
    env = offline_env(tmp_path, TORCH_HOME=str(tmp_path / "torch"), HTTPS_PROXY="http://127.0.0.1:9",
                      https_proxy="http://127.0.0.1:9")
    result = run_forked(["-m", "lsun_ddpm.cli", "neighbours", "--samples", str(sample_folder), "--train_data_dir",
                         str(training_folder)], env, tmp_path, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error) == 1
    assert "--lpips_weights alexnet-owt-7be5be79.pth" in error[0] and "random" not in error[0]
    assert not (tmp_path / "neighbours.png").exists()


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    from lsun_ddpm.errors import LpipsWeightsUnavailableError
    from lsun_ddpm.evaluate.lpips_features import load_lpips

    (tmp_path / "bad.pth").write_text("not weights")
    with pytest.raises(LpipsWeightsUnavailableError, match="not a torchvision state-dict file"):
        load_lpips("alex", str(tmp_path / "bad.pth"))
    torch.save(torchvision.models.vgg16().state_dict(), tmp_path / "vgg.pth")
    with pytest.raises(LpipsWeightsUnavailableError, match="does not match"):
        load_lpips("alex", str(tmp_path / "vgg.pth"))


def test_run_dir_gets_the_files_the_model_card_reads(cli_run, training_folder, sample_folder, tmp_path):
    _, weights = cli_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "training_config.yaml").write_text(f"train_data_dir: {training_folder}\n")
    run_neighbours(tmp_path, "--samples", str(sample_folder), "--run_dir", str(run_dir), "--resolution",
                   str(RESOLUTION), "--lpips_weights", str(weights), "--num_reference", "4")
    note = json.loads((run_dir / "neighbours.json").read_text())["note"]
    assert (run_dir / "neighbours.png").is_file() and "all 30 training images" in note
    assert not math.isnan(json.loads((run_dir / "neighbours.json").read_text())["median_percentile"])


def test_a_stream_or_decoding_workers_give_the_same_answer(training_folder, sample_folder, tmp_path):
    from lsun_ddpm.data.sources import load_image_dataset
    from lsun_ddpm.evaluate.neighbours import find_neighbours

    weights = random_backbone_file(tmp_path)
    samples = sorted(sample_folder.glob("*.png"))[:3]
    options = dict(resolution=RESOLUTION, lpips_weights=str(weights), batch_size=8, num_reference=0, progress=False)
    answers = [find_neighbours(samples, ["a", "b", "c"], load_image_dataset(train_data_dir=str(training_folder),
                                                                             streaming=streaming),
                               num_workers=workers, **options)
               for streaming, workers in ((False, 0), (True, 0), (False, 2))]
    for answer in answers[1:]:
        assert answer.result.num_searched == 30
        assert torch.equal(answers[0].result.sample_indices, answer.result.sample_indices)
        assert torch.equal(answers[0].result.sample_distances, answer.result.sample_distances)
        assert answers[0].labels == answer.labels


@pytest.mark.parametrize("flags, message", [
    (["--out", "figure.txt"], "--out 'figure.txt' does not end in an image format"),
    (["--num_inference_steps", "0"], None),
])
def test_the_command_refuses_bad_output_and_steps_before_any_work(tmp_path, monkeypatch, capsys, flags, message):
    from lsun_ddpm.evaluate import neighbours_report
    from lsun_ddpm.cli import neighbours_command
    from lsun_ddpm.errors import InputError

    calls = []
    monkeypatch.setattr(neighbours_report, "run_neighbours_command", lambda args: calls.append(args))
    argv = ["--samples", str(tmp_path), "--train_data_dir", str(tmp_path), *flags]
    if message:
        with pytest.raises(InputError, match=message):
            neighbours_command(argv)
    else:
        with pytest.raises(SystemExit) as exit_info:
            neighbours_command(argv)
        assert exit_info.value.code == 2
        assert "--num_inference_steps must be a positive whole number, got 0" in capsys.readouterr().err
    assert calls == []
