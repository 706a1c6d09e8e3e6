"""A learned variance end to end: samplers take [ε, v], the hybrid loss trains both terms, fine-tuning starts
from a pipeline folder. The formulas themselves are checked in test_diffusion.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from lsun_ddpm.model.diffusion import Objective, make_noise_scheduler
from lsun_ddpm.train.export import save_pipeline_folder
from lsun_ddpm.model.unet import ADMUNet2DModel
from lsun_ddpm.pipelines.ddpm_interpolation import DDPMInterpolationPipeline, preprocess
from lsun_ddpm.sample.sampling import SamplingPlan, generate

from conftest import random_tiny_unet, read_scalars, run_training

FIXED = dict(make_noise_scheduler().config)
LEARNED = dict(make_noise_scheduler(variance_type="learned_range").config)


def with_variance_head(unet: UNet2DModel, v: float) -> ADMUNet2DModel:
    """`unet` with 3 more outputs that are the constant v: its ε outputs are `unet`'s exactly."""
    sigma_model = ADMUNet2DModel.from_config({**unet.config, "out_channels": 6})
    state = unet.state_dict()
    state["conv_out.weight"] = torch.cat([state["conv_out.weight"], torch.zeros_like(state["conv_out.weight"])])
    state["conv_out.bias"] = torch.cat([state["conv_out.bias"], torch.full_like(state["conv_out.bias"], v)])
    sigma_model.load_state_dict(state)
    return sigma_model.eval()


def sample(unet, scheduler_config, scheduler, steps=6):
    plan = SamplingPlan(scheduler, steps, batch_size=2, bf16=False)
    return np.stack([np.asarray(image) for image in generate(unet, scheduler_config, 2, seed=3, plan=plan)])


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "unipc"])
def test_deterministic_samplers_use_the_epsilon_channels_only(scheduler):
    unet = random_tiny_unet(seed=4)
    for v in (-1.0, 0.7):
        np.testing.assert_array_equal(sample(with_variance_head(unet, v), LEARNED, scheduler),
                                      sample(unet, FIXED, scheduler))


def test_ddpm_sampling_uses_the_predicted_variance():
    """v = −1 is Σ = β̃_t, the fixed variance the paper samples with; v = 1 (Σ = β_t) samples other images."""
    unet = random_tiny_unet(seed=4)
    fixed = sample(unet, FIXED, "ddpm").astype(int)
    assert np.abs(sample(with_variance_head(unet, -1.0), LEARNED, "ddpm").astype(int) - fixed).max() <= 1  # fp32 rounding
    assert np.abs(sample(with_variance_head(unet, 1.0), LEARNED, "ddpm").astype(int) - fixed).mean() > 2


def test_interpolation_uses_v_for_ancestral_steps_and_epsilon_for_ddim():
    unet = random_tiny_unet(seed=4)

    def frames(model, config, method):
        pipeline = DDPMInterpolationPipeline(unet=model, scheduler=DDPMScheduler.from_config(config))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(seed_a=1, seed_b=2, t=300, num_frames=3, method=method, num_inference_steps=4,
                        generator=torch.Generator().manual_seed(0), output_type="np").images

    np.testing.assert_allclose(frames(with_variance_head(unet, 0.3), LEARNED, "ddim"), frames(unet, FIXED, "ddim"),
                               atol=1e-6)
    np.testing.assert_allclose(frames(with_variance_head(unet, -1.0), LEARNED, "slerp"),
                               frames(unet, FIXED, "slerp"), atol=1e-5)
    assert np.abs(frames(with_variance_head(unet, 1.0), LEARNED, "slerp") - frames(unet, FIXED, "slerp")).max() > 0.01


def test_the_space_serves_a_learned_variance_model(tmp_path):
    """The same ε-network with v = −1 (Σ = β̃_t) and without v: the Space gives the same images with every sampler."""
    from lsun_ddpm.publish.app import SpaceModel

    unet = random_tiny_unet(seed=4)
    save_pipeline_folder(unet, make_noise_scheduler(), tmp_path / "fixed")
    save_pipeline_folder(with_variance_head(unet, -1.0), make_noise_scheduler(variance_type="learned_range"),
                         tmp_path / "learned")
    fixed, learned = (SpaceModel(str(tmp_path / name), bf16=False) for name in ("fixed", "learned"))
    for scheduler in ("ddpm", "ddim", "dpmsolver++"):
        a, b = (np.stack([np.asarray(image) for image in space.generate(2, scheduler, 5, 1)])
                for space in (fixed, learned))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, scheduler
    for method in ("slerp", "ddim"):
        a, b = (np.stack([np.asarray(frame) for frame in space.interpolate(1, 2, None, None, 300, False, 3,
                                                                             method)[0].frames])
                for space in (fixed, learned))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, method


# ---------------------------------------------------------------- training with the hybrid loss

HYBRID_STEPS = 40


@pytest.fixture(scope="module")
def hybrid_run(image_folder, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("hybrid")
    output_dir = tmp_path / "out"
    run_training(tmp_path, output_dir, [
        "--train_data_dir", str(image_folder), "--learn_sigma", "--max_train_steps", str(HYBRID_STEPS),
        "--gradient_accumulation_steps", "1", "--lr_warmup_steps", "0", "--checkpointing_steps", "100",
        "--save_images_steps", "100", "--save_model_steps", "100",
    ])
    return output_dir


def loss_terms(unet: UNet2DModel, image_folder: Path, first_t: int, variance: float | None = None) -> dict[str, float]:
    """Mean L_simple and L_vlb on 8 training images, each at 8 noise levels from t = `first_t` to 999, fixed
    noise; with `variance`, the U-Net's v replaced by that constant. (t = 0, the decoder term, ~2.4 bits, is
    drawn once in 1000 images: 40 steps do not move it.)"""
    paths = sorted(image_folder.rglob("*.png"))[:8]
    clean = torch.stack([preprocess(path, 16) for path in paths]).repeat_interleave(8, dim=0)
    timesteps = torch.linspace(first_t, 999, 8).round().long().repeat(8)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    objective = Objective(make_noise_scheduler(variance_type="learned_range"))
    noisy = objective.scheduler.add_noise(clean, noise, timesteps)
    with torch.no_grad():
        output = unet.eval()(noisy, timesteps).sample
    if variance is not None:
        output[:, 3:] = variance
    losses = objective.losses(output, clean, noisy, noise, timesteps)
    return {name: float(values.mean()) for name, values in losses.items()}


@pytest.mark.slow
def test_the_hybrid_loss_lowers_both_terms(hybrid_run, image_folder):
    """From t = 100 on, both terms fall several-fold. The KL terms of the first few dozen t, where β̃_t is tiny
    and an error of the mean costs the most, dominate L_vlb and fall slowly (Improved DDPM, Fig. 2): there,
    it is the learned v that lowers the bound, against v at its initial 0 under the same trained mean."""
    start = loss_terms(ADMUNet2DModel.from_preset("tiny16", out_channels=6), image_folder, first_t=100)
    trained = UNet2DModel.from_pretrained(hybrid_run, subfolder="unet_raw")
    end = loss_terms(trained, image_folder, first_t=100)
    assert end["loss_simple"] < 0.7 * start["loss_simple"]
    assert end["loss_vlb"] < 0.7 * start["loss_vlb"]
    with_learned_v = loss_terms(trained, image_folder, first_t=1)["loss_vlb"]
    assert with_learned_v < 0.97 * loss_terms(trained, image_folder, first_t=1, variance=0.0)["loss_vlb"]
    assert trained.conv_out.weight[3:].abs().sum() > 0  # v was trained: L_simple alone gives it no gradient


@pytest.mark.slow
def test_the_hybrid_terms_are_logged_apart_and_add_up_to_the_loss(hybrid_run):
    loss, simple, vlb = (read_scalars(hybrid_run, f"train/{name}") for name in ("loss", "loss_simple", "loss_vlb"))
    assert sorted(simple) == sorted(vlb) == list(range(1, HYBRID_STEPS + 1))
    for step in loss:  # λ·T = 0.001 × 1000 = 1
        assert loss[step] == pytest.approx(simple[step] + vlb[step], rel=1e-5)


@pytest.mark.slow
def test_a_learned_variance_run_exports_a_stock_learned_range_pipeline(hybrid_run):
    assert json.loads((hybrid_run / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == \
        "learned_range"
    pipeline = DDPMPipeline.from_pretrained(hybrid_run, use_safetensors=True)
    assert type(pipeline.unet) is UNet2DModel and pipeline.unet.config.out_channels == 6
    images = pipeline(batch_size=2, num_inference_steps=5, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and 0 <= images.min() and images.max() <= 1


# ---------------------------------------------------------------- fine-tuning a pipeline folder


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory) -> Path:
    """A learned-Σ pipeline folder with random weights, as `convert-adm` or a training run writes one."""
    torch.manual_seed(7)
    model = ADMUNet2DModel.from_preset("tiny16", out_channels=6)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.05)
    folder = tmp_path_factory.mktemp("pretrained")
    save_pipeline_folder(model, make_noise_scheduler(variance_type="learned_range"), folder)
    return folder


@pytest.mark.slow
def test_fine_tuning_starts_from_the_pretrained_weights_at_a_new_resolution(pretrained_folder, image_folder, tmp_path):
    output_dir = tmp_path / "out"
    result = run_training(tmp_path, output_dir, [
        "--train_data_dir", str(image_folder), "--pretrained_model_name_or_path", str(pretrained_folder),
        "--resolution", "32", "--learning_rate", "1e-10", "--lr_warmup_steps", "0", "--max_train_steps", "1",
        "--gradient_accumulation_steps", "1", "--checkpointing_steps", "100", "--save_images_steps", "100",
    ])
    pretrained = load_file(pretrained_folder / "unet" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(output_dir / "unet_raw" / "diffusion_pytorch_model.safetensors")
    assert tuned.keys() == pretrained.keys()
    assert max(float((tuned[k] - pretrained[k]).abs().max()) for k in tuned) < 1e-6  # one step at lr 1e-10
    assert float(pretrained["conv_out.weight"].abs().max()) > 0.05  # not ADM's zero initialisation

    config = json.loads((output_dir / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel" and config["sample_size"] == 32 and config["out_channels"] == 6
    assert yaml.safe_load((output_dir / "training_config.yaml").read_text())["learn_sigma"] is True  # from the model
    assert json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == \
        "learned_range"
    assert f"fine-tuning {pretrained_folder}" in result.stdout + result.stderr
    images = DDPMPipeline.from_pretrained(output_dir)(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)
