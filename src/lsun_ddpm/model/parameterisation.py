"""What a U-Net predicts (ε, x₀ or v), the conversions between them, and the deterministic DDIM step.

With z_t = α_t x₀ + σ_t ε, where α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t) (α² + σ² = 1),
Salimans & Ho ("Progressive Distillation for Fast Sampling of Diffusion
Models", 2022) define v = α_t ε − σ_t x₀. Any one prediction, with z_t,
gives the other two:

    x₀ = α z − σ v = (z − σ ε) / α          ε = σ z + α v = (z − α x₀) / σ
    v = (ε − σ z) / α = (α z − x₀) / σ

x₀ from ε divides by α, which falls to ~6e-3 at the last step of the
paper's schedule: ε's errors are amplified ~160 times there. That is why
a few-step student predicts v, from which x₀ = α z − σ v is well behaved
at every t. tests/model/test_parameterisation.py checks the closed forms.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")  # diffusers' names for ε, x₀ and v


def alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t) for each image's t, shaped to broadcast against `like` (batch first)."""
    alpha_bar = alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device)]
    alpha_bar = alpha_bar.reshape(-1, *([1] * (like.ndim - 1)))
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def to_x0(prediction: torch.Tensor, prediction_type: str, z: torch.Tensor, alpha: torch.Tensor,
          sigma: torch.Tensor) -> torch.Tensor:
    """x̂₀ from a prediction of `prediction_type` at z_t."""
    if prediction_type == "epsilon":
        return (z - sigma * prediction) / alpha
    if prediction_type == "sample":
        return prediction
    if prediction_type == "v_prediction":
        return alpha * z - sigma * prediction
    raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def to_epsilon(prediction: torch.Tensor, prediction_type: str, z: torch.Tensor, alpha: torch.Tensor,
               sigma: torch.Tensor) -> torch.Tensor:
    """ε̂ from a prediction of `prediction_type` at z_t (DDIM inversion runs on ε)."""
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "v_prediction":
        return sigma * z + alpha * prediction
    return (z - alpha * to_x0(prediction, prediction_type, z, alpha, sigma)) / sigma


def to_v(prediction: torch.Tensor, prediction_type: str, z: torch.Tensor, alpha: torch.Tensor,
         sigma: torch.Tensor) -> torch.Tensor:
    """v̂ from a prediction of `prediction_type` at z_t."""
    if prediction_type == "v_prediction":
        return prediction
    if prediction_type == "epsilon":
        return (prediction - sigma * z) / alpha
    return (alpha * z - to_x0(prediction, prediction_type, z, alpha, sigma)) / sigma


def ddim_step(x0: torch.Tensor, epsilon: torch.Tensor, alpha_s: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """DDIM's deterministic step (η = 0) to s: z_s = α_s x̂₀ + σ_s ε̂. diffusers' DDIMScheduler takes ε̂ from
    the prediction itself and x̂₀ clipped (`clip_sample`); unclipped, ε̂ = (z_t − α_t x̂₀)/σ_t, the same."""
    return alpha_s * x0 + sigma_s * epsilon


def one_step_x0(z_t: torch.Tensor, z_s: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
                alpha_s: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """The x̂₀ with which one DDIM step from z_t lands exactly on z_s (Salimans & Ho, Algorithm 2):
    x̃ = (z_s − (σ_s/σ_t) z_t) / (α_s − (σ_s/σ_t) α_t). At s = 0 (σ_s = 0, α_s = 1) it is z_s itself."""
    ratio = sigma_s / sigma_t
    return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)
