"""`lsun-ddpm distill` end to end on a tiny teacher: the stages, their folders and grids, the student in stock
diffusers, and resuming after a kill."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import LAUNCHED_ON_CPU, PROBED_SCRIPT, assert_bitwise_equal, offline_env, run_cli, run_cli_launched
from diffusers import DDIMScheduler, UNet2DModel
from forked_process import run_forked
from in_process import run_in_process
from PIL import Image
from safetensors.torch import load_file

from lsun_ddpm.cli import main
from lsun_ddpm.model.diffusion import make_noise_scheduler

pytestmark = pytest.mark.slow

# fp32 (as the training tests), a tiny batch, a high learning rate: a few steps move the student
DISTILL_RUN = ["--mixed_precision", "no", "--train_batch_size", "4", "--learning_rate", "2e-3", "--eval_batch_size",
               "4", "--gradient_accumulation_steps", "2", "--seed", "0", "--dataloader_num_workers", "0",
               "--checkpointing_steps", "3"]
# From the teacher's 4 DDIM steps to a 1-step student: a bridge stage (2 optimizer steps), then 4 → 2 and
# 2 → 1, the last two halvings, each twice --steps_per_stage.
STAGES = {"stage-4": 2, "stage-2": 8, "stage-1": 8}


def student_weights(folder):
    """The weights a stage or the final student exports (no EMA: the paper's distillation keeps none)."""
    return {"unet": load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")}


def distill(tmp_path, teacher, output_dir, image_folder, *extra, probes=None, check=True):
    args = ["distill", str(teacher), "--output_dir", str(output_dir), "--train_data_dir", str(image_folder),
            "--start_steps", "4", "--student_steps", "1", "--steps_per_stage", "4", "--bridge_steps", "2",
            *DISTILL_RUN, *extra]
    if probes is None:
        result = run_in_process(main, args, offline_env(tmp_path, **LAUNCHED_ON_CPU), tmp_path)
    else:  # a probe that kills: a process of its own
        result = run_forked([str(PROBED_SCRIPT), "--distill", *probes, *args], offline_env(tmp_path), tmp_path)
    if check and result.returncode != 0:
        raise AssertionError(f"distill failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_pipeline_folder, image_folder):
    tmp_path = tmp_path_factory.mktemp("distilled")
    result = distill(tmp_path, tiny_pipeline_folder, tmp_path / "student", image_folder)
    return tmp_path / "student", result


def test_each_stage_is_a_finished_run_of_its_length_and_a_stock_ddim_pipeline(distilled):
    student, _ = distilled
    for name, steps in STAGES.items():
        summary = json.loads((student / name / "training_summary.json").read_text())
        assert summary["optimizer_steps"] == summary["adam_step"] == steps, name
        index = json.loads((student / name / "model_index.json").read_text())
        assert index["_class_name"] == "DDIMPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
        assert (student / name / "sample_grid.png").is_file()
    assert json.loads((student / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"
    record = json.loads((student / "distillation.json").read_text())
    assert record["student_steps"] == 1 and record["prediction_type"] == "v_prediction"
    assert [(s["name"], s["teacher_steps"], s["student_steps"], s["optimizer_steps"]) for s in record["stages"]] == [
        ("stage-4", 4, 4, 2), ("stage-2", 4, 2, 8), ("stage-1", 2, 1, 8)]


def test_each_saved_scheduler_visits_exactly_its_students_grid_a_subset_of_the_stage_befores(distilled):
    student, _ = distilled
    grids = {}
    for name in STAGES:
        scheduler = DDIMScheduler.from_pretrained(student / name, subfolder="scheduler")
        assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.set_alpha_to_one
        steps = int(name.split("-")[1])
        scheduler.set_timesteps(steps)
        grids[name] = scheduler.timesteps.tolist()
        assert scheduler.final_alpha_cumprod == 1.0  # the last step lands on x₀
    assert grids == {"stage-4": [999, 749, 499, 249], "stage-2": [999, 499], "stage-1": [999]}


def test_the_last_stage_brought_one_student_step_closer_to_two_teacher_steps(distilled):
    """From the same noise, one step of diffusers' DDIM with the 1-step student lands closer to where two
    steps with its teacher (stage-2's student) land than one step with the teacher's own weights, where the
    last stage started."""
    student, _ = distilled
    z = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def sample(folder, steps):
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        scheduler.set_timesteps(steps)
        x = z
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        return x

    target = sample(student / "stage-2", 2)
    error = {name: (sample(folder, 1) - target).pow(2).mean().item()
             for name, folder in (("start", student / "stage-2"), ("end", student))}
    assert error["end"] < 0.9 * error["start"], error  # a student trained toward another target stays at ~1.0


def test_the_student_samples_in_stock_diffusers_with_the_package_hidden(distilled, tmp_path):
    """DDIMPipeline at the student's 1 step is x₀ = clip(α z − σ v̂(z, 999)); DDPMPipeline, told the same
    step count, runs the saved DDIMScheduler and gives the same images."""
    student, _ = distilled
    unet = UNet2DModel.from_pretrained(student, subfolder="unet").eval()
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    alpha_bar = make_noise_scheduler().alphas_cumprod[999]
    with torch.no_grad():
        x0 = alpha_bar.sqrt() * z - (1 - alpha_bar).sqrt() * unet(z, torch.tensor([999, 999])).sample
    expected = (x0.clamp(-1, 1) / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    torch.save({"expected": torch.from_numpy(expected)}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["lsun_ddpm"] = None  # as on a machine without the package
        import torch
        from diffusers import DDIMPipeline, DDPMPipeline
        expected = torch.load({str(tmp_path / "expected.pt")!r})["expected"].numpy()
        for cls in (DDIMPipeline, DDPMPipeline):
            pipeline = cls.from_pretrained({str(student)!r}, use_safetensors=True)
            images = pipeline(batch_size=2, num_inference_steps=1, generator=torch.Generator().manual_seed(5),
                              output_type="np").images
            assert abs(images - expected).max() < 1e-5, (cls.__name__, abs(images - expected).max())
        print("stock-student-ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stock-student-ok" in result.stdout


def test_a_kill_mid_stage_then_a_rerun_gives_the_uninterrupted_student_bit_for_bit(
        distilled, tmp_path, tiny_pipeline_folder, image_folder):
    """SIGKILL at step 5 of stage-2 (checkpoint-3 saved), then the same command: stage-4 is not run again,
    stage-2 resumes from its checkpoint, and every stage's weights equal the uninterrupted run's."""
    uninterrupted, _ = distilled
    output_dir = tmp_path / "student"
    killed = distill(tmp_path, tiny_pipeline_folder, output_dir, image_folder, check=False,
                     probes=["--signal_at_step", "5", "SIGKILL", "--signal_in_folder", "stage-2"])
    assert killed.returncode != 0 and (output_dir / "stage-2" / "checkpoint-3").is_dir()
    assert not (output_dir / "stage-2" / "training_summary.json").exists()
    stage_4_summary = (output_dir / "stage-4" / "training_summary.json").read_bytes()

    result = distill(tmp_path, tiny_pipeline_folder, output_dir, image_folder)
    assert "stage-4: finished earlier" in result.stderr + result.stdout
    assert (output_dir / "stage-4" / "training_summary.json").read_bytes() == stage_4_summary
    for name in STAGES:
        assert_bitwise_equal(student_weights(uninterrupted / name), student_weights(output_dir / name))
    assert_bitwise_equal(student_weights(uninterrupted), student_weights(output_dir))


def test_a_kill_at_a_stage_boundary_continues_with_the_next_stage(distilled, tmp_path, tiny_pipeline_folder,
                                                                  image_folder):
    """SIGKILL at the first step of stage-1, stage-2 finished: the rerun trains stage-1 only."""
    uninterrupted, _ = distilled
    output_dir = tmp_path / "student"
    killed = distill(tmp_path, tiny_pipeline_folder, output_dir, image_folder, check=False,
                     probes=["--signal_at_step", "1", "SIGKILL", "--signal_in_folder", "stage-1"])
    assert killed.returncode != 0 and (output_dir / "stage-2" / "training_summary.json").is_file()
    result = distill(tmp_path, tiny_pipeline_folder, output_dir, image_folder)
    output = result.stderr + result.stdout
    assert "stage-4: finished earlier" in output and "stage-2: finished earlier" in output
    assert_bitwise_equal(student_weights(uninterrupted), student_weights(output_dir))


def test_sample_draws_from_a_student_with_its_own_steps_and_says_what_other_steps_do(distilled, tmp_path,
                                                                                     tiny_pipeline_folder):
    student, _ = distilled
    result = run_cli(tmp_path, "sample", str(student), "--num_images", "4", "--no_bf16", "--out", "default.png")
    assert "ddim, 1 steps" in result.stdout and "not trained at" not in result.stdout
    explicit_run = run_cli(tmp_path, "sample", str(student), "--num_images", "4", "--no_bf16", "--out", "explicit.png",
                       "--scheduler", "ddim", "--num_inference_steps", "1")
    assert "not trained at" not in explicit_run.stdout
    default, explicit = (np.asarray(Image.open(tmp_path / name)) for name in ("default.png", "explicit.png"))
    assert np.array_equal(default, explicit)
    more = run_cli(tmp_path, "sample", str(student), "--num_images", "4", "--no_bf16", "--num_inference_steps", "4")
    assert "distilled to sample with ddim in 1 steps; ddim with 4 steps visits timesteps it was not trained at" in (
        more.stdout)
    other = run_cli(tmp_path, "sample", str(student), "--num_images", "4", "--no_bf16", "--scheduler", "unipc")
    assert "unipc with 1 steps visits timesteps it was not trained at" in other.stdout
    teacher = run_cli(tmp_path, "sample", str(tiny_pipeline_folder), "--num_images", "4", "--no_bf16")
    assert "dpmsolver++, 25 steps" in teacher.stdout and "not trained at" not in teacher.stdout  # as before


def test_the_space_offers_a_students_own_steps_and_generates_with_them(distilled, tiny_pipeline_folder):
    from lsun_ddpm.publish.app import SpaceModel

    student, _ = distilled
    space = SpaceModel(str(student), bf16=False)
    assert space.default_sampler == ("ddim", 1)
    images = space.generate(2, *space.default_sampler, seed=0)
    assert [image.size for image in images] == [(16, 16)] * 2
    assert SpaceModel(str(tiny_pipeline_folder), bf16=False).default_sampler == ("dpmsolver++", 25)


def test_two_launched_processes_distill_every_stage_in_step(tmp_path, tiny_pipeline_folder, image_folder):
    """`accelerate launch` with 2 processes: each stage is a 2-process run whose replicas end with the same
    weights (the loop's own check), and the student is written."""
    output_dir = tmp_path / "student"
    args = ["distill", str(tiny_pipeline_folder), "--output_dir", str(output_dir), "--train_data_dir",
            str(image_folder), "--start_steps", "2", "--student_steps", "1", "--steps_per_stage", "2",
            "--bridge_steps", "0", *DISTILL_RUN]
    result = run_cli_launched(tmp_path, 2, *args)
    summary = json.loads((output_dir / "stage-1" / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["replicas_in_sync"] and summary["optimizer_steps"] == 4
    assert "the student of 1 steps is" in result.stderr
    assert json.loads((output_dir / "distillation.json").read_text())["student_steps"] == 1


def test_push_publishes_a_student_with_a_card_that_says_what_it_is_and_how_to_sample_it(distilled, tmp_path):
    from huggingface_hub import ModelCard

    student, _ = distilled
    run_cli(tmp_path, "push", str(student), "--hub_model_id", "me/student", "--dry_run", str(tmp_path / "upload"))
    upload = tmp_path / "upload"
    published = {p.name for p in upload.iterdir()}
    assert {"distillation.json", "sample_grid.png", "interpolation.png", "model_index.json", "README.md"} <= published
    record = json.loads((student / "distillation.json").read_text())
    assert record["teacher"] not in (upload / "distillation.json").read_text()  # the teacher's local path is not
    card = ModelCard.load(upload / "README.md")
    assert "distillation" in card.data.tags and card.data.base_model is None  # the teacher is a local folder
    for words in ("distilled student", "num_inference_steps=1", "DDIMPipeline.from_pretrained(\"me/student\"",
                  record["teacher_weights_sha256"], "| stage-4 | 4 | 4 | 2 |", "| stage-2 | 4 | 2 | 8 |",
                  "| stage-1 | 2 | 1 | 8 |", "No FID/KID evaluation has been run for this student"):
        assert words in card.text, words


def test_interpolate_takes_a_students_grid_point_and_its_own_steps_from_there(distilled, tmp_path, monkeypatch):
    """The 2-step student (stage-2: grid 999, 499): t = 499, the grid point nearest 500, one step from it, and
    two for an endpoint from a seed; a t off its grid is done as asked, with a note."""
    from lsun_ddpm.publish.app import SpaceModel
    from lsun_ddpm.sample import commands

    student = distilled[0] / "stage-2"
    calls = []
    interpolate_pairs = commands.interpolate_pairs

    def recorded(pipeline, pairs, t, frames, method, steps, *args, **kwargs):
        calls.append((t, steps, kwargs["endpoint_steps"]))
        return interpolate_pairs(pipeline, pairs, t, frames, method, steps, *args, **kwargs)

    monkeypatch.setattr(commands, "interpolate_pairs", recorded)
    args = ["interpolate", str(student), "--seeds", "1", "2", "--frames", "3", "--no_bf16"]
    result = run_cli(tmp_path, *args)
    assert calls == [(499, 1, 2)] and "pair 1/1: t = 499" in result.stdout and "not trained at" not in result.stdout
    off_grid = run_cli(tmp_path, *args, "--t", "600")
    assert calls[-1] == (600, 2, 2) and "t = 600 with 2 steps from it visits timesteps it was not trained at" in (
        off_grid.stdout)
    assert SpaceModel(str(student), bf16=False).default_noise_level == (False, 499)
