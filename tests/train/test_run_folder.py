"""One run per run folder: a second run is refused or moves the first aside; resume picks a complete
checkpoint of this run; the summary is strict JSON; short disk space is said before any work."""

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lsun_ddpm.train import resuming, run_folder
from lsun_ddpm.train.options import TrainingConfig
from lsun_ddpm.train.parsing import parse_training_config
from lsun_ddpm.errors import InputError

from conftest import (TINY_RUN, read_scalars, read_summary,
                      run_script_directly, run_training, train_in_process)

# What accelerate's save_state writes for a model and its Adam on process 0 (plus our lr schedule).
STATE_FILES = ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl")


def tiny_config(output_dir: Path, **options) -> TrainingConfig:
    """A config as training resolves it (resolution set from the model)."""
    return TrainingConfig(model_preset="tiny16", resolution=16, output_dir=str(output_dir), **options)


def fake_checkpoint(folder: Path, config: TrainingConfig | None, files=STATE_FILES, run_id: str | None = None) -> Path:
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(f"{folder.name}/{name}".encode())
    if config is not None:
        config.save(str(folder / "training_config.yaml"))
    if run_id is not None:
        (folder / "run_identity.json").write_text(json.dumps({"run_id": run_id}))
    return folder


def fake_run(output_dir: Path, config: TrainingConfig, run_id: str | None = None) -> Path:
    """A folder laid out as a finished run with two checkpoints leaves it (with an identity if `run_id`)."""
    fake_checkpoint(output_dir / "checkpoint-2", config, run_id=run_id)
    fake_checkpoint(output_dir / "checkpoint-4", config, run_id=run_id)
    if run_id is not None:
        (output_dir / "run_identity.json").write_text(json.dumps({"run_id": run_id}))
    config.save(str(output_dir / "training_config.yaml"))
    (output_dir / "logs" / "train_unconditional").mkdir(parents=True)
    (output_dir / "logs" / "train_unconditional" / "events.out.tfevents.1.old").write_bytes(b"old events")
    (output_dir / "samples").mkdir()
    (output_dir / "samples" / "step-0000004.png").write_bytes(b"old grid")
    (output_dir / "training_summary.json").write_text('{"optimizer_steps": 4}\n')
    return output_dir


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------- the run folder


def test_a_new_run_into_a_folder_holding_a_run_is_refused_naming_both_choices(tmp_path):
    output_dir = fake_run(tmp_path / "out", tiny_config(tmp_path / "out"))
    before = snapshot(output_dir)
    with pytest.raises(InputError) as refused:
        run_folder.check_output_dir(tiny_config(output_dir))
    message = str(refused.value)
    assert message.startswith(f"{output_dir} already holds a training run (checkpoint-2, checkpoint-4, logs, samples")
    assert "--resume_from_checkpoint latest" in message and "--overwrite_output_dir" in message
    assert "\n" not in message
    assert snapshot(output_dir) == before


def test_checkpoints_alone_are_a_run_too(tmp_path):
    fake_checkpoint(tmp_path / "out" / "checkpoint-3", config=None)
    with pytest.raises(InputError, match="already holds a training run"):
        run_folder.check_output_dir(tiny_config(tmp_path / "out"))


def test_a_folder_without_a_run_is_used_as_it_is(tmp_path):
    (tmp_path / "out" / "data").mkdir(parents=True)  # e.g. the demo's training images
    assert run_folder.check_output_dir(tiny_config(tmp_path / "out")) is False
    assert run_folder.check_output_dir(tiny_config(tmp_path / "nowhere")) is False


def test_resuming_with_another_preset_names_what_differs(tmp_path):
    output_dir = fake_run(tmp_path / "out", tiny_config(tmp_path / "out"))
    before = snapshot(output_dir)
    other = TrainingConfig(model_preset="small32", resolution=32, output_dir=str(output_dir),
                           resume_from_checkpoint="latest")
    with pytest.raises(InputError) as refused:
        run_folder.check_output_dir(other)
    assert str(refused.value).startswith(
        f"cannot resume the run in {output_dir}: it was trained with model_preset tiny16 (this run: small32), "
        f"resolution 16 (this run: 32); ")
    assert snapshot(output_dir) == before


def test_resuming_a_streamed_run_from_downloaded_data_is_refused(tmp_path):
    """Its checkpoints hold the stream's position, which map-style data has no place for."""
    output_dir = fake_run(tmp_path / "out", tiny_config(tmp_path / "out", streaming=True, max_train_steps=4))
    with pytest.raises(InputError, match=r"it was trained with streaming True \(this run: False\)"):
        run_folder.check_output_dir(tiny_config(output_dir, resume_from_checkpoint="latest"))


def test_resuming_with_the_same_settings_is_allowed_even_with_another_learning_rate(tmp_path):
    output_dir = fake_run(tmp_path / "out", tiny_config(tmp_path / "out"))
    same = tiny_config(output_dir, resume_from_checkpoint="latest", learning_rate=1e-5)
    assert run_folder.check_output_dir(same) is False


def test_overwrite_and_resume_together_are_refused(tmp_path):
    with pytest.raises(InputError, match="give only one of them"):
        run_folder.check_output_dir(tiny_config(tmp_path, overwrite_output_dir=True, resume_from_checkpoint="latest"))


def test_overwrite_moves_the_old_run_aside_and_keeps_training_data_inside_it(tmp_path):
    output_dir = fake_run(tmp_path / "out", tiny_config(tmp_path / "out"))
    (output_dir / "data").mkdir()
    (output_dir / "data" / "0.png").write_bytes(b"an image")
    old_run = {name: data for name, data in snapshot(output_dir).items() if not name.startswith("data")}
    assert run_folder.check_output_dir(tiny_config(output_dir, overwrite_output_dir=True)) is True
    aside = run_folder.move_run_aside(output_dir, keep=[str(output_dir / "data"), None])
    assert aside.parent == output_dir.resolve().parent and aside.name.startswith("out.replaced-")
    assert snapshot(aside) == old_run
    assert snapshot(output_dir) == {"data/0.png": b"an image"}
    assert run_folder.check_output_dir(tiny_config(output_dir)) is False  # a new run may start


def test_a_saved_config_reused_never_moves_its_run_aside(tmp_path):
    tiny_config(tmp_path, overwrite_output_dir=True).save(str(tmp_path / "training_config.yaml"))
    saved = (tmp_path / "training_config.yaml").read_text()
    assert "overwrite_output_dir" not in saved and "model_preset: tiny16" in saved


def test_two_overwrites_in_the_same_second_keep_both_old_runs(tmp_path):
    first = run_folder.move_run_aside(fake_run(tmp_path / "out", tiny_config(tmp_path / "out")))
    second = run_folder.move_run_aside(fake_run(tmp_path / "out", tiny_config(tmp_path / "out")))
    assert first != second and snapshot(first) == snapshot(second) != {}


# ---------------------------------------------------------------- the checkpoint to resume


def test_latest_passes_over_incomplete_and_foreign_checkpoints(tmp_path):
    config = tiny_config(tmp_path, resume_from_checkpoint="latest")
    fake_run(tmp_path, config)
    fake_checkpoint(tmp_path / "checkpoint-6", config, files=("model.safetensors", "random_states_0.pkl"))
    fake_checkpoint(tmp_path / "checkpoint-8", TrainingConfig(model_preset="small32", resolution=32))
    fake_checkpoint(tmp_path / ".checkpoint-10.partial", config)
    path, passed_over = run_folder.checkpoint_to_resume(config)
    assert path == tmp_path / "checkpoint-4"
    assert passed_over == ["checkpoint-8 (it was trained with model_preset small32 (this run: tiny16), "
                           "resolution 32 (this run: 16))", "checkpoint-6 (it holds no optimizer.bin)"]


def test_latest_in_a_run_with_results_but_no_complete_checkpoint_is_refused(tmp_path):
    config = tiny_config(tmp_path, resume_from_checkpoint="latest")
    config.save(str(tmp_path / "training_config.yaml"))
    (tmp_path / "model_index.json").write_text("{}")  # it exported a pipeline: never restarted from zero
    fake_checkpoint(tmp_path / ".checkpoint-2.partial", config)
    assert not run_folder.check_output_dir(config)
    with pytest.raises(InputError, match=r"holds a run but no complete checkpoint of it; start a new run with "
                                         r"--overwrite_output_dir"):
        run_folder.checkpoint_to_resume(config)


def test_latest_after_an_attempt_stopped_before_its_first_checkpoint_restarts_it_aside(tmp_path):
    """A preemptible job resubmitted with `latest`, killed before it saved anything: it starts
    again from step 0 and the aborted attempt's files are moved aside, not mixed in."""
    config = tiny_config(tmp_path / "out", resume_from_checkpoint="latest")
    (tmp_path / "out" / "logs").mkdir(parents=True)
    config.save(str(tmp_path / "out" / "training_config.yaml"))
    fake_checkpoint(tmp_path / "out" / ".checkpoint-2.partial", config)
    assert run_folder.check_output_dir(config)  # move it aside
    assert run_folder.checkpoint_to_resume(config) == (None, [])


def test_latest_in_an_empty_folder_starts_a_new_run(tmp_path):
    assert run_folder.checkpoint_to_resume(tiny_config(tmp_path, resume_from_checkpoint="latest")) == (None, [])


@pytest.mark.parametrize("name, files, why", [
    ("my-checkpoint", STATE_FILES, "its name is not checkpoint-<step>"),
    ("checkpoint-5", ("model.safetensors", "random_states_0.pkl"), "it holds no optimizer.bin"),
    ("checkpoint-5", (), "it holds no model.safetensors"),
])
def test_a_folder_that_is_not_a_checkpoint_is_refused_in_one_sentence(tmp_path, name, files, why):
    folder = fake_checkpoint(tmp_path / name, tiny_config(tmp_path), files=files)
    with pytest.raises(InputError) as refused:
        run_folder.checkpoint_to_resume(tiny_config(tmp_path / "out", resume_from_checkpoint=str(folder)))
    assert str(refused.value).startswith(f"--resume_from_checkpoint {folder} cannot be resumed: {why}; ")


def test_a_checkpoint_of_another_run_is_recognised_outside_its_folder(tmp_path):
    folder = fake_checkpoint(tmp_path / "elsewhere" / "checkpoint-5", tiny_config(tmp_path, ddpm_num_steps=4000))
    config = tiny_config(tmp_path / "out", resume_from_checkpoint=str(folder))
    with pytest.raises(InputError, match=r"cannot be resumed: it was trained with ddpm_num_steps 4000 \(this run: 1000\)"):
        run_folder.checkpoint_to_resume(config)
    fake_checkpoint(tmp_path / "ours" / "checkpoint-5", tiny_config(tmp_path))
    config.resume_from_checkpoint = str(tmp_path / "ours" / "checkpoint-5")
    assert run_folder.checkpoint_to_resume(config) == (tmp_path / "ours" / "checkpoint-5", [])


def test_a_checkpoint_named_without_its_folder_is_looked_for_in_the_output_dir(tmp_path, monkeypatch):
    """`--resume_from_checkpoint checkpoint-4`, as diffusers' example scripts take it, from another directory."""
    output_dir = fake_run(tmp_path / "out", tiny_config(tmp_path / "out"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = tiny_config(output_dir, resume_from_checkpoint="checkpoint-4")
    assert run_folder.checkpoint_to_resume(config) == (output_dir / "checkpoint-4", [])
    config.resume_from_checkpoint = "checkpoint-6"
    with pytest.raises(InputError, match="--resume_from_checkpoint checkpoint-6: no such checkpoint folder"):
        run_folder.checkpoint_to_resume(config)


# ---------------------------------------------------------------- no mixing by path


def test_a_checkpoint_of_another_run_given_by_path_is_refused_into_a_folder_holding_a_run(tmp_path):
    """The folder holds checkpoints of one run; a checkpoint of another run with the same settings is given."""
    mixed = fake_run(tmp_path / "run_mix2", tiny_config(tmp_path / "run_mix2"), run_id="first-run")
    other = fake_run(tmp_path / "run_b", tiny_config(tmp_path / "run_b"), run_id="second-run") / "checkpoint-2"
    before = snapshot(mixed)
    config = tiny_config(mixed, resume_from_checkpoint=str(other))
    with pytest.raises(InputError) as refused:
        run_folder.checkpoint_to_resume(config)
    assert str(refused.value) == (
        f"--resume_from_checkpoint {other} cannot be resumed into {mixed}: it belongs to another run than the one "
        f"in {mixed}; resume it into its own run folder ({other.parent}), or into a new, empty --output_dir to "
        f"continue a copy of that run there")
    assert snapshot(mixed) == before


def test_a_checkpoint_resumes_by_path_into_its_own_folder_or_an_empty_one(tmp_path):
    run_b = fake_run(tmp_path / "run_b", tiny_config(tmp_path / "run_b"), run_id="second-run")
    own = tiny_config(run_b, resume_from_checkpoint=str(run_b / "checkpoint-2"))
    assert run_folder.checkpoint_to_resume(own) == (run_b / "checkpoint-2", [])
    (tmp_path / "copy").mkdir()
    elsewhere = tiny_config(tmp_path / "copy", resume_from_checkpoint=str(run_b / "checkpoint-2"))
    assert run_folder.checkpoint_to_resume(elsewhere) == (run_b / "checkpoint-2", [])
    fake_checkpoint(tmp_path / "copy" / "checkpoint-9", tiny_config(tmp_path), run_id="second-run")
    (tmp_path / "copy" / "run_identity.json").write_text(json.dumps({"run_id": "second-run"}))
    assert run_folder.checkpoint_to_resume(elsewhere) == (run_b / "checkpoint-2", [])  # a copy of the same run


def test_latest_passes_over_a_checkpoint_of_another_run_in_the_folder(tmp_path):
    output_dir = fake_run(tmp_path / "out", tiny_config(tmp_path / "out"), run_id="ours")
    fake_checkpoint(output_dir / "checkpoint-6", tiny_config(tmp_path), run_id="theirs")
    path, passed_over = run_folder.checkpoint_to_resume(tiny_config(output_dir, resume_from_checkpoint="latest"))
    assert path == output_dir / "checkpoint-4"
    assert passed_over == [f"checkpoint-6 (it belongs to another run than the one in {output_dir}; resume it "
                           f"into its own run folder ({output_dir}), or into a new, empty --output_dir to continue "
                           "a copy of that run there)"]


def test_runs_written_before_identities_are_judged_by_where_the_checkpoint_lies(tmp_path):
    old = fake_run(tmp_path / "old", tiny_config(tmp_path / "old"))  # no run_identity.json anywhere
    assert run_folder.checkpoint_to_resume(tiny_config(old, resume_from_checkpoint=str(old / "checkpoint-2")))[0]
    other = fake_run(tmp_path / "other", tiny_config(tmp_path / "other"))
    with pytest.raises(InputError, match="belongs to another run"):
        run_folder.checkpoint_to_resume(tiny_config(other, resume_from_checkpoint=str(old / "checkpoint-2")))


# ---------------------------------------------------------------- the lr schedule on resume


def resumed_config(output_dir: Path, argv: list[str]) -> TrainingConfig:
    """A config as the command line gives it, resolved as training resolves it."""
    config = parse_training_config(["--model_preset", "tiny16", "--output_dir", str(output_dir),
                                    "--resume_from_checkpoint", "latest", *argv])
    config.resolution = 16
    return config


def test_a_resumed_run_keeps_its_saved_lr_schedule_unless_the_command_gives_one(tmp_path):
    saved = tiny_config(tmp_path / "out", lr_warmup_steps=10, learning_rate=1e-3, lr_scheduler="cosine",
                        max_train_steps=200)
    fake_run(tmp_path / "out", saved)
    checkpoint = tmp_path / "out" / "checkpoint-4"

    silent = resumed_config(tmp_path / "out", [])  # nothing given: every default differs from the run's
    line = resuming.resolve_lr_schedule(checkpoint, silent)
    assert (silent.lr_scheduler, silent.lr_warmup_steps, silent.learning_rate, silent.max_train_steps) == (
        "cosine", 10, 1e-3, 200)
    assert line == ("the run resumed from checkpoint-4 keeps its saved lr_scheduler cosine (this command's default: "
                    "constant_with_warmup), lr_warmup_steps 10 (this command's default: 500), learning_rate 0.001 "
                    "(this command's default: 0.0003), the run's length, 200 steps (this command's default: 1 "
                    "epoch(s)); give an option to change it")

    given = resumed_config(tmp_path / "out", ["--lr_warmup_steps", "100", "--max_train_steps", "400"])
    line = resuming.resolve_lr_schedule(checkpoint, given)
    assert (given.lr_scheduler, given.lr_warmup_steps, given.learning_rate, given.max_train_steps) == (
        "cosine", 100, 1e-3, 400)
    assert line.endswith("; it changes its lr schedule as given: lr_warmup_steps 100 (the run's: 10), a length of "
                         "400 steps (the run's: 200 steps), over which the cosine schedule decays; the learning rate "
                         "follows the new schedule from this step on")

    same = resumed_config(tmp_path / "out", ["--config", str(checkpoint / "training_config.yaml")])
    assert resuming.resolve_lr_schedule(checkpoint, same) is None

    (tmp_path / "options.yaml").write_text("lr_warmup_steps: 20\n")  # a --config file's values are given too
    from_file = resumed_config(tmp_path / "out", ["--config", str(tmp_path / "options.yaml")])
    line = resuming.resolve_lr_schedule(checkpoint, from_file)
    assert from_file.lr_warmup_steps == 20 and "changes its lr schedule as given: lr_warmup_steps 20" in line


def test_a_longer_constant_schedule_is_no_change_of_schedule(tmp_path):
    fake_run(tmp_path / "out", tiny_config(tmp_path / "out", lr_warmup_steps=10, max_train_steps=200))
    longer = resumed_config(tmp_path / "out", ["--lr_warmup_steps", "10", "--max_train_steps", "400"])
    assert resuming.resolve_lr_schedule(tmp_path / "out" / "checkpoint-4", longer) is None
    assert longer.max_train_steps == 400


def test_changes_to_the_batches_on_resume_are_named(tmp_path):
    saved = tiny_config(tmp_path / "out", seed=3, gradient_accumulation_steps=4)
    checkpoint = fake_checkpoint(tmp_path / "out" / "checkpoint-2", saved,
                                 files=(*STATE_FILES, "random_states_1.pkl"))  # two processes
    same = tiny_config(tmp_path / "out", seed=3, gradient_accumulation_steps=4, learning_rate=1e-5)
    assert resuming.data_order_changes(checkpoint, same, num_processes=2) == []
    other = tiny_config(tmp_path / "out", seed=4, gradient_accumulation_steps=2)
    assert resuming.data_order_changes(checkpoint, other, num_processes=1) == [
        "gradient_accumulation_steps 4 (this run: 2)", "seed 3 (this run: 4)", "2 processes (this run: 1)"]


def test_the_finished_step_is_the_summarys(tmp_path):
    assert run_folder.finished_step(tmp_path) is None  # no summary: not finished
    (tmp_path / "training_summary.json").write_text('{"optimizer_steps": 4')  # cut short
    assert run_folder.finished_step(tmp_path) is None
    fake_run(tmp_path / "out", tiny_config(tmp_path / "out"))
    assert run_folder.finished_step(tmp_path / "out") == 4


def test_a_failed_config_write_keeps_the_previous_config(tmp_path, monkeypatch):
    path = tmp_path / "training_config.yaml"
    tiny_config(tmp_path, learning_rate=1e-4).save(str(path))
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("yaml.safe_dump", disk_full)
    with pytest.raises(OSError):
        tiny_config(tmp_path, learning_rate=1e-5).save(str(path))
    assert path.read_bytes() == before


# ---------------------------------------------------------------- disk space and summary


def test_short_disk_space_is_refused_before_any_work(tmp_path, monkeypatch):
    # A million fp32 parameters: a checkpoint holds weights, Adam's two moments and the EMA (16 MB); the
    # pipeline folder the EMA and raw weights (8 MB); two checkpoints and the pipeline: 40 MB.
    free = {"bytes": 40_000_000}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    run_folder.check_disk_space(tmp_path / "out" / "new", 10**6, use_ema=True)
    free["bytes"] = 39_900_000
    with pytest.raises(InputError) as refused:
        run_folder.check_disk_space(tmp_path / "out" / "new", 10**6, use_ema=True)
    assert str(refused.value) == (
        f"the disk of {tmp_path / 'out' / 'new'} has 39.9 MB free but this run needs at least 40.0 MB (two "
        f"checkpoints of 16.0 MB and the pipeline folder of 8.0 MB): free some space or choose another --output_dir")
    assert not (tmp_path / "out").exists()
    free["bytes"] = 27_999_999  # without EMA: 12 MB checkpoints, a 4 MB pipeline folder
    with pytest.raises(InputError):
        run_folder.check_disk_space(tmp_path, 10**6, use_ema=False)
    free["bytes"] = 28_000_000
    run_folder.check_disk_space(tmp_path, 10**6, use_ema=False)


def test_a_run_refused_for_disk_space_removes_the_folders_its_lock_made(tmp_path, monkeypatch, image_folder, capsys):
    """The lock makes --output_dir (and its missing parents) before the checks that read the folder; a refusal
    removes them again, so the refused run leaves nothing behind."""
    from lsun_ddpm import cli

    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        cli.train_main(["--model_preset", "tiny16", "--train_data_dir", str(image_folder), "--logger", "none",
                       "--output_dir", str(tmp_path / "runs" / "new")])
    assert exit_info.value.code == 2
    assert "free but this run needs at least" in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before


def test_the_summary_is_strict_json_with_null_for_numbers_never_measured(tmp_path):
    run_folder.write_summary(tmp_path, {"final_loss": float("nan"), "ema_decay": float("inf"),
                                        "per_process": [float("-inf"), 1.5], "optimizer_steps": 4})
    assert strict_json((tmp_path / "training_summary.json").read_text()) == {
        "final_loss": None, "ema_decay": None, "per_process": [None, 1.5], "optimizer_steps": 4}


# ---------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def finished_run(image_folder, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("finished")
    output_dir = tmp_path / "out"
    run_training(tmp_path, output_dir, ["--train_data_dir", str(image_folder), *ARGS])
    return output_dir


ARGS = ["--gradient_accumulation_steps", "1", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--save_images_steps", "4", "--save_model_steps", "4", "--logger", "tensorboard"]


def train(tmp_path: Path, output_dir: Path, image_folder: Path, *extra: str):
    return run_script_directly(tmp_path, *TINY_RUN, "--train_data_dir", str(image_folder), "--output_dir",
                               str(output_dir), *ARGS, *extra)


@pytest.mark.slow
def test_real_runs_refuse_to_mix_and_a_finished_run_resumed_changes_nothing(finished_run, tmp_path, image_folder):
    before = snapshot(finished_run)
    assert strict_json((finished_run / "training_summary.json").read_text())["optimizer_steps"] == 4
    assert {"checkpoint-2/training_config.yaml", "checkpoint-4/training_config.yaml"} <= set(before)

    again = train(tmp_path, finished_run, image_folder)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert f"error: {finished_run} already holds a training run" in again.stderr

    other_preset = train(tmp_path, finished_run, image_folder, "--model_preset", "small32",
                         "--resume_from_checkpoint", "latest")
    assert other_preset.returncode != 0 and "Traceback" not in other_preset.stderr
    assert (f"error: cannot resume the run in {finished_run}: it was trained with model_preset tiny16 "
            f"(this run: small32), resolution 16 (this run: 32);") in other_preset.stderr

    resumed = train(tmp_path, finished_run, image_folder, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert snapshot(finished_run) == before  # summary, config and logs byte-identical


@pytest.mark.slow
def test_overwrite_output_dir_moves_the_old_run_aside_logs_included(finished_run, tmp_path, image_folder):
    output_dir = tmp_path / "out"
    shutil.copytree(finished_run, output_dir)
    old_run = snapshot(output_dir)
    result = train(tmp_path, output_dir, image_folder, "--overwrite_output_dir")
    assert result.returncode == 0, result.stderr[-3000:]
    [aside] = tmp_path.glob("out.replaced-*")
    assert f"moved the previous run in {output_dir} to {aside}" in result.stderr
    assert snapshot(aside) == old_run
    new_run = snapshot(output_dir)
    logs = [name for name in new_run if name.startswith("logs/")]
    assert logs and not set(logs) & set(old_run)  # TensorBoard holds this run only
    assert read_summary(output_dir)["optimizer_steps"] == 4


def broken_images(folder: Path, count: int = 100) -> Path:
    folder.mkdir()
    for index in range(count):
        (folder / f"{index:03d}.png").write_bytes(b"not an image at all")
    return folder


def aborted_attempt(output_dir: Path) -> Path:
    """What a run stopped before its first checkpoint leaves: its config, identity and logs."""
    output_dir.mkdir()
    tiny_config(output_dir).save(str(output_dir / "training_config.yaml"))
    (output_dir / "run_identity.json").write_text(json.dumps({"run_id": "aborted"}))
    (output_dir / "logs" / "train_unconditional").mkdir(parents=True)
    (output_dir / "logs" / "train_unconditional" / "events.out.tfevents.1").write_bytes(b"events")
    return output_dir


# (how the folder is set up, the extra options, words of the one-line error)
REFUSALS = {
    "unreadable data, new folder": ("none", ["--broken"], "100 unreadable images in a row"),
    "unreadable data, resuming a finished run": ("finished", ["--broken", "--resume_from_checkpoint", "latest",
                                                               "--max_train_steps", "6"],
                                                 "100 unreadable images in a row"),
    "unreadable data, restarting an aborted attempt": ("aborted", ["--broken", "--resume_from_checkpoint", "latest"],
                                                       "100 unreadable images in a row"),
    "unreadable data, overwriting": ("finished", ["--broken", "--overwrite_output_dir"],
                                     "100 unreadable images in a row"),
    "missing data": ("none", ["--train_data_dir", "nowhere"], "nowhere"),
    "a folder holding a run": ("finished", [], "already holds a training run"),
    "another run's settings": ("finished", ["--resume_from_checkpoint", "latest", "--model_preset", "small32"],
                               "cannot resume the run"),
    "another run's checkpoint": ("finished", ["--resume_from_checkpoint", "OTHER"], "belongs to another run"),
    # bad data met in the middle of the data, before the job's first checkpoint: what it wrote is undone
    "unreadable data at step 2 of a new run": ("none", ["--unreadable_data_at_step", "2"],
                                               "100 unreadable images in a row"),
    "unreadable data at step 5 of a resumed run": ("finished", ["--unreadable_data_at_step", "5",
                                                                "--resume_from_checkpoint", "latest",
                                                                "--max_train_steps", "6"],
                                                   "100 unreadable images in a row"),
}


def train_probed(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    """The training script as one process, with tests/probed_training.py's probes when `args` holds one."""
    probes = args[:2] if args[:1] == ["--unreadable_data_at_step"] else []
    return train_in_process(tmp_path, *args[len(probes):], probes=probes)


@pytest.mark.slow
@pytest.mark.parametrize("setup, extra, words", REFUSALS.values(), ids=REFUSALS.keys())
def test_a_refused_run_writes_nothing(finished_run, tmp_path, image_folder, setup, extra, words):
    """Exit status 2 means nothing was written: every refusal of training leaves every file as it was."""
    output_dir = tmp_path / "out"
    if setup == "finished":
        shutil.copytree(finished_run, output_dir)
    elif setup == "aborted":
        aborted_attempt(output_dir)
    other = fake_run(tmp_path / "other", tiny_config(tmp_path / "other"), run_id="another") / "checkpoint-2"
    data = str(broken_images(tmp_path / "broken")) if "--broken" in extra else str(image_folder)
    extra = [{"OTHER": str(other), "nowhere": str(tmp_path / "nowhere")}.get(arg, arg) for arg in extra
             if arg != "--broken"]
    before = every_path(tmp_path)

    probes = extra[:2] if extra[:1] == ["--unreadable_data_at_step"] else []
    result = train_probed(tmp_path, [*probes, *TINY_RUN, "--train_data_dir", data, "--output_dir", str(output_dir),
                                     *ARGS, *extra[len(probes):]])

    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("train_unconditional.py: error: ")
    assert words in result.stderr.strip().splitlines()[-1]
    assert every_path(tmp_path) == before


def every_path(root: Path) -> dict[str, tuple[str, bytes | None]]:
    """Every file and folder under `root` (its 🤗 cache aside): kind and bytes."""
    return {str(path.relative_to(root)): ("folder", None) if path.is_dir() else ("file", path.read_bytes())
            for path in sorted(root.rglob("*")) if path.relative_to(root).parts[0] != "hf_home"}


@pytest.mark.slow
def test_bad_data_after_the_jobs_first_checkpoint_keeps_what_it_trained(tmp_path, image_folder):
    """From its first checkpoint on a job's files are progress, which a later input error does not undo."""
    output_dir = tmp_path / "out"
    result = train_probed(tmp_path, ["--unreadable_data_at_step", "3", *TINY_RUN, "--train_data_dir",
                                     str(image_folder), "--output_dir", str(output_dir), *ARGS])
    assert result.returncode == 2 and "100 unreadable images in a row" in result.stderr
    assert [path.name for path in output_dir.glob("checkpoint-*")] == ["checkpoint-2"]
    assert (output_dir / "training_config.yaml").is_file() and (output_dir / "run_identity.json").is_file()


@pytest.mark.slow
def test_a_resumed_run_keeps_its_schedule_and_its_summary_gives_whole_run_totals(tmp_path, image_folder):
    """Trained 3 steps with a 10-step warm-up, then resumed to 6 without the warm-up flag: steps 4-6 follow the
    10-step warm-up, not the default 500; the summary counts all 6 steps in two segments."""
    output_dir, lr = tmp_path / "out", 2e-3
    common = ["--model_preset", "tiny16", "--mixed_precision", "no", "--train_batch_size", "4", "--seed", "0",
              "--learning_rate", str(lr), "--gradient_accumulation_steps", "2", "--eval_batch_size", "2",
              "--ddpm_num_inference_steps", "2", "--train_data_dir", str(image_folder), "--output_dir", str(output_dir)]
    first = run_script_directly(tmp_path, *common, "--lr_warmup_steps", "10", "--max_train_steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = json.loads((output_dir / "run_identity.json").read_text())["run_id"]
    resumed = run_script_directly(tmp_path, *common, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert ("the run resumed from checkpoint-3 keeps its saved lr_warmup_steps 10 (this command's default: 500); "
            "give an option to change it") in resumed.stderr
    assert f"resumed from {output_dir / 'checkpoint-3'}" in resumed.stderr
    assert "from a fresh initialisation" not in resumed.stderr
    lrs = read_scalars(output_dir, "train/lr")
    assert [lrs[step] for step in range(1, 7)] == pytest.approx([lr * step / 10 for step in range(1, 7)])
    assert json.loads((output_dir / "run_identity.json").read_text())["run_id"] == run_id  # the same run

    summary = read_summary(output_dir)
    segments = summary["segments"]
    assert [(s["first_step"], s["last_step"]) for s in segments] == [(0, 3), (3, 6)]
    assert [s["micro_batches_per_process"] for s in segments] == [3 * 2, 3 * 2]
    assert summary["micro_batches_per_process"] == 6 * 2 and summary["images"] == 6 * 2 * 4
    assert summary["nonfinite_steps"] == 0
    assert summary["wall_time_seconds"] == pytest.approx(sum(s["wall_time_seconds"] for s in segments), abs=0.11)
    assert "the run trained 6 optimizer steps in 2 segment(s): 48 images" in resumed.stderr


def test_a_checkpoint_of_another_shape_without_a_config_copy_is_one_sentence(tmp_path):
    """An older run's checkpoint carries no config: the shapes themselves give it away when loading."""
    from accelerate import Accelerator

    from lsun_ddpm.train import resuming

    saving = Accelerator(cpu=True, mixed_precision="no")
    small = torch.nn.Linear(2, 2)
    saving.prepare(small, torch.optim.AdamW(small.parameters()))
    saving.save_state(str(tmp_path / "checkpoint-3"))
    accelerator = Accelerator(cpu=True, mixed_precision="no")  # a new run, of another shape
    large = torch.nn.Linear(3, 3)
    accelerator.prepare(large, torch.optim.AdamW(large.parameters()))
    config = tiny_config(tmp_path / "out", resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    with pytest.raises(InputError) as refused:
        resuming.resume(accelerator, config, tmp_path / "checkpoint-3", ema=None)
    assert str(refused.value) == (f"--resume_from_checkpoint {tmp_path / 'checkpoint-3'}: its weights have other "
                                  f"shapes than this model's (tiny16); resume it with the model it was trained with")
