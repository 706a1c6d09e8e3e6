"""The run folder (`--output_dir`): what it holds, whose run it is, which checkpoint resumes it.

A run folder holds one run. A second run started in it would mix the two runs'
checkpoints, sample grids and TensorBoard logs, and `latest` would resume the
first run; so a folder holding a run is refused before any work unless the run
is resumed with its own settings or `--overwrite_output_dir` moves it aside.
Every checkpoint carries a copy of its run's `training_config.yaml` and of its
identity (`run_identity.json`, a random id made when the run starts), so a
checkpoint given by path is recognised even outside its folder: it resumes
into its own run's folder, or into an empty one (continuing a copy of the run
there), never into a folder holding another run.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import write_text
from ..layout import (CHECKPOINT_PATTERN, CONFIG_FILE, GRID_FILE, IDENTITY_FILE, LOCK_FILE, MODEL_INDEX, SAMPLES_FOLDER,
                      SUMMARY_FILE, is_partial_checkpoint, list_checkpoints)
from .options import TrainingConfig
from .parsing import read_config_file

# Entries only a training run writes: finding one of them means the folder holds a run.
RUN_MARKERS = (CONFIG_FILE, IDENTITY_FILE, SUMMARY_FILE, GRID_FILE, SAMPLES_FOLDER, MODEL_INDEX)
# The settings that make a run what it is: a checkpoint of another shape, resolution or
# schedule cannot be resumed, and its samples and logs mean something else. A streamed
# run's checkpoint also holds the stream's position, which map-style data cannot take.
RUN_DEFINING_FIELDS = ("model_preset", "model_config_name_or_path", "resolution", "ddpm_num_steps",
                       "ddpm_beta_schedule", "prediction_type", "use_ema", "streaming")
# What `accelerator.save_state` writes for a model and its optimizer on process 0.
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
STATE_FILES = ("optimizer.bin", "random_states_0.pkl")


def run_entries(output_dir: Path, logging_dir: str) -> list[str]:
    """Names of the entries in `output_dir` that a training run wrote (empty: it holds no run)."""
    if not output_dir.is_dir():
        return []
    markers = set(RUN_MARKERS) | {Path(logging_dir).name}
    return sorted(entry.name for entry in output_dir.iterdir()
                  if entry.name in markers or CHECKPOINT_PATTERN.match(entry.name)
                  or is_partial_checkpoint(entry.name))


def read_run_config(folder: Path) -> dict[str, Any] | None:
    """The `training_config.yaml` in `folder` (a run folder or a checkpoint), or None."""
    path = folder / CONFIG_FILE
    return read_config_file(str(path)) if path.is_file() else None


def read_run_id(folder: Path) -> str | None:
    """The id in `folder`'s `run_identity.json` (a run folder or a checkpoint), or None (none, or unreadable)."""
    try:
        return json.loads((folder / IDENTITY_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_run_id(path: Path) -> str | None:
    """The id of the run a checkpoint belongs to: its own copy, else its run folder's (an older run)."""
    return read_run_id(path) or read_run_id(path.parent)


def write_run_identity(folder: Path, run_id: str | None = None) -> str:
    """Record `run_id` (a new random one if None) as the identity of the run in `folder`; return it."""
    run_id = run_id or uuid.uuid4().hex
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_text(json.dumps({"run_id": run_id, "recorded": created}, indent=2) + "\n", folder / IDENTITY_FILE)
    return run_id


def run_differences(saved: dict[str, Any], config: TrainingConfig,
                    fields: tuple[str, ...] = RUN_DEFINING_FIELDS) -> list[str]:
    """The `fields` in which a saved run differs from `config`, as "name X (this run: Y)".

    `config.resolution` must be resolved (training sets it from the model). A field
    missing from `saved` (an older run) is not compared.
    """
    current = config.to_dict()
    return [f"{name} {saved[name]} (this run: {current[name]})"
            for name in fields if name in saved and saved[name] != current[name]]


def check_output_dir(config: TrainingConfig) -> bool:
    """Refuse an `--output_dir` that holds another run; True when `--overwrite_output_dir` is to move it aside.

    Raises InputError when the folder holds a run and neither `--resume_from_checkpoint`
    nor `--overwrite_output_dir` is given, or when the run to resume was trained with
    other run-defining settings.
    """
    output_dir = Path(config.output_dir)
    if config.overwrite_output_dir and config.resume_from_checkpoint:
        raise InputError("--overwrite_output_dir starts a new run and --resume_from_checkpoint continues one: "
                         "give only one of them")
    entries = run_entries(output_dir, config.logging_dir)
    if not entries:
        return False
    if config.overwrite_output_dir:
        return True
    saved = read_run_config(output_dir)
    differences = run_differences(saved, config) if saved else []
    trained_with = f", trained with {', '.join(differences)}" if differences else ""
    if not config.resume_from_checkpoint:
        raise InputError(
            f"{output_dir} already holds a training run ({', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}"
            f"{trained_with}): continue it with --resume_from_checkpoint latest and its settings, or start a new "
            f"run with --overwrite_output_dir, which moves the old one aside")
    if differences:
        raise InputError(f"cannot resume the run in {output_dir}: it was trained with {', '.join(differences)}; "
                         f"resume it with its settings, or start a new run with --overwrite_output_dir, "
                         f"which moves the old one aside")
    return is_restart_before_first_checkpoint(config)


def is_restart_before_first_checkpoint(config: TrainingConfig) -> bool:
    """`latest` in a folder whose run stopped before its first complete checkpoint and exported nothing.

    That is a preemptible job's restart (jobs are resubmitted with the same
    `--resume_from_checkpoint latest`): there is no step to resume and nothing
    but the aborted attempt's logs and grids, which are moved aside rather than
    mixed with the new attempt's. A run that exported a pipeline or wrote its
    summary is never restarted from zero behind the user's back.
    """
    output_dir = Path(config.output_dir)
    return (config.resume_from_checkpoint == "latest" and bool(run_entries(output_dir, config.logging_dir))
            and latest_checkpoint(config)[0] is None and not _holds_results(output_dir))


def _holds_results(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in (SUMMARY_FILE, MODEL_INDEX))


def move_run_aside(output_dir: Path, keep: list[str | None] = ()) -> Path:
    """Move everything in `output_dir` into a new sibling `<name>.replaced-<UTC time>`; return the sibling.

    Entries holding a path of `keep` stay (training images inside the run
    folder, as the demo writes them), and so does the lock of the job doing it. Moving, not deleting: the old run is the
    user's work, and the flag may have been given by mistake.
    """
    output_dir = output_dir.resolve()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = output_dir.with_name(f"{output_dir.name}.replaced-{stamp}")
    suffix = 1
    while aside.exists():
        aside = output_dir.with_name(f"{output_dir.name}.replaced-{stamp}-{suffix}")
        suffix += 1
    aside.mkdir()
    kept = [Path(path).resolve() for path in keep if path]
    for entry in sorted(output_dir.iterdir()):
        if entry.name != LOCK_FILE and not any(entry == path or entry in path.parents for path in kept):
            shutil.move(str(entry), str(aside / entry.name))
    return aside


def checkpoint_problem(path: Path, config: TrainingConfig) -> str | None:
    """Why `path` is not a complete checkpoint of this run (a phrase), or None when it is.

    A checkpoint's run is read from its own copy of the config, else from the
    run folder it lies in.
    """
    if not CHECKPOINT_PATTERN.match(path.name):
        return "its name is not checkpoint-<step>"
    if not any((path / name).is_file() for name in WEIGHTS_FILES):
        return f"it holds no {WEIGHTS_FILES[0]}"
    missing = [name for name in STATE_FILES if not (path / name).is_file()]
    if missing:
        return f"it holds no {missing[0]}"
    saved = checkpoint_run_config(path)
    differences = run_differences(saved, config) if saved else []
    if differences:
        return f"it was trained with {', '.join(differences)}"
    return None


def foreign_checkpoint_problem(path: Path, config: TrainingConfig) -> str | None:
    """Why the checkpoint `path` may not resume into `--output_dir` (a phrase), or None.

    It may when the folder holds no run yet (the run goes on in a new folder),
    or when the folder's run is the checkpoint's: same identity, or, for runs
    written before identities were recorded, the checkpoint lies in the folder.
    """
    output_dir = Path(config.output_dir)
    if not run_entries(output_dir, config.logging_dir):
        return None
    own, folders = checkpoint_run_id(path), read_run_id(output_dir)
    same_run = own == folders if own is not None and folders is not None else _same_folder(path.parent, output_dir)
    if same_run:
        return None
    return (f"it belongs to another run than the one in {output_dir}; resume it into its own run folder "
            f"({path.parent}), or into a new, empty --output_dir to continue a copy of that run there")


def _same_folder(first: Path, second: Path) -> bool:
    try:
        return first.resolve() == second.resolve()
    except OSError:
        return False


def checkpoint_run_config(path: Path) -> dict[str, Any] | None:
    """The config of the run a checkpoint belongs to: its own copy, else its run folder's (an older run)."""
    return read_run_config(path) or read_run_config(path.parent)


def latest_checkpoint(config: TrainingConfig) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint of this run in `--output_dir`, and the newer ones passed over (with why)."""
    passed_over = []
    for path in reversed(list_checkpoints(config.output_dir)):
        problem = checkpoint_problem(path, config) or foreign_checkpoint_problem(path, config)
        if problem is None:
            return path, passed_over
        passed_over.append(f"{path.name} ({problem})")
    return None, passed_over


def checkpoint_to_resume(config: TrainingConfig) -> tuple[Path | None, list[str]]:
    """The checkpoint `--resume_from_checkpoint` names, checked, and the newer ones `latest` passed over.

    None when nothing is to be resumed: no flag, or `latest` in a folder that
    holds no run yet or one stopped before its first checkpoint (see
    `is_restart_before_first_checkpoint`). Raises InputError for anything else
    that cannot be resumed.
    """
    if not config.resume_from_checkpoint:
        return None, []
    flag = f"--resume_from_checkpoint {config.resume_from_checkpoint}"
    if config.resume_from_checkpoint == "latest":
        path, passed_over = latest_checkpoint(config)
        if path is None and _holds_results(Path(config.output_dir)):
            passed = f" ({'; '.join(passed_over)})" if passed_over else ""
            raise InputError(f"{flag}: {config.output_dir} holds a run but no complete checkpoint of it{passed}; "
                             f"start a new run with --overwrite_output_dir, which moves the old one aside")
        return path, passed_over
    path = Path(config.resume_from_checkpoint)
    if not path.is_dir() and not path.is_absolute():  # a name in --output_dir, as diffusers' scripts take it
        path = Path(config.output_dir) / path
    if not path.is_dir():
        raise InputError(f"{flag}: no such checkpoint folder")
    problem = checkpoint_problem(path, config)
    if problem is not None:
        raise InputError(f"{flag} cannot be resumed: {problem}; give a checkpoint-<step> folder written by "
                         f"a run with these settings, or `latest`")
    foreign = foreign_checkpoint_problem(path, config)
    if foreign is not None:
        raise InputError(f"{flag} cannot be resumed into {config.output_dir}: {foreign}")
    return path, []


def bytes_needed(num_parameters: int, use_ema: bool) -> tuple[int, int]:
    """(one checkpoint, the pipeline folder) in bytes, from the parameter count.

    All fp32 (mixed precision keeps fp32 master weights): a checkpoint holds the
    weights and Adam's two moments, plus the EMA; the pipeline folder the EMA
    weights in `unet/` and the raw ones in `unet_raw/`. Configs, RNG states and
    pickling add little, so this is a lower bound.
    """
    copies = 1 + int(use_ema)
    return 4 * num_parameters * (3 + int(use_ema)), 4 * num_parameters * copies


def check_disk_space(output_dir: str | os.PathLike, num_parameters: int, use_ema: bool) -> None:
    """Raise InputError when the disk of `output_dir` cannot hold two checkpoints and the pipeline folder.

    Two checkpoints, because a new one is written in full before the previous is
    removed. Short space is an error before any work, not a warning: the
    estimate is a lower bound, so a refused run would certainly fail, and it
    would fail at its first or second checkpoint, after hours of training whose
    only record the checkpoint was.
    """
    folder = Path(output_dir).resolve()
    while not folder.exists():  # the nearest folder that exists lies on the same disk
        folder = folder.parent
    checkpoint, pipeline = bytes_needed(num_parameters, use_ema)
    needed = 2 * checkpoint + pipeline
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise InputError(f"the disk of {output_dir} has {_size(free)} free but this run needs at least "
                         f"{_size(needed)} (two checkpoints of {_size(checkpoint)} and the pipeline folder of "
                         f"{_size(pipeline)}): free some space or choose another --output_dir")


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.1f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.1f} MB"


def finished_step(output_dir: str | os.PathLike) -> int | None:
    """The optimizer step whose results (samples, pipeline, summary) the run folder holds, or None.

    The summary is written last, so a run stopped after its last checkpoint has
    none, or one of an earlier, shorter run of the same folder.
    """
    try:
        return json.loads((Path(output_dir) / SUMMARY_FILE).read_text()).get("optimizer_steps")
    except (OSError, ValueError, AttributeError):
        return None


def write_summary(output_dir: str | os.PathLike, summary: dict[str, Any]) -> None:
    """Write `training_summary.json` as strict JSON: a number that is not finite (no step ran) becomes null."""
    text = json.dumps(finite_or_none(summary), indent=2, allow_nan=False)
    write_text(text + "\n", Path(output_dir) / SUMMARY_FILE)


def finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value
