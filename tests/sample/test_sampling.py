"""Sampling: every scheduler is correct, images are reproducible per (seed, index), and the CLI writes grids."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SingleImageOracle, dark_pixels, random_tiny_unet, rendered_ink, run_cli, run_cli_launched
from lsun_ddpm.sample import commands, figures, loading, sampling
from lsun_ddpm.model.diffusion import make_noise_scheduler
from lsun_ddpm.sample.sampling import SCHEDULERS, SamplingPlan, denoise, generate, make_scheduler
from lsun_ddpm.sample.figures import grid_shape

CONFIG = dict(make_noise_scheduler().config)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_recovers_the_data_with_an_exact_model(name):
    target = torch.rand(1, 3, 8, 8) * 1.6 - 0.8
    oracle = SingleImageOracle(target, make_noise_scheduler().alphas_cumprod)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    x0 = denoise(oracle, make_scheduler(name, CONFIG), torch.randn(3, 3, 8, 8), SCHEDULERS[name][2], generators)
    torch.testing.assert_close(x0, target.expand(3, -1, -1, -1), atol=1e-4, rtol=0)


class OracleCleanAtTheEnd(SingleImageOracle):
    """The exact ε-predictor of `target`, except at timestep `clean_at` (the last call), where it predicts ε = 0
    ("x_t is already clean"): the sample is then x_t / √ᾱ_t and shows where the trajectory went."""

    def __init__(self, target, alphas_cumprod, clean_at: int):
        super().__init__(target, alphas_cumprod)
        self.clean_at = clean_at

    def forward(self, x, t):
        output = super().forward(x, t)
        return type(output)(sample=torch.zeros_like(x)) if int(t) == self.clean_at else output


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_sampler_clips_its_x0_estimates(name):
    """The data x* = ±3 lie outside [−1, 1]. With every x₀ estimate clipped to c = clip(x*) = ±1, the sampler
    follows x_t = √ᾱ_t c + √(1−ᾱ_t) e, with e = (x_T − √ᾱ_T c)/√(1−ᾱ_T) for the deterministic samplers (DDIM only
    if it re-derives ε from the clipped x₀) and fresh noise for DDPM. The last call then returns
    clip(c + √((1−ᾱ_t)/ᾱ_t) e): about half the pixels end strictly inside (−1, 1). Without clipping the
    trajectory heads for ±3, and every pixel ends at exactly ±1 after the final clamp."""
    alphas = make_noise_scheduler().alphas_cumprod.double()
    c = torch.where(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.5, -1.0, 1.0)
    steps = SCHEDULERS[name][2]
    schedule = make_scheduler(name, CONFIG)
    schedule.set_timesteps(steps)
    first, last = int(schedule.timesteps[0]), int(schedule.timesteps[-1])
    oracle = OracleCleanAtTheEnd(3 * c, alphas, clean_at=last)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    x0 = denoise(oracle, make_scheduler(name, CONFIG), noise, steps, generators).double()

    assert torch.equal(x0.sign(), c.expand_as(x0).double())
    assert 0.3 < (x0.abs() < 1).double().mean() < 0.7
    if name == "ddpm":  # the ancestral noise is random: only its size is known, √(1−ᾱ_0) = 0.01
        assert (x0 - c).abs().max() < 0.1
    else:
        e = (noise.double() - alphas[first].sqrt() * c) / (1 - alphas[first]).sqrt()
        expected = (c + ((1 - alphas[last]) / alphas[last]).sqrt() * e).clamp(-1, 1)
        torch.testing.assert_close(x0, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_respaced_schedules_start_at_the_noisiest_step(name):
    scheduler = make_scheduler(name, CONFIG)
    scheduler.set_timesteps(20)
    assert int(scheduler.timesteps[0]) == 999


def test_fast_sampler_is_the_default_and_ddpm_keeps_the_papers_1000_steps():
    assert SamplingPlan().scheduler == "dpmsolver++" and SamplingPlan().steps == 25
    assert SamplingPlan("ddpm").steps == 1000 and SamplingPlan("ddpm", 50).steps == 50


# Largest pixel difference (of 255) between batch sizes: none in fp32; under bf16 autocast oneDNN picks
# different kernels per batch size (docs/sampling.md).
BATCH_SIZE_TOLERANCE = {False: 0, True: 4}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scheduler", ["ddpm", "dpmsolver++"])
def test_image_i_depends_on_seed_and_index_not_on_batch_size(monkeypatch, scheduler, bf16):
    monkeypatch.setattr(sampling, "fast_precision_available", lambda device: True)  # bf16 on any CPU
    unet = random_tiny_unet()
    run = lambda batch, seed=7: [np.asarray(im, dtype=np.int16) for im in generate(
        unet, CONFIG, 5, seed=seed, plan=SamplingPlan(scheduler, 4, batch_size=batch, bf16=bf16))]
    one_by_one, batched, uneven = run(1), run(5), run(2)
    for a, b, c in zip(one_by_one, batched, uneven):
        assert np.abs(a - b).max() <= BATCH_SIZE_TOLERANCE[bf16] and np.abs(a - c).max() <= BATCH_SIZE_TOLERANCE[bf16]
    assert any(np.abs(a - b).max() > 10 for a, b in zip(run(1, seed=8), one_by_one))  # the seed matters
    assert np.abs(one_by_one[0] - one_by_one[1]).max() > 10  # and so does the index


def unet_inputs_while_sampling(unet, plan):
    """(dtype, memory format) of what the U-Net's last convolution was given at each call during `generate`."""
    seen = []
    hook = unet.conv_out.register_forward_hook(lambda module, args, output: seen.append(
        (args[0].dtype, "channels_last" if args[0].is_contiguous(memory_format=torch.channels_last) else "contiguous")))
    try:
        generate(unet, CONFIG, 2, plan=plan)
    finally:
        hook.remove()
    return set(seen)


@pytest.mark.parametrize("fast_hardware", [True, False])
def test_bf16_runs_the_unet_in_bf16_channels_last_only_on_fast_hardware_and_restores_it(monkeypatch, fast_hardware):
    monkeypatch.setattr(sampling, "fast_precision_available", lambda device: fast_hardware)
    unet = random_tiny_unet()
    weights = {name: p.clone() for name, p in unet.state_dict().items()}
    seen = unet_inputs_while_sampling(unet, SamplingPlan("ddim", 3, bf16=True))
    assert seen == ({(torch.bfloat16, "channels_last")} if fast_hardware else {(torch.float32, "contiguous")})
    # afterwards: the same fp32, contiguous weights, and an fp32 run is fp32 again
    for name, parameter in unet.state_dict().items():
        assert parameter.dtype == torch.float32 and parameter.is_contiguous(), name
        assert torch.equal(parameter, weights[name]), name
    assert unet_inputs_while_sampling(unet, SamplingPlan("ddim", 3, bf16=False)) == {(torch.float32, "contiguous")}


def test_bf16_gives_the_fp32_image_up_to_rounding(monkeypatch):
    monkeypatch.setattr(sampling, "fast_precision_available", lambda device: True)
    unet = random_tiny_unet()
    fast = generate(unet, CONFIG, 2, plan=SamplingPlan("ddim", 5, bf16=True))
    exact = generate(unet, CONFIG, 2, plan=SamplingPlan("ddim", 5, bf16=False))
    difference = max(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean() for a, b in zip(fast, exact))
    assert difference < 8  # bf16 rounding, not a different image


def test_grid_shapes():
    assert grid_shape(64) == (8, 8) and grid_shape(16) == (4, 4) and grid_shape(12) == (3, 4)
    assert grid_shape(7) == (1, 7)


def test_missing_model_and_missing_raw_weights_are_clear_errors(tmp_path, tiny_pipeline_folder):
    with pytest.raises(loading.ModelUnavailableError, match="pipeline folder"):
        loading.load_unet(str(tmp_path / "nowhere"))
    (tmp_path / "only_ema").mkdir()
    import shutil
    shutil.copytree(tiny_pipeline_folder / "unet", tmp_path / "only_ema" / "unet")
    with pytest.raises(loading.ModelUnavailableError, match="unet_raw"):
        loading.load_unet(str(tmp_path / "only_ema"), "raw")


def test_sample_cli_writes_a_grid_and_one_png_per_image(tmp_path, tiny_pipeline_folder):
    run_cli(tmp_path, "sample", str(tiny_pipeline_folder), "--num_images", "4", "--num_inference_steps", "3",
            "--out", "grid.png", "--out_dir", "images")
    assert Image.open(tmp_path / "grid.png").size == (32, 32)  # 2x2 of 16 px
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{i:05d}.png" for i in range(4)]
    # the same seed gives the same grid; the per-image files are its tiles
    tile = np.asarray(Image.open(tmp_path / "grid.png"))[:16, 16:32]
    assert np.array_equal(tile, np.asarray(Image.open(tmp_path / "images" / "00001.png")))


@pytest.mark.slow
@pytest.mark.compiles
def test_sample_cli_compiled_gives_the_uncompiled_grid_up_to_rounding(tmp_path, tiny_pipeline_folder):
    grids = []
    for compile_flags in ([], ["--torch_compile"]):
        result = run_cli(tmp_path, "sample", str(tiny_pipeline_folder), "--num_images", "4", "--num_inference_steps",
                         "3", "--no_bf16", "--out", "grid.png", *compile_flags)
        assert ("compiled U-Net" in result.stdout) == bool(compile_flags)
        grids.append(np.asarray(Image.open(tmp_path / "grid.png"), dtype=np.int16))
    eager, compiled = grids
    assert np.abs(compiled - eager).max() <= 2  # fp32 kernels that round differently, not other images
    assert eager.std() > 10  # images, not a flat field that any model would give


def test_sample_cli_both_weights_puts_raw_beside_ema(tmp_path, tiny_pipeline_folder):
    run_cli(tmp_path, "sample", str(tiny_pipeline_folder), "--num_images", "4", "--scheduler", "ddpm",
            "--num_inference_steps", "3", "--weights", "both", "--out", "fig1.png", "--out_dir", "images")
    figure = Image.open(tmp_path / "fig1.png")
    assert figure.width > 64 and figure.height > 32
    raw, ema = (np.asarray(Image.open(tmp_path / "images" / w / "00000.png"), np.int16) for w in ("raw", "ema"))
    assert np.abs(raw - ema).max() > 0  # same seed, different weights


@pytest.mark.slow
def test_two_launched_processes_sample_each_image_once_as_one_process_does(tmp_path, tiny_pipeline_folder):
    """Under `accelerate launch`, 5 images over 2 processes: each process samples its share, the grid and the
    PNGs are the 5 images a single process samples (one grid, written once), not 10."""
    args = ["sample", str(tiny_pipeline_folder), "--num_images", "5", "--batch_size", "2", "--num_inference_steps",
            "3", "--no_bf16", "--out", "grid.png", "--out_dir", "images"]
    single, launched = tmp_path / "single", tmp_path / "launched"
    single.mkdir(), launched.mkdir()
    run_cli(single, *args)
    result = run_cli_launched(launched, 2, *args)
    assert result.stdout.count("wrote grid.png") == 1 and "2 processes" in result.stdout
    names = [f"{i:05d}.png" for i in range(5)]
    for folder in (single, launched):
        assert sorted(p.name for p in (folder / "images").iterdir()) == names
    alone, shared = (np.asarray(Image.open(folder / "grid.png"), np.int16) for folder in (single, launched))
    assert alone.shape == shared.shape == (16, 5 * 16, 3)
    assert np.abs(shared - alone).max() <= 1 and alone.std() > 10  # the same images, not a flat field
    for name in names:
        a, b = (np.asarray(Image.open(folder / "images" / name), np.int16) for folder in (single, launched))
        assert np.abs(a - b).max() <= 1, name


@pytest.mark.slow
def test_sample_cli_without_network_names_the_problem(tmp_path):
    result = run_cli(tmp_path, "sample", "someone/some-model", "--num_images", "1", check=False, own_process=True)
    assert result.returncode != 0
    assert "cannot load" in result.stderr and "someone/some-model" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- input checked before any work


@pytest.fixture()
def model_never_loaded(monkeypatch, tmp_path):
    """Run a command in an empty folder with every model loader replaced by one that records its call."""
    calls = []
    for module in (loading, commands):
        for name in ("load_unet", "load_scheduler_config"):
            monkeypatch.setattr(module, name, lambda *args, name=name, **kwargs: calls.append(name))
    monkeypatch.chdir(tmp_path)
    yield calls
    assert calls == [], f"the model was loaded before the input was checked: {calls}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_home"] or not any(tmp_path.iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--num_inference_steps", "0"], "--num_inference_steps must be a positive whole number, got 0"),
    (["--num_images", "-2"], "--num_images must be a positive whole number, got -2"),
    (["--batch_size", "0"], "--batch_size must be a positive whole number, got 0"),
])
def test_sample_refuses_non_positive_counts_before_loading(model_never_loaded, capsys, flags, message):
    from lsun_ddpm.cli import sample_command

    with pytest.raises(SystemExit) as exit_info:
        sample_command(["some/model", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--out", "grid.txt"], "--out 'grid.txt' does not end in an image format"),
    (["--out", "grid"], "--out 'grid' does not end in an image format"),
    (["--out", "a_file/grid.png"], "'a_file' is a file, not a folder"),
    (["--out_dir", "a_file/images"], "--out_dir: 'a_file' is a file, not a folder"),
])
def test_sample_refuses_an_unwritable_output_before_loading(model_never_loaded, tmp_path, flags, message):
    from lsun_ddpm.cli import sample_command
    from lsun_ddpm.errors import InputError

    (tmp_path / "a_file").write_text("")
    with pytest.raises(InputError) as error:
        sample_command(["some/model", *flags])
    assert message in str(error.value)
    (tmp_path / "a_file").unlink()


def test_sample_of_a_run_without_ema_uses_its_raw_weights_in_unet(no_ema_pipeline_folder, tmp_path, monkeypatch,
                                                                   capsys):
    from safetensors.torch import load_file

    from lsun_ddpm.cli import sample_command
    from lsun_ddpm.errors import InputError

    stored = load_file(no_ema_pipeline_folder / "unet" / "diffusion_pytorch_model.safetensors")
    loaded = loading.load_unet(str(no_ema_pipeline_folder), "raw").state_dict()
    assert stored.keys() == loaded.keys() and all(torch.equal(stored[k], loaded[k]) for k in stored)

    monkeypatch.chdir(tmp_path)
    sample_command([str(no_ema_pipeline_folder), "--weights", "raw", "--num_images", "1",
                    "--num_inference_steps", "2", "--out", "raw.png", "--no_bf16"])
    assert (tmp_path / "raw.png").is_file()
    assert "trained without EMA" in capsys.readouterr().out
    with pytest.raises(InputError, match="trained without EMA.*use --weights raw"):
        sample_command([str(no_ema_pipeline_folder), "--weights", "both", "--out", "both.png"])
    assert not (tmp_path / "both.png").exists()


# ---------------------------------------------------------------- captions


@pytest.mark.parametrize("labels", [("raw", "EMA"), ("training images", "samples (EMA)")])
def test_side_by_side_labels_are_whole_and_each_above_its_own_panel(labels):
    colours = ((255, 0, 0), (0, 0, 255))
    figure = figures.labelled_side_by_side([(label, Image.new("RGB", (16, 16), colour))
                                             for label, colour in zip(labels, colours)])
    pixels = np.asarray(figure)
    bottom = pixels[-1]
    lefts = [int(np.flatnonzero((bottom == colour).all(axis=1))[0]) for colour in colours]
    top = int(np.flatnonzero((pixels[:, lefts[0]] == colours[0]).all(axis=1))[0])
    spans = [(lefts[0], lefts[1]), (lefts[1], figure.width)]
    for label, (start, end) in zip(labels, spans):
        # the label's whole ink lies in the caption band above its own panel's column: not cut, not overlapping
        assert dark_pixels(figure.crop((start, 0, end, top))) == rendered_ink(label), label
