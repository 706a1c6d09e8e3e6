"""End-to-end runs of `accelerate launch train_unconditional.py` on generated images."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from diffusers import DDPMPipeline, UNet2DModel
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors.torch import load_file

from lsun_ddpm.model.diffusion import Objective, make_noise_scheduler
from lsun_ddpm.model.unet import build_model
from lsun_ddpm.train import loop, outputs, resuming, run_folder, setup
from lsun_ddpm.train.options import TrainingConfig

from conftest import (TINY_RUN, accelerate_launch, assert_bitwise_equal, exported_weights, offline_env,
                      random_tiny_unet, read_scalars, read_summary, run_cli_launched, run_script_directly,
                      run_training)
from forked_process import run_forked

pytestmark = pytest.mark.slow

# 32 images in micro-batches of 4, accumulation 2: 4 optimizer steps per epoch. Checkpoints every 7 steps
# fall inside epochs, where a resumed run must skip batches and re-create the random flips exactly.
STEPS, ACCUMULATION, WARMUP, LR = 24, 2, 4, 2e-3
RUN_ARGS = ["--gradient_accumulation_steps", str(ACCUMULATION), "--max_train_steps", str(STEPS),
            "--random_flip", "true", "--checkpointing_steps", "7", "--checkpoints_total_limit", "2",
            "--save_images_steps", "12", "--save_model_steps", "12"]


@pytest.fixture(scope="module")
def run(image_folder, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("run")
    output_dir = tmp_path / "out"
    result = run_training(tmp_path, output_dir, ["--train_data_dir", str(image_folder), *RUN_ARGS])
    return output_dir, result


def test_the_optimizer_is_the_papers_adam_fused_on_the_cpu():
    """One step on a lone weight equals Adam's first update, w − lr·ĝ/(|ĝ| + ε) (no weight decay);
    and the CPU gets torch's fused kernel."""
    weight = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(weight.weight, 1.0)
    optimizer = setup.make_optimizer(weight, TrainingConfig(learning_rate=0.1), torch.device("cpu"))
    weight.weight.grad = torch.tensor([[0.5]])
    optimizer.step()
    assert weight.weight.item() == pytest.approx(1.0 - 0.1 * 0.5 / (0.5 + 1e-8))
    assert optimizer.defaults["fused"] is True
    assert not setup.make_optimizer(weight, TrainingConfig(), torch.device("mps")).defaults["fused"]


def test_the_loss_falls(run):
    losses = read_scalars(run[0], "train/loss")
    assert sorted(losses) == list(range(1, STEPS + 1))  # one value per optimizer step
    first, last = [losses[s] for s in range(1, 5)], [losses[s] for s in range(STEPS - 3, STEPS + 1)]
    assert sum(first) / 4 > 0.9  # zero-initialised output: the loss starts at E[ε²] = 1
    assert sum(last) / 4 < 0.6 * sum(first) / 4


def test_loss_per_quarter_of_t_grad_norm_and_throughput_are_logged(run):
    for tag in ("train/loss_t0-249", "train/loss_t750-999", "train/grad_norm", "train/images_per_second"):
        assert read_scalars(run[0], tag), tag


def test_the_run_writes_checkpoints_pipeline_raw_weights_samples_and_config(run):
    output_dir, result = run
    assert [p.name for p in sorted(output_dir.glob("checkpoint-*"))] == ["checkpoint-21", "checkpoint-24"]
    for path in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "unet_raw/diffusion_pytorch_model.safetensors", "samples/step-0000012.png",
                 "samples/step-0000024.png", "sample_grid.png", "training_config.yaml", "training_summary.json"):
        assert (output_dir / path).is_file(), path
    assert not list(output_dir.glob(".*"))  # no staging folders left
    assert "effective batch 8 = micro-batch 4 x accumulation 2 x 1 process(es)" in result.stderr + result.stdout


def test_ema_and_raw_weights_differ(run):
    ema = load_file(run[0] / "unet" / "diffusion_pytorch_model.safetensors")
    raw = load_file(run[0] / "unet_raw" / "diffusion_pytorch_model.safetensors")
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)


def test_the_pipeline_folder_samples_with_ddpm_pipeline(run):
    pipeline = DDPMPipeline.from_pretrained(run[0], use_safetensors=True)
    images = pipeline(batch_size=2, num_inference_steps=5, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and 0 <= images.min() and images.max() <= 1


def test_accumulation_makes_one_optimizer_step_and_one_ema_update_per_group(run):
    summary = read_summary(run[0])
    assert summary["optimizer_steps"] == STEPS
    assert summary["adam_step"] == STEPS
    assert summary["ema_optimization_step"] == STEPS
    assert summary["micro_batches_per_process"] == STEPS * ACCUMULATION
    assert summary["effective_batch_size"] == 4 * ACCUMULATION


def test_lr_after_k_optimizer_steps_matches_the_schedule(run):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=WARMUP, num_training_steps=STEPS)
    expected = {}
    for step in range(1, STEPS + 1):
        optimizer.step()
        schedule.step()
        expected[step] = schedule.get_last_lr()[0]
    logged = read_scalars(run[0], "train/lr")
    assert logged == pytest.approx(expected)
    assert logged[1] == pytest.approx(LR / WARMUP) and logged[STEPS] == pytest.approx(LR)


def test_ema_decay_logged_per_optimizer_step_follows_the_warmup(run):
    logged = read_scalars(run[0], "train/ema_decay")
    expected = {s: 0.0 if s == 1 else min(0.9999, 1 - s ** -0.75) for s in range(1, STEPS + 1)}
    assert logged == pytest.approx(expected, abs=1e-6)


def test_resume_continues_from_the_checkpoint_step(run, tmp_path, image_folder):
    """A folder holding nothing but checkpoint-21 (taken inside an epoch), resumed by its path."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run[0] / "checkpoint-21", resumed / "checkpoint-21")
    run_training(tmp_path, resumed, ["--train_data_dir", str(image_folder), *RUN_ARGS,
                                     "--resume_from_checkpoint", str(resumed / "checkpoint-21")])
    summary = read_summary(resumed)
    assert summary["optimizer_steps"] == STEPS and summary["adam_step"] == STEPS
    assert summary["ema_optimization_step"] == STEPS
    # The whole run's totals: the checkpoint's segment (steps 1-21) and this one (22-24).
    assert [(s["first_step"], s["last_step"], s["micro_batches_per_process"]) for s in summary["segments"]] == [
        (0, 21, 21 * ACCUMULATION), (21, STEPS, (STEPS - 21) * ACCUMULATION)]
    assert summary["micro_batches_per_process"] == STEPS * ACCUMULATION
    # This run logged steps 22-24 only, with the very losses of the uninterrupted run.
    losses = read_scalars(resumed, "train/loss")
    assert sorted(losses) == [22, 23, 24]
    assert losses == {step: read_scalars(run[0], "train/loss")[step] for step in (22, 23, 24)}
    # Data order, flips, noise and RNG states come back with the checkpoint: the weights this run
    # exported (there were none in its folder) are bit-identical to the uninterrupted run's.
    assert_bitwise_equal(exported_weights(run[0]), exported_weights(resumed))


def test_gradient_checkpointing_is_on_and_changes_no_result(run, tmp_path, image_folder):
    """checkpoint-21 resumed with --gradient_checkpointing: the blocks recompute their activations in
    backward, which saves memory and must not change a single weight of the uninterrupted run's."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run[0] / "checkpoint-21", resumed / "checkpoint-21")
    result = run_training(tmp_path, resumed, ["--train_data_dir", str(image_folder), *RUN_ARGS,
                                              "--gradient_checkpointing", "--resume_from_checkpoint", "latest"])
    assert "gradient checkpointing on" in result.stderr + result.stdout
    assert_bitwise_equal(exported_weights(run[0]), exported_weights(resumed))


def assert_close_weights(expected: dict, actual: dict, atol: float) -> None:
    for folder, tensors in expected.items():
        assert actual[folder].keys() == tensors.keys(), folder
        worst = max((tensors[k] - actual[folder][k]).abs().max().item() for k in tensors)
        assert worst <= atol, f"{folder}: weights differ by up to {worst}"


@pytest.mark.compiles
def test_a_compiled_run_checkpoints_resumes_and_exports_the_weights_of_an_uncompiled_one(run, tmp_path, image_folder):
    """checkpoint-21 of the uncompiled run resumed with --torch_compile to the end (24); the compiled run's
    checkpoint-24 then resumed without it for two more steps. Compiled kernels round differently (fp32
    here), so weights agree to a tolerance, not bit for bit; checkpoints and the exported pipeline have the
    very keys of an uncompiled run, and the export loads in stock diffusers."""
    compiled = tmp_path / "compiled"
    shutil.copytree(run[0] / "checkpoint-21", compiled / "checkpoint-21")
    args = ["--train_data_dir", str(image_folder), *RUN_ARGS, "--resume_from_checkpoint", "latest"]
    result = run_training(tmp_path, compiled, [*args, "--torch_compile"])
    assert "torch.compile on (mode default)" in result.stderr + result.stdout
    assert yaml.safe_load((compiled / "training_config.yaml").read_text())["torch_compile"] is True
    compiled_state = load_file(compiled / f"checkpoint-{STEPS}" / "model.safetensors")
    uncompiled_state = load_file(run[0] / f"checkpoint-{STEPS}" / "model.safetensors")
    assert compiled_state.keys() == uncompiled_state.keys()
    # Adam moves a weight by about lr per step: 3 compiled steps stay well within one step of the eager run
    assert max((compiled_state[k] - uncompiled_state[k]).abs().max().item() for k in compiled_state) < LR / 4
    assert_close_weights(exported_weights(run[0]), exported_weights(compiled), atol=LR / 4)
    exported = UNet2DModel.from_pretrained(compiled / "unet_raw")  # stock diffusers, no lsun_ddpm class needed
    assert list(exported.state_dict()) == list(build_model("tiny16").state_dict())

    run_training(tmp_path, compiled, [*args, "--torch_compile", "false", "--max_train_steps", str(STEPS + 2)])
    summary = read_summary(compiled)
    assert summary["optimizer_steps"] == summary["adam_step"] == STEPS + 2 and summary["torch_compile"] is False
    assert sorted(read_scalars(compiled, "train/loss"))[-2:] == [STEPS + 1, STEPS + 2]


def test_a_kill_while_saving_keeps_the_previous_checkpoint_and_resume_latest_is_exact(run, tmp_path, image_folder):
    """SIGKILL mid-save of checkpoint-14 (model and Adam written, EMA not), then `--resume_from_checkpoint latest`."""
    output_dir = tmp_path / "killed"
    killed = run_training(tmp_path, output_dir, ["--train_data_dir", str(image_folder), *RUN_ARGS],
                          probes=["--kill_while_saving", "14"], check=False)
    assert killed.returncode != 0 and not (output_dir / "training_summary.json").exists()
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-7"]
    run_training(tmp_path, output_dir, ["--train_data_dir", str(image_folder), *RUN_ARGS,
                                        "--resume_from_checkpoint", "latest"])
    summary = read_summary(output_dir)
    assert summary["optimizer_steps"] == STEPS and summary["micro_batches_per_process"] == STEPS * ACCUMULATION
    assert summary["segments"][-1]["micro_batches_per_process"] == (STEPS - 7) * ACCUMULATION  # from step 7 on
    assert_bitwise_equal(exported_weights(run[0]), exported_weights(output_dir))
    assert [p.name for p in sorted(output_dir.glob("checkpoint-*"))] == ["checkpoint-21", "checkpoint-24"]
    assert not list(output_dir.glob(".*"))  # the killed save's staging folder was cleared


def test_a_run_killed_after_its_last_checkpoint_writes_its_results_when_resumed(run, tmp_path, image_folder):
    """SIGKILL once checkpoint-24 is saved, before the final samples, pipeline and summary (a preempted
    job's grace period running out while it samples, say): resuming it writes them, without training."""
    output_dir = tmp_path / "stopped"
    shutil.copytree(run[0] / "checkpoint-21", output_dir / "checkpoint-21")
    args = ["--train_data_dir", str(image_folder), *RUN_ARGS, "--resume_from_checkpoint", "latest"]
    killed = run_training(tmp_path, output_dir, args, probes=["--kill_before_results"], check=False)
    assert killed.returncode != 0 and (output_dir / f"checkpoint-{STEPS}").is_dir()
    assert not (output_dir / "model_index.json").exists() and not (output_dir / "training_summary.json").exists()
    run_training(tmp_path, output_dir, args)
    summary = read_summary(output_dir)
    # no training in this job: the run is the two segments checkpoint-24 records
    assert [(s["first_step"], s["last_step"]) for s in summary["segments"]] == [(0, 21), (21, STEPS)]
    assert summary["optimizer_steps"] == STEPS and summary["micro_batches_per_process"] == STEPS * ACCUMULATION
    assert_bitwise_equal(exported_weights(run[0]), exported_weights(output_dir))
    assert (output_dir / "samples" / f"step-{STEPS:07d}.png").is_file()
    DDPMPipeline.from_pretrained(output_dir)


def test_a_resumed_run_trains_with_its_own_learning_rate_adam_and_ema_settings(run, tmp_path, image_folder):
    """checkpoint-21 resumed with a lower lr, weight decay and a capped EMA decay: the checkpoint restores
    its optimizer's and EMA's settings, and this run's must replace them from step 22 on. Its batch size,
    accumulation and seed change the batches it trains on, which it says; every one of its steps is a
    whole group of 4 micro-batches (accelerate's restored counter, 21 × 2 = 42, would end the first after 2)."""
    output_dir = tmp_path / "changed"
    shutil.copytree(run[0] / "checkpoint-21", output_dir / "checkpoint-21")
    new_lr = LR / 4
    result = run_training(tmp_path, output_dir, [
        "--train_data_dir", str(image_folder), *RUN_ARGS, "--resume_from_checkpoint", "latest",
        "--learning_rate", str(new_lr), "--adam_weight_decay", "0.5", "--ema_max_decay", "0.5",
        "--train_batch_size", "2", "--gradient_accumulation_steps", "4", "--seed", "7"])
    summary = read_summary(output_dir)
    assert summary["optimizer_steps"] == STEPS and summary["segments"][-1]["micro_batches_per_process"] == (STEPS - 21) * 4
    assert summary["micro_batches_per_process"] == 21 * ACCUMULATION + (STEPS - 21) * 4
    # constant_with_warmup after its 4 warm-up steps: the lr itself
    assert read_scalars(output_dir, "train/lr") == pytest.approx({22: new_lr, 23: new_lr, 24: new_lr})
    assert read_scalars(output_dir, "train/ema_decay") == pytest.approx({22: 0.5, 23: 0.5, 24: 0.5})
    adam = torch.load(output_dir / f"checkpoint-{STEPS}" / "optimizer.bin", weights_only=False)
    assert adam["param_groups"][0]["lr"] == pytest.approx(new_lr)
    assert adam["param_groups"][0]["weight_decay"] == 0.5
    log = " ".join((result.stderr + result.stdout).split())
    assert ("checkpoint-21 was trained with train_batch_size 4 (this run: 2), gradient_accumulation_steps 2 "
            "(this run: 4), seed 0 (this run: 7)") in log


def test_wandb_gets_the_sample_grids_as_diffusers_script_logs_its_samples(tmp_path, image_folder):
    """Offline (no account, no network): wandb keeps what was logged in its run folder."""
    pytest.importorskip("wandb", reason="wandb is not installed (it is no dependency of lsun_ddpm)")
    output_dir = tmp_path / "out"
    run_training(tmp_path, output_dir, ["--train_data_dir", str(image_folder), "--max_train_steps", "2",
                                        "--save_images_steps", "1", "--logger", "wandb"],
                 extra_env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    logged = sorted(path.name.split("_")[1] for path in tmp_path.glob("wandb/offline-run-*/files/media/images/"
                                                                         "samples/ema_*.png"))
    assert logged == ["1", "2"]  # one grid per --save_images_steps, at its step


def test_a_failure_between_state_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    linear = torch.nn.Linear(2, 2)
    model, _ = accelerator.prepare(linear, torch.optim.AdamW(linear.parameters()))
    torch.nn.init.constant_(model.weight, 1.0)
    outputs.save_checkpoint(accelerator, tmp_path, 1, total_limit=1, segments=[])
    torch.nn.init.constant_(model.weight, 2.0)

    def interrupted(source, destination):
        raise KeyboardInterrupt  # the state is written under its temporary name, not yet renamed

    monkeypatch.setattr(outputs, "replace_path", interrupted)
    with pytest.raises(KeyboardInterrupt):
        outputs.save_checkpoint(accelerator, tmp_path, 2, total_limit=1, segments=[])
    monkeypatch.undo()
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]
    torch.nn.init.constant_(model.weight, 3.0)
    config = TrainingConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest")
    checkpoint, _ = run_folder.checkpoint_to_resume(config)
    assert resuming.resume(accelerator, config, checkpoint, ema=None) == 1
    assert torch.all(model.weight == 1.0)


def test_sixteen_micro_batches_of_8_update_like_one_batch_of_128():
    """Through the training step itself: fp32, dropout 0, the same images, noise and timesteps.

    SGD with lr 1 makes the update the (clipped) gradient itself, so any error of scale shows; the
    clipping threshold is below the gradient's norm, so it must act once, on the accumulated gradient.
    """
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    objective = Objective(make_noise_scheduler())
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(128, 3, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(128, 3, 16, 16, generator=generator)
    timesteps = torch.randint(0, 1000, (128,), generator=generator)
    max_grad_norm = 1e-3

    def one_update(micro_batch: int):
        accelerator.gradient_accumulation_steps = 128 // micro_batch
        model = random_tiny_unet().train()
        before = [p.detach().clone() for p in model.parameters()]
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
        norms = [loop.train_micro_batch(accelerator, model, objective, clean[i:i + micro_batch],
                                            noise[i:i + micro_batch], timesteps[i:i + micro_batch], max_grad_norm)[1]
                 for i in range(0, 128, micro_batch)]
        assert all(norm is None for norm in norms[:-1])  # one optimizer step, after the last micro-batch
        optimizer.step()
        update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
        return update, float(norms[-1])

    accumulated, accumulated_norm = one_update(8)
    whole, whole_norm = one_update(128)
    assert whole_norm > 10 * max_grad_norm  # clipping acts
    assert accumulated_norm == pytest.approx(whole_norm, rel=1e-5)
    assert whole.norm() == pytest.approx(max_grad_norm, rel=1e-4)
    assert (accumulated - whole).norm() < 1e-4 * whole.norm()  # fp32 rounding (measured: 2e-5)


def test_the_hub_token_is_in_no_output_log_config_summary_card_or_upload(tmp_path, image_folder, fake_hub):
    token = "hf_TrainingTestToken1234567890abcdef"
    output_dir = tmp_path / "out"
    result = run_training(tmp_path, output_dir, [
        "--train_data_dir", str(image_folder), "--max_train_steps", "2", "--gradient_accumulation_steps", "1",
        "--checkpointing_steps", "100", "--save_images_steps", "100", "--save_model_steps", "100",
        "--logger", "tensorboard", "--push_to_hub", "--hub_model_id", "someone/trained", "--hub_token", token,
    ], extra_env=fake_hub.subprocess_env({}))
    assert f"Bearer {token}" in fake_hub.authorization_headers  # the run did use it
    uploaded = fake_hub.files("someone/trained")
    assert {"README.md", "training_config.yaml", "training_summary.json"} <= set(uploaded)
    written = {path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file()}
    logs = b"".join(data for path, data in written.items() if "logs" in path.relative_to(output_dir).parts)
    assert b"someone/trained" in logs  # TensorBoard's hparams hold the options' strings
    assert token not in result.stdout + result.stderr
    assert not [str(path) for path, data in written.items() if token.encode() in data]
    assert not [name for name, data in uploaded.items() if token.encode() in data]


def test_missing_checkpoint_is_a_one_line_error(tmp_path, image_folder):
    missing = tmp_path / "out" / "checkpoint-99"
    result = run_script_directly(tmp_path, *TINY_RUN, "--train_data_dir", str(image_folder), "--output_dir",
                                 str(tmp_path / "out"), "--resume_from_checkpoint", str(missing))
    assert result.returncode != 0
    assert f"train_unconditional.py: error: --resume_from_checkpoint {missing}: no such checkpoint folder" \
        in result.stderr
    assert "Traceback" not in result.stderr


def test_two_processes_match_one_process_with_twice_the_accumulation(tmp_path, image_folder):
    common = ["--train_data_dir", str(image_folder), "--max_train_steps", "6", "--checkpointing_steps", "100",
              "--save_images_steps", "100", "--save_model_steps", "100", "--logger", "none"]
    run_training(tmp_path, tmp_path / "two", common + ["--gradient_accumulation_steps", "1"], num_processes=2,
                 probes=["--save_replicas"])
    run_training(tmp_path, tmp_path / "one", common + ["--gradient_accumulation_steps", "2"], num_processes=1)
    two, one = read_summary(tmp_path / "two"), read_summary(tmp_path / "one")
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    # Each process wrote the weights it holds; DDP must have kept them identical.
    first, second = (load_file(tmp_path / "two" / f"replica-{i}.safetensors") for i in (0, 1))
    assert first.keys() == second.keys() and any(k.startswith("ema.") for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)
    exported = load_file(tmp_path / "two" / "unet_raw" / "diffusion_pytorch_model.safetensors")
    initial = build_model("tiny16").state_dict()
    assert any(not torch.equal(exported[k], initial[k]) for k in exported)  # training moved the weights
    assert all(torch.equal(exported[k], first[f"raw.{k}"]) for k in exported)
    assert two["replicas_in_sync"]
    for key in ("optimizer_steps", "adam_step", "ema_optimization_step", "effective_batch_size"):
        assert two[key] == one[key], key
    assert two["optimizer_steps"] == 6 and two["effective_batch_size"] == 8
    assert two["micro_batches_per_process"] == 6 and one["micro_batches_per_process"] == 12


def test_the_grids_use_the_eval_scheduler_and_say_so(tmp_path, image_folder):
    """--eval_scheduler ddim with 3 steps: the run's last grid is exactly DDIM-3 from its exported EMA weights,
    the log names the sampler and steps, and a progress bar counts the grid's U-Net steps."""
    from lsun_ddpm.sample.figures import image_grid
    from lsun_ddpm.sample.loading import load_scheduler_config, load_unet
    from lsun_ddpm.sample.sampling import SamplingPlan, generate

    output_dir = tmp_path / "out"
    result = run_training(tmp_path, output_dir, ["--train_data_dir", str(image_folder), "--max_train_steps", "2",
                                                 "--gradient_accumulation_steps", "1", "--eval_scheduler", "ddim",
                                                 "--ddpm_num_inference_steps", "3", "--logger", "none"])
    assert "step 2: sampling a grid of 4 images from the EMA weights (ddim, 3 steps)" in result.stderr
    assert "grid at step 2:   0%|          | 0/3" in result.stderr  # the bar counts the grid's 3 U-Net steps
    expected = image_grid(generate(load_unet(str(output_dir)), load_scheduler_config(str(output_dir)), 4, seed=0,
                                   plan=SamplingPlan("ddim", 3, batch_size=4, bf16=False)))
    grid = np.asarray(Image.open(output_dir / "sample_grid.png"), dtype=np.int16)
    assert np.abs(grid - np.asarray(expected, dtype=np.int16)).max() <= 1  # fp32 both ways: rounding at most


def test_demo_command_writes_a_grid_and_a_pipeline(tmp_path):
    output_dir = tmp_path / "demo"
    result = run_cli_launched(tmp_path, 1, "demo", "--output_dir", str(output_dir), "--max_train_steps", "3",
                              "--save_images_steps", "3", "--eval_batch_size", "4", "--ddpm_num_inference_steps", "3",
                              "--logger", "none", TORCH_HOME=str(tmp_path / "torch"))
    for name in ("sample_grid.png", "demo_overview.png", "model_index.json", "raw_vs_ema.png", "interpolation.png",
                 "neighbours.png", "neighbours.csv"):
        assert (output_dir / name).is_file(), name
    assert "demo_overview.png" in result.stdout
    neighbours = json.loads((output_dir / "neighbours.json").read_text())
    assert neighbours["num_samples"] == 4 and neighbours["num_training_images_searched"] == len(
        list((output_dir / "data").glob("*.png")))
    # offline without torchvision's ImageNet weights, the stand-in backbone is named, never silent
    assert "randomly initialised" in neighbours["note"] and "random backbone" in result.stdout


def test_streaming_bf16_channels_last_run(tmp_path, image_folder):
    """The streamed-dataset path (no length: epochs restart the stream) under bf16 autocast."""
    output_dir = tmp_path / "stream"
    run_training(tmp_path, output_dir, [
        "--train_data_dir", str(image_folder), "--streaming", "--max_train_steps", "10",
        "--gradient_accumulation_steps", "2", "--mixed_precision", "bf16", "--channels_last",
        "--checkpointing_steps", "100", "--save_images_steps", "100", "--save_model_steps", "100", "--logger", "none",
    ])
    summary = read_summary(output_dir)
    assert summary["mixed_precision"] == "bf16"
    assert summary["optimizer_steps"] == summary["adam_step"] == 10
    assert summary["micro_batches_per_process"] == 20  # more than one pass over the 32 images
    assert 0 < summary["final_loss"] < 2
    weights = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())  # master weights stay fp32


def test_two_processes_split_each_epoch_without_overlap_with_and_without_a_seed(tmp_path):
    """Each process draws its own noise, but both must shuffle the data identically to shard it."""
    folder = tmp_path / "greys"
    folder.mkdir()
    for value in range(16):
        Image.new("RGB", (8, 8), (value,) * 3).save(folder / f"{value:02d}.png")
    command = [*accelerate_launch(2), str(Path(__file__).parents[1] / "shard_check.py"), str(folder), "3", "none"]
    result = run_forked(command, offline_env(tmp_path), tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[:6000]
    assert "SHARDS-OK 3" in result.stdout and "SHARDS-OK none" in result.stdout


def test_missing_data_is_a_one_line_error(tmp_path):
    result = run_script_directly(tmp_path, "--train_data_dir", str(tmp_path / "nowhere"),
                                 "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "train_unconditional.py: error:" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing half-made


def test_a_hundred_unreadable_images_in_a_row_stop_a_streamed_run_with_a_one_line_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for index in range(100):
        (folder / f"{index:03d}.png").write_bytes(b"not an image at all")
    result = run_script_directly(tmp_path, *TINY_RUN, "--train_data_dir", str(folder), "--output_dir",
                                 str(tmp_path / "out"), "--max_train_steps", "2", "--logger", "none", "--streaming")
    assert result.returncode != 0
    assert "train_unconditional.py: error: 100 unreadable images in a row" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_run_from_pretrained_weights_trains_with_dropout_on(tmp_path, image_folder, tiny_pipeline_folder,
                                                              monkeypatch):
    """diffusers' from_pretrained returns a model in eval mode: fine-tuning (and a distillation's student, which
    starts from its teacher's weights) must still train in training mode, dropout on, at every micro-batch."""
    modes = []
    train_micro_batch = loop.train_micro_batch

    def recording(accelerator, model, *args, **kwargs):
        modes.append(model.training)
        return train_micro_batch(accelerator, model, *args, **kwargs)

    monkeypatch.setattr(loop, "train_micro_batch", recording)
    run_training(tmp_path, tmp_path / "run", ["--train_data_dir", str(image_folder), "--pretrained_model_name_or_path",
                                              str(tiny_pipeline_folder), "--max_train_steps", "3",
                                              "--gradient_accumulation_steps", "1", "--save_images_steps", "1",
                                              "--ddpm_num_inference_steps", "2", "--logger", "none"])
    assert len(modes) == 3 and all(modes), modes
