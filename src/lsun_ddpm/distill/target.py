"""What one step of a student must do: land where its teacher's steps land (Salimans & Ho, Algorithm 2).

For z_t = α_t x + σ_t ε of a training image x, at a timestep t of the
student's grid, the teacher takes its deterministic DDIM steps t → … → t_end
(two for a halving). The x̃ with which one DDIM step of the student from z_t
lands on the teacher's z_t_end is the student's target. The student predicts
v, so it learns ṽ = (α_t z_t − x̃)/σ_t: the squared error in v is the error
in x̃ weighted by 1/σ_t² = 1 + SNR, the paper's "SNR+1" weighting, finite at
every t where x from ε would not be (parameterisation.py).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ..model.diffusion import per_sample_loss
from ..model.parameterisation import alpha_sigma, ddim_step, one_step_x0, to_v, to_x0
from ..model.step_grids import teacher_paths


class DistillationObjective:
    """The loop's objective for one stage: t drawn from the student's N-step grid, the loss ‖v̂ − ṽ‖²."""

    def __init__(self, scheduler: DDPMScheduler, teacher: UNet2DModel, teacher_prediction_type: str,
                 student_steps: int, span: int,
                 teacher_precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        """`span` teacher steps per student step: 2 halves the teacher's steps, 1 teaches the teacher's own
        step in another parameterisation. `teacher_precision` wraps the teacher's forward passes
        (`accelerator.autocast`); the sampler's arithmetic stays fp32 or wider."""
        self.scheduler = scheduler  # the training schedule: add_noise, ᾱ
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_prediction_type = teacher_prediction_type
        self.teacher_precision = teacher_precision
        num_train_timesteps = scheduler.config.num_train_timesteps
        self.paths = torch.tensor(teacher_paths(student_steps, num_train_timesteps, span))  # [N, span + 1]
        self.row_of_timestep = torch.full((num_train_timesteps,), -1, dtype=torch.long)
        self.row_of_timestep[self.paths[:, 0]] = torch.arange(student_steps)
        # ᾱ with 1 appended: the index X0 = -1 is x₀ itself, where the last step of every grid lands
        self.alphas_cumprod = torch.cat([scheduler.alphas_cumprod.double(), torch.ones(1, dtype=torch.float64)])
        clip = scheduler.config.get("clip_sample", True)
        self.clip_range = scheduler.config.get("clip_sample_range", 1.0) if clip else None

    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """t uniform over the student's grid: the only timesteps it is ever sampled at."""
        rows = torch.randint(0, len(self.paths), (batch_size,), device=device)
        return self.paths[:, 0].to(device)[rows]

    def teacher_step(self, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """One DDIM step of the teacher from z_t to z_s, as this project's DDIM sampler and ADM take it (and
        Salimans & Ho): x̂₀ clipped (`clip_sample`), ε̂ re-derived from it (diffusers' `use_clipped_model_output`)."""
        alpha_t, sigma_t = alpha_sigma(self.alphas_cumprod, t, z)
        alpha_s, sigma_s = alpha_sigma(self.alphas_cumprod, s, z)
        with self.teacher_precision():
            output = self.teacher(z, t).sample
        prediction = output[:, :z.shape[1]].to(z.dtype)  # a learned Σ's second half is not used: DDIM is deterministic
        x0 = to_x0(prediction, self.teacher_prediction_type, z, alpha_t, sigma_t)
        if self.clip_range is not None:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return ddim_step(x0, (z - alpha_t * x0) / sigma_t, alpha_s, sigma_s)

    @torch.no_grad()
    def target(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """ṽ for each z_t: the v with which one DDIM step from z_t lands where the teacher's steps land."""
        z_t = noisy.to(torch.promote_types(noisy.dtype, torch.float32))
        path = self.paths[self.row_of_timestep[timesteps.cpu()]].to(z_t.device)  # [B, span + 1]
        z = z_t
        for k in range(path.shape[1] - 1):
            z = self.teacher_step(z, path[:, k], path[:, k + 1])
        alpha_t, sigma_t = alpha_sigma(self.alphas_cumprod, path[:, 0], z)
        alpha_end, sigma_end = alpha_sigma(self.alphas_cumprod, path[:, -1], z)
        x_tilde = one_step_x0(z_t, z, alpha_t, sigma_t, alpha_end, sigma_end)
        return to_v(x_tilde, "sample", z_t, alpha_t, sigma_t)

    def losses(self, model_output: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per image, fp32: "loss" = ‖v̂ − ṽ‖² averaged over pixels (the image and its noise enter through z_t)."""
        return {"loss": per_sample_loss(model_output, self.target(noisy, timesteps))}
