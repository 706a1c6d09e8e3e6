"""The interpolation pipeline: its math, its noise statistics, auto t, loading by path, and the CLI."""

import ast
import inspect
import math
import re

import numpy as np

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from conftest import REPO_ROOT, SingleImageOracle, make_image, random_tiny_unet, run_cli, run_cli_launched
from lsun_ddpm.model.diffusion import make_noise_scheduler
from lsun_ddpm.pipelines import ddpm_interpolation
from lsun_ddpm.pipelines.ddpm_interpolation import (DDPMInterpolationPipeline, auto_noise_level, ddim_step,
                                                    respaced_timesteps, slerp)

PIPELINE_FILE = REPO_ROOT / "pipelines" / "ddpm_interpolation.py"


@pytest.fixture(scope="module")
def pipeline():
    return DDPMInterpolationPipeline(unet=random_tiny_unet(), scheduler=make_noise_scheduler())


def two_images(size=24, seed=0):
    rng = np.random.default_rng(seed)
    return make_image(rng, size, size + 6), make_image(rng, size + 10, size)


# ---------------------------------------------------------------- math


def test_slerp_endpoints_and_norm_for_orthogonal_vectors():
    a, b = torch.zeros(1, 4), torch.zeros(1, 4)
    a[0, 0], b[0, 1] = 2.0, 2.0
    assert torch.equal(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    middle = slerp(a, b, 0.5)
    assert middle.norm().item() == pytest.approx(2.0)
    assert torch.allclose(middle, torch.tensor([[math.sqrt(2), math.sqrt(2), 0, 0]]))
    assert torch.allclose(slerp(a, 3 * a, 0.5), 2 * a)  # parallel: falls back to lerp


def test_ddim_step_moves_exactly_along_the_deterministic_path():
    alphas = make_noise_scheduler().alphas_cumprod
    x0, eps = torch.rand(1, 3, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4)
    x_100 = alphas[100].sqrt() * x0 + (1 - alphas[100]).sqrt() * eps
    x_300 = ddim_step(x_100, eps, float(alphas[100]), float(alphas[300]))
    torch.testing.assert_close(x_300, alphas[300].sqrt() * x0 + (1 - alphas[300]).sqrt() * eps)
    torch.testing.assert_close(ddim_step(x_300, eps, float(alphas[300]), 1.0), x0)


def test_ddim_inversion_then_decoding_is_the_identity_for_an_exact_model():
    scheduler = make_noise_scheduler()
    target = torch.rand(1, 3, 8, 8) * 1.6 - 0.8
    pipe = DDPMInterpolationPipeline(unet=SingleImageOracle(target, scheduler.alphas_cumprod), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    latent = pipe.ddim_invert(target, 600, 30)
    torch.testing.assert_close(pipe.ddim_decode(latent, 600, 30), target, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 25, 1000])
def test_respacing_from_the_last_timestep_is_diffusers_trailing_grid_and_from_a_grid_point_its_rest(num_steps):
    """From t = T − 1 the pipeline steps through what DDIMScheduler(timestep_spacing="trailing") visits; from
    a point of that grid, with as many steps as remain, through the rest of it: a student's own grid."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    scheduler.set_timesteps(num_steps)
    grid = scheduler.timesteps.tolist()
    assert respaced_timesteps(999, num_steps) == sorted(grid)
    if num_steps in (2, 4, 8):  # T / N whole: every grid point is exact
        for i, t in enumerate(grid):
            assert respaced_timesteps(t, num_steps - i) == sorted(grid[i:])


def test_ddim_inversion_of_a_v_predicting_model_is_that_of_the_same_model_predicting_epsilon():
    """A distilled student predicts v = √ᾱ ε − √(1 − ᾱ) x₀: the pipeline takes ε from it, so the exact
    v-model inverts to the exact ε-model's latent, and decodes back."""
    target = torch.rand(1, 3, 8, 8) * 1.6 - 0.8
    epsilon_scheduler, v_scheduler = make_noise_scheduler(), make_noise_scheduler(prediction_type="v_prediction")
    oracle = SingleImageOracle(target, epsilon_scheduler.alphas_cumprod)

    class VOracle(torch.nn.Module):
        config, device, dtype = oracle.config, oracle.device, oracle.dtype

        def forward(self, x, t):
            alpha_bar = epsilon_scheduler.alphas_cumprod[int(torch.as_tensor(t).reshape(-1)[0])].double()
            v = alpha_bar.sqrt() * oracle(x, t).sample.double() - (1 - alpha_bar).sqrt() * target.double()
            return type(oracle(x, t))(sample=v.to(x.dtype))

    latents = []
    for unet, scheduler in ((oracle, epsilon_scheduler), (VOracle(), v_scheduler)):
        pipe = DDPMInterpolationPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        latents.append(pipe.ddim_invert(target, 600, 30))
        torch.testing.assert_close(pipe.ddim_decode(latents[-1], 600, 30), target, atol=1e-4, rtol=0)
    torch.testing.assert_close(latents[1], latents[0], atol=1e-4, rtol=0)


# ---------------------------------------------------------------- noise statistics


@pytest.mark.parametrize("t", [250, 500, 800])
def test_slerp_keeps_the_noise_level_of_q_at_t_and_lerp_does_not(pipeline, t):
    """With x₀ = 0 for both images, q(x_t) is N(0, 1 − ᾱ_t): each frame should have that per-pixel std."""
    zeros = torch.zeros(1, 3, 96, 96)
    sigma_t = math.sqrt(1 - float(pipeline.scheduler.alphas_cumprod[t]))
    measured = {}
    for method in ("lerp", "slerp"):
        frames = pipeline.noised_frames(zeros, zeros, t, 5, method, torch.Generator().manual_seed(t))
        measured[method] = [frame.std().item() / sigma_t for frame in frames]
    assert measured["slerp"] == pytest.approx([1.0] * 5, abs=0.03)
    assert measured["lerp"][2] == pytest.approx(math.sqrt(0.5), abs=0.03)  # (ε_a + ε_b)/2 has std 1/√2
    assert measured["lerp"][0] == pytest.approx(1.0, abs=0.03) and measured["lerp"][4] == pytest.approx(1.0, abs=0.03)


def test_noised_endpoints_are_exactly_the_q_samples(pipeline):
    x_a, x_b = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    t = 300
    for method in ("lerp", "slerp"):
        frames = pipeline.noised_frames(x_a, x_b, t, 4, method, torch.Generator().manual_seed(1))
        noise = randn_tensor((2, 3, 16, 16), generator=torch.Generator().manual_seed(1))
        alpha_bar = float(pipeline.scheduler.alphas_cumprod[t])
        expected_a = math.sqrt(alpha_bar) * x_a + math.sqrt(1 - alpha_bar) * noise[:1]
        expected_b = math.sqrt(alpha_bar) * x_b + math.sqrt(1 - alpha_bar) * noise[1:]
        torch.testing.assert_close(frames[:1], expected_a, atol=1e-5, rtol=0)
        torch.testing.assert_close(frames[-1:], expected_b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- endpoints and auto t


def test_ddim_method_reconstructs_its_inputs_at_small_t(pipeline):
    image_a, image_b = two_images()
    frames = pipeline(image_a=image_a, image_b=image_b, t=20, num_frames=5, method="ddim",
                      num_inference_steps=20, output_type="np").images
    inputs = [ddpm_interpolation.preprocess(image, 16).permute(1, 2, 0).numpy() / 2 + 0.5 for image in (image_a, image_b)]
    assert np.abs(frames[0] - inputs[0]).mean() < 0.02 and np.abs(frames[-1] - inputs[1]).mean() < 0.02
    assert np.abs(frames[2] - inputs[0]).mean() > 0.05  # the middle frame is neither input


@pytest.mark.parametrize("method", ["lerp", "slerp", "ddim"])
def test_every_method_returns_the_frames_and_the_noise_level(pipeline, method):
    image_a, image_b = two_images()
    output = pipeline(image_a=image_a, image_b=image_b, t=200, num_frames=4, method=method,
                      num_inference_steps=5, generator=torch.Generator().manual_seed(0))
    assert len(output.images) == 4 and output.images[0].size == (16, 16)
    assert output.noise_level == 200


def test_seeds_generate_the_endpoints_deterministically(pipeline):
    """With `ddim` at a small t, the end frames reproduce the endpoints, so they show what each seed generated."""
    def ends(seed_a, seed_b):
        frames = pipeline(seed_a=seed_a, seed_b=seed_b, t=20, num_frames=2, method="ddim", num_inference_steps=4,
                          output_type="np").images
        return frames[0], frames[1]

    one, two = ends(1, 2)
    assert np.abs(one - two).mean() > 0.02  # different seeds, different endpoints
    np.testing.assert_allclose(ends(1, 3)[0], one, atol=1e-5)  # A does not depend on seed B
    np.testing.assert_allclose(ends(3, 2)[1], two, atol=1e-5)  # nor B on seed A
    swapped = ends(2, 1)
    np.testing.assert_allclose(swapped[0], two, atol=1e-5)
    np.testing.assert_allclose(swapped[1], one, atol=1e-5)
    same = ends(5, 5)
    np.testing.assert_allclose(same[0], same[1], atol=1e-5)  # equal seeds, equal endpoints
    assert np.abs(same[0] - one).mean() > 0.02


def test_the_steps_called_on_their_own_keep_no_autograd_graph(pipeline):
    """`interpolate --seeds` calls `endpoints_from_seeds` outside `__call__`: a graph kept per U-Net call
    would grow memory with every step (gigabytes at 128 px)."""
    assert all(parameter.requires_grad for parameter in pipeline.unet.parameters())
    x = torch.zeros(1, 3, 16, 16)
    outputs = {
        "endpoints_from_seeds": pipeline.endpoints_from_seeds((1, 2), num_inference_steps=2),
        "ddim_invert": pipeline.ddim_invert(x, 20, num_inference_steps=2),
        "ddim_decode": pipeline.ddim_decode(x, 20, num_inference_steps=2),
        "ancestral_decode": pipeline.ancestral_decode(x, 20, num_inference_steps=2),
    }
    assert {name: out.requires_grad or out.grad_fn is not None for name, out in outputs.items()} == dict.fromkeys(
        outputs, False)


def test_auto_noise_level_is_larger_for_a_very_different_pair():
    alphas = make_noise_scheduler().alphas_cumprod
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    near = auto_noise_level(image, image + 0.02 * torch.randn_like(image), alphas)
    black, white = -torch.ones(1, 3, 32, 32), torch.ones(1, 3, 32, 32)
    far = auto_noise_level(black, white, alphas)
    middle = auto_noise_level(image, torch.rand(1, 3, 32, 32) * 2 - 1, alphas)
    assert near == 100 and near < middle < far <= 900


def test_auto_noise_level_matches_its_definition():
    alphas = make_noise_scheduler().alphas_cumprod.double()
    a, b = torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.5)
    t = auto_noise_level(a, b, alphas, ratio=0.2)
    holds = lambda s: alphas[s].sqrt() * 0.5 <= 0.2 * (1 - alphas[s]).sqrt()
    assert holds(t) and not holds(t - 1)


def test_pipeline_picks_t_automatically(pipeline):
    """Tensors at the model's size are used as they are, so the pipeline sees exactly these pairs."""
    alphas = pipeline.scheduler.alphas_cumprod
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    near = (image, (image + 0.01).clamp(-1, 1))
    far = (-torch.ones(3, 16, 16), torch.ones(3, 16, 16))
    chosen = {}
    for name, (a, b) in (("near", near), ("far", far)):
        chosen[name] = pipeline(image_a=a, image_b=b, t="auto", num_frames=2, num_inference_steps=2).noise_level
        assert chosen[name] == auto_noise_level(a[None], b[None], alphas)
    # black against white (d = 2) needs √ᾱ_t · 2 ≤ 0.2 √(1 − ᾱ_t), i.e. ᾱ_t ≤ 1/101: t ≈ 670 (docs/sampling.md)
    assert chosen["far"] == int((alphas.double() <= 1 / 101).nonzero()[0])
    assert chosen["near"] == 100 < chosen["far"]


def test_bad_arguments_are_clear_errors(pipeline):
    image_a, image_b = two_images()
    with pytest.raises(ValueError, match="method"):
        pipeline(image_a=image_a, image_b=image_b, method="cubic")
    with pytest.raises(ValueError, match="timestep"):
        pipeline(image_a=image_a, image_b=image_b, t=1000)
    with pytest.raises(ValueError, match="two images"):
        pipeline(image_a=image_a)
    for steps in (0, -3):  # respacing would otherwise run one step
        with pytest.raises(ValueError, match=f"num_inference_steps must be at least 1, got {steps}"):
            pipeline(image_a=image_a, image_b=image_b, num_inference_steps=steps)


# ---------------------------------------------------------------- a file any diffusers user can load


def test_the_pipeline_file_imports_only_torch_diffusers_and_the_standard_library():
    tree = ast.parse(PIPELINE_FILE.read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level == 0}
    import sys
    third_party = modules - set(sys.stdlib_module_names)
    assert third_party <= {"torch", "diffusers", "numpy", "PIL"}  # numpy and Pillow: diffusers' own requirements


def test_the_package_uses_this_very_file():
    assert inspect.getsource(ddpm_interpolation) == PIPELINE_FILE.read_text()


def test_loads_with_custom_pipeline_from_a_pipeline_folder(tiny_pipeline_folder):
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_folder, custom_pipeline=str(PIPELINE_FILE),
                                             trust_remote_code=True, use_safetensors=True)
    assert type(pipe).__name__ == "DDPMInterpolationPipeline"
    assert isinstance(pipe.scheduler, DDPMScheduler)
    image_a, image_b = two_images()
    assert len(pipe(image_a=image_a, image_b=image_b, t=50, num_frames=3, num_inference_steps=3).images) == 3


# ---------------------------------------------------------------- the CLI


def test_interpolate_cli_images_strip_and_gif(tmp_path, tiny_pipeline_folder):
    for name, image in zip(("a.png", "b.jpg"), two_images(40)):
        image.save(tmp_path / name)
    result = run_cli(tmp_path, "interpolate", str(tiny_pipeline_folder), "--images", "a.png", "b.jpg",
                     "--t", "auto", "--frames", "5", "--num_inference_steps", "4", "--out", "strip.png",
                     "--gif", "strip.gif")
    assert "t = " in result.stdout
    strip = Image.open(tmp_path / "strip.png")
    assert strip.size == ((5 + 2) * 16 + 2 * 4, 16)  # input A | 5 frames | input B
    gif = Image.open(tmp_path / "strip.gif")
    assert gif.n_frames == 2 * 5 - 2  # A → B → A


def test_interpolate_cli_pairs_file_gives_one_row_per_pair(tmp_path, tiny_pipeline_folder):
    for name, image in zip(("a.png", "b.png"), two_images(20)):
        image.save(tmp_path / name)
    (tmp_path / "pairs.txt").write_text("# seeds, then images\n3 4\na.png b.png\n")
    run_cli(tmp_path, "interpolate", str(tiny_pipeline_folder), "--pairs", "pairs.txt", "--t", "300",
            "--frames", "3", "--method", "ddim", "--num_inference_steps", "3", "--out", "rows.png")
    assert Image.open(tmp_path / "rows.png").size == ((3 + 2) * 16 + 8, 2 * 16 + 4)


@pytest.mark.slow
def test_two_launched_processes_interpolate_each_pair_once_as_one_process_does(tmp_path, tiny_pipeline_folder):
    """Under `accelerate launch`, 3 pairs over 2 processes: each process interpolates its share, with the noise
    of each pair's own index; the strip is the one a single process writes."""
    for folder in (tmp_path / "single", tmp_path / "launched"):
        folder.mkdir()
        (folder / "pairs.txt").write_text("1 2\n3 4\n5 6\n")
    args = ["interpolate", str(tiny_pipeline_folder), "--pairs", "pairs.txt", "--t", "300", "--frames", "3",
            "--num_inference_steps", "3", "--no_bf16", "--out", "rows.png"]
    run_cli(tmp_path / "single", *args)
    result = run_cli_launched(tmp_path / "launched", 2, *args)
    assert result.stdout.count("wrote rows.png") == 1
    # two processes print into one stream, where a line of one may land before the other's newline
    assert sorted(re.findall(r"pair \d/3: t = 300", result.stdout)) == [f"pair {i}/3: t = 300" for i in (1, 2, 3)]
    alone, shared = (np.asarray(Image.open(tmp_path / name / "rows.png"), np.int16) for name in ("single", "launched"))
    assert alone.shape == shared.shape == (3 * 16 + 2 * 4, (3 + 2) * 16 + 8, 3)
    assert np.abs(shared - alone).max() <= 1


def test_interpolate_cli_rejects_bad_input_clearly(tmp_path, tiny_pipeline_folder):
    result = run_cli(tmp_path, "interpolate", str(tiny_pipeline_folder), "--images", "missing.png", "b.png",
                     check=False)
    assert result.returncode != 0 and "missing.png" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(tmp_path, "interpolate", str(tiny_pipeline_folder), "--seeds", "1", "2", "--t", "soon",
                     check=False)
    assert result.returncode == 2 and "--t" in result.stderr


@pytest.fixture()
def nothing_interpolated(monkeypatch, tmp_path):
    """Run in an empty folder with the model loader and the interpolation replaced by recorders."""
    from lsun_ddpm.sample import interpolation

    calls = []
    monkeypatch.setattr(interpolation, "load_interpolation_pipeline", lambda *a, **k: calls.append("load"))
    monkeypatch.setattr(interpolation, "interpolate_pairs", lambda *a, **k: calls.append("interpolate"))
    monkeypatch.chdir(tmp_path)
    for name, image in zip(("a.png", "b.png"), two_images(20)):
        image.save(tmp_path / name)
    (tmp_path / "notes.png").write_text("not an image, whatever its name says")
    before = sorted(p.name for p in tmp_path.iterdir())
    yield calls
    assert calls == [], f"work started before the input was checked: {calls}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("flags, message", [
    (["--num_inference_steps", "0"], "--num_inference_steps must be a positive whole number, got 0"),
    (["--num_inference_steps", "-3"], "--num_inference_steps must be a positive whole number, got -3"),
    (["--t", "1000"], "--t must be 'auto' or a timestep from 1 to 999, got 1000"),  # the model's T is 1000
])
def test_interpolate_refuses_non_positive_steps_and_t_beyond_the_schedule(nothing_interpolated, tiny_pipeline_folder,
                                                                           capsys, flags, message):
    from lsun_ddpm.cli import interpolate_command

    with pytest.raises(SystemExit) as exit_info:
        interpolate_command([str(tiny_pipeline_folder), "--seeds", "1", "2", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("source, message", [
    (["--images", "a.png", "notes.png"], "'notes.png' is not an image PIL can read"),
    (["--pairs", "pairs.txt"], "is not an image PIL can read"),  # line 2: checked before pair 1 runs
    (["--pairs", "missing_pairs.txt"], "cannot read the pairs file 'missing_pairs.txt'"),
    (["--seeds", "1", "2", "--out", "strip.txt"], "--out 'strip.txt' does not end in an image format"),
    (["--seeds", "1", "2", "--gif", "strip.png"], "--gif 'strip.png' must end in .gif"),
])
def test_interpolate_refuses_bad_files_before_the_first_pair(nothing_interpolated, tiny_pipeline_folder, tmp_path,
                                                              source, message):
    from lsun_ddpm.cli import interpolate_command
    from lsun_ddpm.errors import InputError

    (tmp_path / "pairs.txt").write_text("1 2\na.png notes.png\n")
    with pytest.raises(InputError) as error:
        interpolate_command([str(tiny_pipeline_folder), *source])
    assert message in str(error.value)
    (tmp_path / "pairs.txt").unlink()
