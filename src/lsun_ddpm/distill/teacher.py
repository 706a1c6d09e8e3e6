"""The model a distillation starts from: what it is, and whether this command can distill it.

A teacher is a pipeline folder or Hub repo that training, `convert-adm` or
`distill` wrote: a DDPM predicting ε (fixed or learned Σ; the learned half is
not used, DDIM being deterministic), or a student of this command, which is
distilled further. Each refusal is one sentence that says what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ..errors import InputError
from ..model import diffusion
from ..sample.loading import check_model_source, load_scheduler_config, load_unet, student_steps
from .stages import is_power_of_two

STUDENT_PREDICTION = "v_prediction"


@dataclass(frozen=True)
class Teacher:
    source: str  # a folder or a Hub repo id
    scheduler_config: dict
    student_steps: int | None  # a student of this command: its step count; a DDPM: None

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler_config.get("num_train_timesteps", 1000)

    def noise_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.scheduler_config)

    def load_unet(self) -> UNet2DModel:
        """Its sampled weights: the EMA's, or a run's only weights when it kept no EMA."""
        return load_unet(self.source)


def read_teacher(source: str) -> Teacher:
    """The teacher at `source`, read from its configs only (no weights); an InputError for what is no pipeline."""
    check_model_source(source)
    scheduler_config = load_scheduler_config(source)
    return Teacher(source, scheduler_config, student_steps(source))


def check_teacher(teacher: Teacher, student_steps: int, start_steps: int) -> None:
    """Refuse, in one sentence, a teacher or step counts that this command cannot distill."""
    name = f"TEACHER {teacher.source}"
    if teacher.student_steps is not None:
        if student_steps >= teacher.student_steps:
            raise InputError(f"{name} is a student that samples in {teacher.student_steps} steps: distill it to "
                             f"fewer (--student_steps {teacher.student_steps // 2} or less), not {student_steps}")
    elif teacher.prediction_type != "epsilon":
        raise InputError(f"{name} predicts {teacher.prediction_type!r}: distill takes a DDPM that predicts ε "
                         "(trained or converted by this project) or a student that distill wrote")
    T = teacher.num_train_timesteps
    schedule = diffusion.make_noise_scheduler(T, teacher.scheduler_config.get("beta_schedule", "linear"))
    if not torch.equal(teacher.noise_scheduler().alphas_cumprod, schedule.alphas_cumprod):
        raise InputError(f"{name}: its β schedule is not one training makes (β from {diffusion.BETA_START} to "
                         f"{diffusion.BETA_END}, linear or as --ddpm_beta_schedule names it)")
    if not is_power_of_two(student_steps) or T % student_steps:
        supported = [n for n in (1, 2, 4, 8, 16, 32) if T % n == 0]
        raise InputError(f"--student_steps {student_steps}: a student takes a power of two of steps that divides "
                         f"the teacher's T = {T} (so that a stock DDIMScheduler visits its grid exactly): "
                         f"{', '.join(map(str, supported))}")
    if not is_power_of_two(start_steps) or start_steps > T:
        raise InputError(f"--start_steps {start_steps}: the teacher's first step count is a power of two of at "
                         f"most its T = {T}")
    if teacher.student_steps is not None and start_steps != teacher.student_steps:
        raise InputError(f"--start_steps {start_steps}: {name} is a student of {teacher.student_steps} steps, "
                         "which is where its distillation starts")
    if student_steps >= start_steps:
        raise InputError(f"--student_steps {student_steps} must be fewer than --start_steps {start_steps}, the "
                         "teacher's step count that the first stage halves")


def student_of(teacher_unet: UNet2DModel) -> UNet2DModel:
    """The teacher's weights as a student's: a U-Net with a learned Σ keeps only its first half of outputs
    (the prediction; v then, which the student learns from there)."""
    channels = teacher_unet.config.in_channels
    if teacher_unet.config.out_channels == channels:
        return teacher_unet
    student = UNet2DModel.from_config({**teacher_unet.config, "out_channels": channels})
    state = teacher_unet.state_dict()
    for name in ("conv_out.weight", "conv_out.bias"):
        state[name] = state[name][:channels]
    student.load_state_dict(state)
    return student

