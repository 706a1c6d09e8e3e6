"""The run folder's layout: every file and folder name a run folder holds, defined once.

A run folder (`--output_dir`) is a stock `DDPMPipeline` folder (`model_index.json`,
`unet/`, `scheduler/`) with what training, evaluation and publishing add beside it.
Every reader and writer takes the names from here, so the layout can be read in one
place and changed in one place.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# The pipeline (diffusers' own names).
MODEL_INDEX = "model_index.json"
UNET = "unet"  # the sampled weights: the EMA, or the raw weights of a run trained without EMA
SCHEDULER = "scheduler"
UNET_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
# The scheduler config's variance_type of a U-Net that outputs [ε, v] (learned Σ): the one value in a folder's
# configs that its readers test, publishing included, which should not need torch to read a folder.
LEARNED_VARIANCE = "learned_range"
RAW_UNET = "unet_raw"  # the training (non-EMA) weights beside the EMA's
WEIGHT_FOLDERS = {"ema": UNET, "raw": RAW_UNET}

# What training writes.
CONFIG_FILE = "training_config.yaml"  # the resolved options, reusable with --config
IDENTITY_FILE = "run_identity.json"  # the run's id, made when it starts; copied into each checkpoint
SUMMARY_FILE = "training_summary.json"  # written last: a finished run
HISTORY_FILE = "training_history.json"  # in each checkpoint: the run's segments so far
LOCK_FILE = ".run.lock"  # held by the job training in the folder
GRID_FILE = "sample_grid.png"  # the latest grid
SAMPLES_FOLDER = "samples"  # every grid, step-<step>.png
LOGS_FOLDER = "logs"  # --logging_dir's default
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

# What the other commands write into a run folder.
EVALUATION_FILE = "evaluation.json"  # `lsun-ddpm evaluate`
NEIGHBOURS_FIGURE = "neighbours.png"  # `lsun-ddpm neighbours --run_dir`, the demo
NEIGHBOURS_RECORD = "neighbours.json"
NEIGHBOURS_TABLE = "neighbours.csv"
INTERPOLATION_FIGURE = "interpolation.png"  # the demo; `push` makes one when the run has none
RAW_VS_EMA_FIGURE = "raw_vs_ema.png"  # the demo's Fig. 1
DEMO_OVERVIEW = "demo_overview.png"
DISTILLATION_FILE = "distillation.json"  # a student `distill` wrote: its teacher, stages and step count
STAGE_FOLDER_GLOB = "stage-*"  # in a distillation's folder: the run folder of each stage
CONVERSION_FILE = "adm_conversion.json"  # a folder `convert-adm` wrote: its source and flags
CARD_FILE = "README.md"  # a model card (a converted folder has its own; `push` writes the others')
# What a converted folder's card loads in its usage code until the folder is pushed; `push` puts the repo id there.
CARD_MODEL_ID_PLACEHOLDER = "path/to/this/folder"


def grid_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the grid sampled at optimizer `step` is kept."""
    return Path(run_dir) / SAMPLES_FOLDER / f"step-{step:07d}.png"


def stage_folder_name(student_steps: int) -> str:
    """The run folder, in a distillation's folder, of the stage whose student samples in `student_steps`."""
    return f"stage-{student_steps}"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def partial_checkpoint_name(step: int) -> str:
    """The name a checkpoint is written under until it is complete (then renamed to `checkpoint_name`)."""
    return f".{checkpoint_name(step)}.partial"


def is_partial_checkpoint(name: str) -> bool:
    return name.startswith(".checkpoint-") and name.endswith(".partial")


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step of a `checkpoint-<step>` folder."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint-<step> folder")
    return int(match.group(1))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-<step>` folders in `run_dir`, oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def is_conversion(folder: str | os.PathLike) -> bool:
    """Whether `folder` was written by `lsun-ddpm convert-adm` (it holds its record)."""
    return (Path(folder) / CONVERSION_FILE).is_file()
