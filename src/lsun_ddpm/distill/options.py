"""`lsun-ddpm distill TEACHER --output_dir DIR [--student_steps N] ...`: its own options, and training's.

The data and optimisation flags are training's own (`lsun-ddpm train --help`),
with Salimans & Ho's defaults: Adam at 1e-4 decayed linearly to 0 in each
stage, no EMA. What the teacher fixes (the U-Net, its schedule, the
resolution) and what the stages fix (their lengths, resuming, the grids'
sampler) is refused as a flag rather than silently overridden.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..errors import InputError
from ..train.options import TrainingConfig
from ..train.parsing import parse_training_config

PROGRAM = "lsun-ddpm distill"
TRAINING_DEFAULTS = {"learning_rate": 1e-4, "lr_scheduler": "linear", "lr_warmup_steps": 0, "use_ema": False}
FIXED_BY_THE_TEACHER = ("model_preset", "model_config_name_or_path", "pretrained_model_name_or_path", "learn_sigma",
                        "vlb_weight", "resolution", "ddpm_num_steps", "ddpm_beta_schedule", "prediction_type")
FIXED_BY_THE_STAGES = ("max_train_steps", "num_epochs", "resume_from_checkpoint", "overwrite_output_dir",
                       "eval_scheduler", "ddpm_num_inference_steps")
PUBLISHING = ("push_to_hub", "hub_model_id", "hub_token", "hub_private_repo")


@dataclass(frozen=True)
class DistillationOptions:
    teacher: str
    student_steps: int
    start_steps: int | None  # None: the largest power of two the teacher's T allows (stages.default_start_steps)
    steps_per_stage: int
    bridge_steps: int | None  # None: a quarter of steps_per_stage (a teacher that predicts ε only)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROGRAM} TEACHER", description="Progressive distillation (Salimans & Ho 2022): a student that "
        "samples in N steps, each stage halving its teacher's DDIM steps.",
        epilog="Training's data and optimisation flags apply too (lsun-ddpm train --help), --output_dir required: "
               "--train_data_dir or --dataset_name, --train_batch_size, --gradient_accumulation_steps, "
               "--learning_rate (default 1e-4, decayed linearly in each stage), --use_ema (default off), "
               "--mixed_precision, --checkpointing_steps, --seed, --logger.")
    parser.add_argument("--student_steps", type=int, default=4,
                        help="the final student's sampling steps: a power of two dividing the teacher's T (1, 2, 4 "
                             "or 8 for T = 1000)")
    parser.add_argument("--start_steps", type=int,
                        help="the teacher's DDIM steps that the first stage halves (default: the largest power of "
                             "two up to its T and 1024; a student teacher: its own)")
    parser.add_argument("--steps_per_stage", type=int, default=50_000,
                        help="optimizer steps per halving; the last two halvings take twice as many")
    parser.add_argument("--bridge_steps", type=int,
                        help="optimizer steps in which the v-predicting student first learns an ε teacher's own "
                             "steps (default: a quarter of --steps_per_stage; 0 skips it)")
    return parser


def parse_distillation_options(argv: list[str]) -> tuple[DistillationOptions, TrainingConfig]:
    parser = make_parser()
    args, rest = parser.parse_known_args(argv)
    if not rest or rest[0].startswith("-"):
        raise InputError("give the TEACHER first: lsun-ddpm distill TEACHER --output_dir DIR [options]")
    teacher, rest = rest[0], rest[1:]
    for name, least in (("student_steps", 1), ("steps_per_stage", 1), ("start_steps", 1), ("bridge_steps", 0)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise InputError(f"--{name} must be at least {least}, got {value}")
    config = parse_training_config(rest, defaults=TRAINING_DEFAULTS, prog=PROGRAM)
    check_training_flags(config)
    return DistillationOptions(teacher, args.student_steps, args.start_steps, args.steps_per_stage,
                               args.bridge_steps), config


def check_training_flags(config: TrainingConfig) -> None:
    """Refuse the training flags that the teacher or the stages decide, and require --output_dir."""
    given = config.explicit_options or frozenset()
    for names, why in ((FIXED_BY_THE_TEACHER, "the student's U-Net, schedule and resolution are its teacher's"),
                       (FIXED_BY_THE_STAGES, "each stage's length, resume and sampler follow from the step counts "
                                             "(--steps_per_stage; a rerun resumes the unfinished stage)"),
                       (PUBLISHING, "publish the finished student with `lsun-ddpm push DIR`")):
        for name in names:
            if name in given:
                raise InputError(f"--{name} is not a distill flag: {why}")
    if "output_dir" not in given:
        raise InputError("--output_dir is required: the folder the student and its stages are written to")
