"""`lsun-ddpm distill`: the stages, each a run of the training loop, and the student they leave.

DIR/stage-<N>/ is the run folder of the stage whose student samples in N
steps: checkpoints, logs, grids, and a stock `DDIMPipeline` of its student.
Its teacher is the stage before (the first stage's is TEACHER). A stage whose
summary says it finished is not run again; any other resumes from its latest
checkpoint, so a killed or stopped `distill` run again continues where it was.
When the last stage is done, DIR itself becomes the final student's pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler

from ..errors import InputError
from ..files import check_output_folder, remove_path, replace_path, write_text
from ..layout import (CONFIG_FILE, DISTILLATION_FILE, GRID_FILE, IDENTITY_FILE, LOGS_FOLDER, MODEL_INDEX,
                      RAW_UNET, SCHEDULER, STAGE_FOLDER_GLOB, SUMMARY_FILE, UNET)
from ..model.unet import load_model_config, weights_fingerprint
from ..sample.loading import model_file
from ..train import run_folder
from ..train.loop import train_in_claimed_folder
from ..train.options import TrainingConfig
from ..train.recipe import Recipe
from ..train.run_lock import RunFolderClaim
from ..train.setup import choose_precision, make_accelerator, set_up_logging
from .options import DistillationOptions
from .stages import Stage, default_start_steps, plan_stages
from .target import DistillationObjective
from .teacher import STUDENT_PREDICTION, Teacher, check_teacher, read_teacher, student_of

logger = get_logger(__name__)

# What DIR takes from the last stage's folder to be the final student's pipeline (and its last grid).
STUDENT_ENTRIES = (MODEL_INDEX, SCHEDULER, UNET, RAW_UNET, CONFIG_FILE, DISTILLATION_FILE, GRID_FILE)


def distill(options: DistillationOptions, config: TrainingConfig) -> Path:
    """Distill `options.teacher` into a student of `options.student_steps` steps in `config.output_dir`."""
    teacher = read_teacher(options.teacher)
    start_steps = options.start_steps or teacher.student_steps or default_start_steps(teacher.num_train_timesteps)
    check_teacher(teacher, options.student_steps, start_steps)
    check_output_folder(config.output_dir, "--output_dir")
    bridge_steps = options.steps_per_stage // 4 if options.bridge_steps is None else options.bridge_steps
    if teacher.prediction_type == STUDENT_PREDICTION:
        bridge_steps = 0  # a student teacher already predicts v
    stages = plan_stages(start_steps, options.student_steps, options.steps_per_stage, bridge_steps)
    choose_precision(config)
    accelerator = make_accelerator(config)
    set_up_logging(accelerator)
    output_dir = Path(config.output_dir)
    with RunFolderClaim(accelerator, output_dir):
        check_distillation_folder(output_dir)
        record = teacher_record(teacher)
        for stage in stages:
            stage_dir = output_dir / stage.name
            if run_folder.finished_step(stage_dir) != stage.optimizer_steps:
                run_stage(stage_training_config(config, stage, teacher), stage, teacher)
            else:
                logger.info("%s: finished earlier", stage_dir, main_process_only=True)
            record = stage_record(record, stage, stage_dir)
            if accelerator.is_main_process:
                write_text(json.dumps(record, indent=2) + "\n", stage_dir / DISTILLATION_FILE)
            accelerator.wait_for_everyone()
            teacher = read_teacher(str(stage_dir))
        if accelerator.is_main_process:
            make_folder_the_student(stage_dir, output_dir)
            logger.info("the student of %d steps is %s: DDIMPipeline.from_pretrained(%r)(num_inference_steps=%d)",
                        options.student_steps, output_dir, str(output_dir), options.student_steps)
        accelerator.end_training()
    return output_dir


def check_distillation_folder(output_dir: Path) -> None:
    """Refuse a folder that holds a training run or a pipeline that no distillation wrote."""
    holds_run = run_folder.run_entries(output_dir, LOGS_FOLDER)
    if holds_run and not (output_dir / DISTILLATION_FILE).is_file() and not list(output_dir.glob(STAGE_FOLDER_GLOB)):
        raise InputError(f"--output_dir {output_dir} holds {holds_run[0]} of another run or pipeline: give a new "
                         "folder, or the folder of the distillation to resume")


def stage_training_config(config: TrainingConfig, stage: Stage, teacher: Teacher) -> TrainingConfig:
    """The training options of one stage: the distill command's, with what the stage and its teacher fix."""
    scheduler = teacher.scheduler_config
    stage_config = dataclasses.replace(
        config, output_dir=str(Path(config.output_dir) / stage.name), max_train_steps=stage.optimizer_steps,
        num_epochs=None, resume_from_checkpoint="latest", pretrained_model_name_or_path=teacher.source,
        model_config_name_or_path=None, learn_sigma=False, prediction_type=STUDENT_PREDICTION,
        ddpm_num_steps=teacher.num_train_timesteps, ddpm_beta_schedule=scheduler.get("beta_schedule", "linear"),
        resolution=load_model_config(teacher.source)["sample_size"], eval_scheduler="ddim",
        ddpm_num_inference_steps=stage.student_steps)
    stage_config.explicit_options = config.explicit_options
    return stage_config


def run_stage(config: TrainingConfig, stage: Stage, teacher: Teacher) -> None:
    """One stage: the training loop in the stage's folder, with the distillation objective.

    A new `Accelerator` per stage starts with no prepared objects, trackers or
    registered state of the stage before; they share the process group, which
    only the end of the whole distillation ends (`accelerator.end_training`).
    """
    accelerator = make_accelerator(config)
    with RunFolderClaim(accelerator, config.output_dir, restored_files=(CONFIG_FILE, IDENTITY_FILE)):
        train_in_claimed_folder(accelerator, config, stage_recipe(accelerator, config, stage, teacher))
        for tracker in accelerator.trackers:  # the stage's logs, flushed and closed
            tracker.finish()


def stage_recipe(accelerator: Accelerator, config: TrainingConfig, stage: Stage, teacher: Teacher) -> Recipe:
    """The student starts from the teacher's weights, learns v toward the teacher's steps, and is exported
    as a `DDIMPipeline` whose scheduler visits its grid."""

    def make_objective(noise_scheduler: DDPMScheduler) -> DistillationObjective:
        teacher_unet = teacher.load_unet().to(accelerator.device)
        if config.channels_last:
            teacher_unet = teacher_unet.to(memory_format=torch.channels_last)
        return DistillationObjective(noise_scheduler, teacher_unet, teacher.prediction_type, stage.student_steps,
                                     stage.span, accelerator.autocast)

    what = "its own steps, as v" if stage.span == 1 else f"{stage.span} steps in one"
    return Recipe(
        make_model=lambda: student_of(teacher.load_unet()),
        make_objective=make_objective,
        description=f"distilling {teacher.source} ({stage.teacher_steps} DDIM steps) into a student of "
                    f"{stage.student_steps} steps: {what}, loss ‖v − ṽ‖²",
        sampling_scheduler=student_scheduler,
        pipeline_class=DDIMPipeline,
    )


def student_scheduler(noise_scheduler: DDPMScheduler) -> DDIMScheduler:
    """Stock DDIM over the training schedule: v-prediction; trailing spacing, so that N steps visit the
    student's grid (step_grids.trailing_grid); the last step lands on x₀ (`set_alpha_to_one`)."""
    return DDIMScheduler.from_config(noise_scheduler.config, prediction_type=STUDENT_PREDICTION,
                                     timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0)


def teacher_record(teacher: Teacher) -> dict:
    """What a student says of the model it was distilled from; a student teacher passes its own on."""
    if teacher.student_steps is not None:
        earlier = read_student_record(teacher.source)
        return {key: earlier[key] for key in ("teacher", "teacher_weights_sha256", "stages")}
    unet = teacher.load_unet()
    return {"teacher": teacher.source, "teacher_weights_sha256": weights_fingerprint(unet.parameters()),
            "stages": []}


def read_student_record(source: str) -> dict:
    return json.loads(model_file(source, DISTILLATION_FILE).read_text())


def stage_record(record: dict, stage: Stage, stage_dir: Path) -> dict:
    """`record` with `stage` added: its steps and what training it cost (the stage's summary)."""
    summary = json.loads((stage_dir / SUMMARY_FILE).read_text())
    stages = [earlier for earlier in record["stages"] if earlier["name"] != stage.name]
    stages.append({"name": stage.name, "teacher_steps": stage.teacher_steps, "student_steps": stage.student_steps,
                   **{key: summary.get(key) for key in ("optimizer_steps", "images", "effective_batch_size",
                                                        "wall_time_seconds", "hardware")}})
    return {**record, "student_steps": stage.student_steps, "prediction_type": STUDENT_PREDICTION,
            "stages": stages}


def make_folder_the_student(stage_dir: Path, output_dir: Path) -> None:
    """Copy the last stage's pipeline (and what says what it is) to the top of DIR, each entry replaced whole."""
    for name in STUDENT_ENTRIES:
        source = stage_dir / name
        if not source.exists():
            continue
        staging = output_dir / f".{name}.student"
        remove_path(staging)  # left by a copy that was killed
        if source.is_dir():
            shutil.copytree(source, staging, dirs_exist_ok=False)
        else:
            shutil.copy2(source, staging)
        replace_path(staging, output_dir / name)
