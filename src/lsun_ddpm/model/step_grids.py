"""The timesteps a deterministic sampler of N steps visits, and the teacher steps each distilled step covers.

diffusers' "trailing" spacing starts N steps at t = T − 1 and spaces them by
T / N: t_i = round(T − i·T/N) − 1. Halving N keeps every other point, so the
grid of N steps is a subset of the grid of 2N: one step of a student that
samples in N steps spans exactly two steps of its 2N-step teacher
(Salimans & Ho, "Progressive Distillation", Algorithm 2). The last step of
each grid goes to x₀ itself (ᾱ = 1), where DDIM's `set_alpha_to_one` ends.
"""

from __future__ import annotations

X0 = -1  # "after the last step": where a sampler lands on x₀ (ᾱ = 1)


def trailing_grid(num_steps: int, num_train_timesteps: int) -> list[int]:
    """The N timesteps, from the noisiest down, that diffusers' trailing spacing visits."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"a sampler of {num_train_timesteps} timesteps takes 1 to {num_train_timesteps} steps, "
                         f"not {num_steps}")
    # round() halves to even, as numpy's does in diffusers
    return [round(num_train_timesteps - i * num_train_timesteps / num_steps) - 1 for i in range(num_steps)]


def teacher_paths(student_steps: int, num_train_timesteps: int, span: int = 2) -> list[tuple[int, ...]]:
    """For each step t → t_end of the N-step student (t_end = X0 after the last): the timesteps t → … → t_end
    of the `span` steps of its (span·N)-step teacher that it replaces. Span 2 is a halving (t, t′, t″);
    span 1 is the teacher's own step, which a student of another parameterisation learns first."""
    teacher = [*trailing_grid(span * student_steps, num_train_timesteps), X0]
    return [tuple(teacher[span * i: span * (i + 1) + 1]) for i in range(student_steps)]
