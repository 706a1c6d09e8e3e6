"""The stages of a distillation: from the teacher's DDIM steps, halving down to the student's.

A teacher that predicts ε is first copied into a student that predicts v at
the teacher's own step count (span 1, the "bridge"): the halvings then start
from a student that already samples like its teacher. Each halving trains a
student of N steps to match its teacher's 2N (span 2); the last two halvings,
the hardest, get twice the optimizer steps, as in Salimans & Ho.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layout import stage_folder_name

MAX_START_STEPS = 1024  # the paper's first teacher samples in 1024 steps (T = 1024 there)


@dataclass(frozen=True)
class Stage:
    teacher_steps: int  # the teacher's DDIM steps over the whole trajectory
    student_steps: int
    optimizer_steps: int

    @property
    def span(self) -> int:
        """Teacher steps per student step: 2 for a halving, 1 for the bridge from ε to v."""
        return self.teacher_steps // self.student_steps

    @property
    def name(self) -> str:
        """The stage's run folder inside the distillation's: `stage-<student steps>`."""
        return stage_folder_name(self.student_steps)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def default_start_steps(num_train_timesteps: int) -> int:
    """The largest power of two that is at most T (and at most 1024): 512 for the paper's T = 1000."""
    return min(MAX_START_STEPS, 1 << (num_train_timesteps.bit_length() - 1))


def plan_stages(start_steps: int, student_steps: int, steps_per_stage: int, bridge_steps: int) -> list[Stage]:
    """The stages from a teacher of `start_steps` to a student of `student_steps` (powers of two, the
    student's fewer), led by a bridge stage of `bridge_steps` optimizer steps unless it is 0."""
    stages = [Stage(start_steps, start_steps, bridge_steps)] if bridge_steps else []
    steps = start_steps // 2
    while steps >= student_steps:
        last_two = steps <= 2 * student_steps
        stages.append(Stage(2 * steps, steps, steps_per_stage * (2 if last_two else 1)))
        steps //= 2
    return stages
