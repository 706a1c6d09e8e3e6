"""Stopping a run early but resumably: real training processes stopped by a signal or by non-finite steps."""

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_bitwise_equal, exported_weights, read_scalars, read_summary, run_training

pytestmark = pytest.mark.slow

# 32 images in micro-batches of 4, accumulation 2: 4 optimizer steps per epoch, 6 steps in all. Step 5
# gets a NaN in the reference run and in every run resumed from a stop, so their final weights still
# have to match bit for bit and their summaries count one skipped step.
STEPS = 6
RUN_ARGS = ["--gradient_accumulation_steps", "2", "--max_train_steps", str(STEPS), "--checkpointing_steps", "100",
            "--save_images_steps", "100", "--save_model_steps", "100", "--logger", "none"]
NAN_AT_STEP_5 = ["--nan_loss_at_steps", "5"]
SIGNAL_STATUS = {"SIGTERM": 143, "SIGINT": 130}  # 128 + the signal's number, as the README documents
NONFINITE_STATUS = 4


def run_probed(tmp_path: Path, output_dir: Path, probes: list[str], args: list[str]) -> subprocess.CompletedProcess:
    """One training process without a launcher, so that its own exit status is what the test sees (`run_training`)."""
    return run_training(tmp_path, output_dir, args, probes=probes, check=False, timeout=300)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def uninterrupted(image_folder, tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    succeeded(run_probed(tmp_path, tmp_path / "out", NAN_AT_STEP_5, ["--train_data_dir", str(image_folder),
                                                                     *RUN_ARGS]))
    return tmp_path / "out"


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_the_step_exits_with_its_status_and_resume_is_exact(
        signal_name, uninterrupted, tmp_path, image_folder):
    """The signal arrives at the first micro-batch of step 3: the run finishes that step, saves it and exits."""
    output_dir = tmp_path / "out"
    data = ["--train_data_dir", str(image_folder)]
    stopped = run_probed(tmp_path, output_dir, ["--signal_at_step", "3", signal_name], data + RUN_ARGS)
    assert stopped.returncode == SIGNAL_STATUS[signal_name], stopped.stderr[-4000:]
    assert (f"stopped by {signal_name} after step 3; checkpoint-3 saved; resume with --resume_from_checkpoint latest"
            in stopped.stderr)
    assert "press Ctrl-C again to abort at once" in stopped.stderr
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-3"]
    assert not (output_dir / "training_summary.json").exists()  # the run is not finished

    succeeded(run_probed(tmp_path, output_dir, NAN_AT_STEP_5, data + RUN_ARGS + ["--resume_from_checkpoint", "latest"]))
    resumed, reference = read_summary(output_dir), read_summary(uninterrupted)
    assert resumed["segments"][-1]["micro_batches_per_process"] == (STEPS - 3) * 2  # it did start from step 3
    assert resumed["micro_batches_per_process"] == reference["micro_batches_per_process"] == STEPS * 2
    assert resumed["optimizer_steps"] == reference["optimizer_steps"] == STEPS
    assert resumed["adam_step"] == reference["adam_step"] == STEPS - 1  # step 5 was skipped in both
    assert resumed["nonfinite_steps"] == reference["nonfinite_steps"] == 1
    assert_bitwise_equal(exported_weights(uninterrupted), exported_weights(output_dir))


def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, image_folder):
    output_dir = tmp_path / "out"
    args = ["--train_data_dir", str(image_folder), *RUN_ARGS, "--gradient_accumulation_steps", "1"]
    try:
        result = run_training(tmp_path, output_dir, args, num_processes=2, check=False,
                              probes=["--signal_at_step", "3", "SIGTERM", "--signal_rank", "1"], timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the processes did not agree to stop: the run hung")
    output = result.stdout + result.stderr
    assert result.returncode != 0  # the launcher reports its workers' status its own way (README)
    for rank in (0, 1):
        assert f"[RANK {rank}] stopped by SIGTERM after step 3; checkpoint-3 saved" in output, output[-4000:]
    # torchrun's report of its workers: the first to exit says 143; once one has exited, torchrun sends the
    # other a SIGTERM of its own, which may land after that one restored the default handlers on its way out.
    reported = dict(re.findall(r"rank\s+: (\d) \(local_rank: \d\)\s+exitcode\s+: (-?\d+)", output))
    assert "143" in reported.values() and set(reported.values()) <= {"143", "-15"}, output[-3000:]
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-3"]
    assert len(list((output_dir / "checkpoint-3").glob("random_states_*.pkl"))) == 2  # both processes saved


def checkpoint_state(folder: Path) -> dict:
    """What resuming restores besides the RNG states: weights, Adam, the lr schedule and the EMA."""
    return {
        "weights": load_file(folder / "model.safetensors"),
        "adam": torch.load(folder / "optimizer.bin", weights_only=False),
        "lr_schedule": torch.load(folder / "custom_checkpoint_0.pkl", weights_only=False),
        "ema": torch.load(folder / "custom_checkpoint_1.pkl", weights_only=False),
    }


def assert_same_state(expected, actual, where: str = "checkpoint") -> None:
    if isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            assert_same_state(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for index, (left, right) in enumerate(zip(expected, actual)):
            assert_same_state(left, right, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), where  # NaN never equals anything
    else:
        assert expected == actual, where


def test_non_finite_steps_are_skipped_counted_and_too_many_in_a_row_stop_the_run(tmp_path, image_folder):
    """NaN at step 2 (skipped), then at steps 4 and 5 with --max_nonfinite_steps 2: the run stops after step 5."""
    output_dir = tmp_path / "out"
    result = run_probed(tmp_path, output_dir, ["--nan_loss_at_steps", "2,4,5"], [
        "--train_data_dir", str(image_folder), *RUN_ARGS, "--max_train_steps", "8", "--checkpointing_steps", "1",
        "--max_nonfinite_steps", "2", "--logger", "tensorboard"])
    assert result.returncode == NONFINITE_STATUS, result.stderr[-4000:]
    assert ("stopped after step 5: 2 optimizer steps in a row had a non-finite loss or gradient norm; "
            "checkpoint-5 holds the weights of step 3") in result.stderr
    assert "optimizer step 2 skipped: non-finite loss or gradient norm" in result.stderr
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, 6)]

    states = {step: checkpoint_state(output_dir / f"checkpoint-{step}") for step in (1, 2, 3, 5)}
    assert_same_state(states[1], states[2])  # the skipped step changed no weight, Adam moment, lr or EMA
    assert_same_state(states[3], states[5])  # the stop keeps the last good state
    assert states[3]["adam"]["state"][0]["step"] == 2 and states[3]["ema"]["optimization_step"] == 2
    assert any(not torch.equal(states[2]["weights"][k], states[3]["weights"][k]) for k in states[2]["weights"])
    assert read_scalars(output_dir, "train/nonfinite_steps") == {1: 0, 2: 1, 3: 1, 4: 2, 5: 3}


def test_a_second_ctrl_c_aborts_but_a_launcher_forwarding_the_first_does_not(monkeypatch):
    """In-process: the handler only records the first signal; the previous handlers come back after the run."""
    from lsun_ddpm.train import preemption

    before = signal.getsignal(signal.SIGINT)
    with preemption.StopRequest() as stop_request:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            os.kill(os.getpid(), signal.SIGINT)  # a launcher forwarding the terminal's Ctrl-C, a moment later
        except KeyboardInterrupt:
            pytest.fail("a signal repeated within the window aborted the run")
        assert stop_request.signal_number == signal.SIGTERM
        monkeypatch.setattr(preemption, "REPEAT_WINDOW_SECONDS", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again
    assert signal.getsignal(signal.SIGINT) is before


def test_max_nonfinite_steps_below_one_is_an_input_error():
    from lsun_ddpm.errors import InputError
    from lsun_ddpm.train.options import TrainingConfig

    with pytest.raises(InputError, match="--max_nonfinite_steps must be at least 1, got 0"):
        TrainingConfig(max_nonfinite_steps=0)


def test_a_finite_loss_with_a_non_finite_gradient_norm_is_skipped_and_counted():
    """In-process, through the loop's own functions: the loss is finite, one gradient is infinite (a hook sets
    it so), so the gradient norm is not finite; the step changes no weight, Adam state, lr or EMA, and counts."""
    from accelerate import Accelerator
    from conftest import random_tiny_unet
    from diffusers.optimization import get_scheduler

    from lsun_ddpm.model.diffusion import Objective, make_noise_scheduler
    from lsun_ddpm.train.ema import make_ema
    from lsun_ddpm.train.loop import apply_or_skip_step, train_micro_batch
    from lsun_ddpm.train.preemption import NonFiniteSteps
    from lsun_ddpm.train.step_stats import StepStats

    accelerator = Accelerator(cpu=True, mixed_precision="no")
    unet = random_tiny_unet().train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    model, optimizer = accelerator.prepare(unet, optimizer)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=10, num_training_steps=100)
    ema = make_ema(unet)
    before = {name: value.clone() for name, value in unet.state_dict().items()}
    unet.conv_out.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))

    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    noise, timesteps = torch.randn(2, 3, 16, 16, generator=generator), torch.tensor([10, 500])
    losses, grad_norm = train_micro_batch(accelerator, model, Objective(make_noise_scheduler()), clean, noise,
                                          timesteps, max_grad_norm=1.0)
    assert torch.isfinite(losses["loss"]).all() and not torch.isfinite(torch.as_tensor(grad_norm))
    stats = StepStats(accelerator.device)
    stats.add(losses, torch.zeros(2, dtype=torch.long))
    step = stats.finish_step(accelerator, 1000, grad_norm, [0.0, 0.0])
    assert not step.finite

    apply_or_skip_step(accelerator, optimizer, lr_scheduler, ema, unet, step.finite)
    nonfinite = NonFiniteSteps(limit=10, last_good_step=0)
    nonfinite.record(step.finite, 1)
    assert nonfinite.total == 1 and nonfinite.in_a_row == 1
    assert all(torch.equal(before[name], value) for name, value in unet.state_dict().items())
    assert optimizer.optimizer.state == {} and lr_scheduler.last_epoch == 0 and ema.optimization_step == 0
    assert all(parameter.grad is None for parameter in unet.parameters())
