"""The paper's diffusion: linear β schedule, T = 1000, ε-prediction, simple MSE loss.

The forward process and the reverse step are diffusers' `DDPMScheduler`; this
module only fixes its configuration and defines the training objective.
tests/test_diffusion.py checks both against the paper's formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def make_noise_scheduler(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_schedule: str = "linear",
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
) -> DDPMScheduler:
    """The paper's `DDPMScheduler`: β linear from 1e-4 to 0.02 over T steps.

    `timestep_spacing="trailing"` makes respaced sampling (fewer than T steps)
    start at t = T-1, as ADM's respacing does; diffusers' default, "leading",
    never visits the noisiest step. With all T steps the two are identical.
    `clip_sample` (clip the x₀ estimate to [-1, 1]) is ADM's `clip_denoised`.
    """
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        variance_type=variance_type,
        clip_sample=True,
        timestep_spacing="trailing",
    )


def sample_timesteps(batch_size: int, num_train_timesteps: int, device: torch.device) -> torch.Tensor:
    """t ~ Uniform{0, …, T-1}, one per image."""
    return torch.randint(0, num_train_timesteps, (batch_size,), device=device, dtype=torch.long)


def training_target(
    scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the network regresses: ε (the paper), x₀, or v, by the scheduler's prediction type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return clean
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def per_sample_loss(model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's simple loss ‖ε − ε_θ(x_t, t)‖², averaged over pixels, one value per image.

    Computed in fp32 whatever precision the network ran in.
    """
    squared_error = F.mse_loss(model_output.float(), target.float(), reduction="none")
    return squared_error.mean(dim=tuple(range(1, squared_error.ndim)))


def timestep_quarter(timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Index 0–3 of the quarter of [0, T) that each t falls in (for per-quarter loss logs)."""
    return (timesteps * 4 // num_train_timesteps).clamp(max=3)
