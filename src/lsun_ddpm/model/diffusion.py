"""The paper's diffusion: linear β schedule, T = 1000, ε-prediction, simple MSE loss;
and Improved DDPM's learned variance Σ_θ with the hybrid loss L_simple + λ·L_vlb.

The forward process and the reverse step are diffusers' `DDPMScheduler`; this
module fixes its configuration and defines the training objectives. diffusers
has no L_vlb: `Posterior` holds the quantities it needs (q(x_{t-1} | x_t, x₀),
p_θ(x_{t-1} | x_t)), named as in Ho et al. and Nichol & Dhariwal.
tests/model/test_diffusion.py checks everything against the papers' formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ..layout import LEARNED_VARIANCE

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

    `variance_type`: "fixed_small" (σ_t² = β̃_t, the paper's) or, for a U-Net
    that also outputs v (`learn_sigma`), "learned_range": Improved DDPM's
    Σ_θ = exp(v log β_t + (1 − v) log β̃_t) with v mapped from [-1, 1] to [0, 1].

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


def quarter_bounds(quarter: int, num_train_timesteps: int) -> tuple[int, int]:
    """The first and last t that `timestep_quarter` puts in `quarter`: 4t // T = q for ⌈qT/4⌉ ≤ t < ⌈(q+1)T/4⌉."""
    return -(-quarter * num_train_timesteps // 4), -(-(quarter + 1) * num_train_timesteps // 4) - 1


def learns_variance(scheduler: DDPMScheduler) -> bool:
    """True for a scheduler whose model also predicts the variance (`variance_type="learned_range"`)."""
    return scheduler.config.variance_type == LEARNED_VARIANCE


def mean_flat(values: torch.Tensor) -> torch.Tensor:
    """The mean over every dimension but the batch's: one value per image."""
    return values.mean(dim=tuple(range(1, values.ndim)))


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^log_var1) ‖ N(mean2, e^log_var2)) per element, in nats."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per element under N(mean, e^(2·log_scale)) discretised to the 256 pixel levels of [-1, 1].

    Each level owns a bin of width 2/255 centred on it; the first and the last
    bins extend to −∞ and +∞ (Ho et al., eq. 13). The normal CDF is exact
    (`torch.special.ndtr`), where ADM uses a tanh approximation; a bin's mass
    is taken from the tail it lies in, so that it does not vanish in rounding.
    """
    half_bin = 1.0 / 255.0
    inverse_scale = torch.exp(-log_scale)
    upper = (x - mean + half_bin) * inverse_scale
    lower = (x - mean - half_bin) * inverse_scale
    ndtr = torch.special.ndtr
    bin_mass = torch.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    return torch.where(
        x < -0.999, torch.special.log_ndtr(upper),  # the first level: P(X ≤ x + ½ bin)
        torch.where(x > 0.999, torch.special.log_ndtr(-lower),  # the last: P(X ≥ x − ½ bin)
                    torch.log(bin_mass.clamp(min=1e-12))),
    )


class Posterior:
    """The Gaussians of a DDPM schedule that L_vlb compares: q(x_{t−1} | x_t, x₀) and p_θ(x_{t−1} | x_t).

    The coefficients are computed once in float64 from the scheduler's β and
    used in the precision of the tensors they multiply (fp32 in training).
    """

    def __init__(self, betas: torch.Tensor):
        betas = betas.double().cpu()
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)  # β̃_t
        # β̃_0 = 0 has no logarithm; as in ADM, t = 0 borrows t = 1's (only the decoder term uses t = 0).
        self.log_variance_clipped = torch.log(torch.cat([self.variance[1:2], self.variance[1:]]))
        self.log_betas = torch.log(betas)
        self.mean_coef_x0 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.mean_coef_xt = (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod)
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = alphas_cumprod.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1.0).sqrt()

    @classmethod
    def from_scheduler(cls, scheduler: DDPMScheduler) -> "Posterior":
        return cls(scheduler.betas)

    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] per image, shaped to broadcast against `like`, in its device and dtype."""
        return values.to(like.device)[t].to(like.dtype).view(-1, *[1] * (like.ndim - 1))

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """(mean, log variance) of q(x_{t−1} | x_t, x₀) = N(μ̃_t, β̃_t I),
        μ̃_t = β_t √ᾱ_{t−1}/(1 − ᾱ_t) · x₀ + (1 − ᾱ_{t−1}) √α_t/(1 − ᾱ_t) · x_t."""
        mean = self._at(self.mean_coef_x0, t, x0) * x0 + self._at(self.mean_coef_xt, t, xt) * xt
        return mean, self._at(self.log_variance_clipped, t, x0).expand_as(x0)

    def learned_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log Σ_θ = f log β_t + (1 − f) log β̃_t with f = (v + 1)/2: β̃_t at v = −1, β_t at v = 1 (Improved DDPM, eq. 15)."""
        fraction = (v + 1.0) / 2.0
        return fraction * self._at(self.log_betas, t, v) + (1.0 - fraction) * self._at(self.log_variance_clipped, t, v)

    def predicted_x0(self, prediction: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                     prediction_type: str = "epsilon") -> torch.Tensor:
        """x̂₀ from the network's prediction of ε (x̂₀ = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t), of x₀, or of v."""
        if prediction_type == "epsilon":
            return self._at(self.sqrt_recip_alphas_cumprod, t, xt) * xt \
                - self._at(self.sqrt_recipm1_alphas_cumprod, t, xt) * prediction
        if prediction_type == "sample":
            return prediction
        if prediction_type == "v_prediction":
            return self._at(self.sqrt_alphas_cumprod, t, xt) * xt \
                - self._at(self.sqrt_one_minus_alphas_cumprod, t, xt) * prediction
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")

    def p_mean_variance(self, model_output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                        prediction_type: str = "epsilon"):
        """(mean, log variance) of p_θ(x_{t−1} | x_t) for a U-Net output [prediction, v] (2C channels):
        the posterior mean μ̃_t(x̂₀, x_t) of the predicted x₀, and the learned variance of v."""
        prediction, v = model_output.chunk(2, dim=1)
        mean, _ = self.q_posterior_mean_variance(self.predicted_x0(prediction, xt, t, prediction_type), xt, t)
        return mean, self.learned_log_variance(v, t)

    def vlb_terms(self, model_output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                  prediction_type: str = "epsilon") -> torch.Tensor:
        """L_t per image, in bits per dimension: KL(q(x_{t−1} | x_t, x₀) ‖ p_θ(x_{t−1} | x_t)) for t > 0,
        and the decoder's −log p_θ(x₀ | x₁) for t = 0."""
        true_mean, true_log_variance = self.q_posterior_mean_variance(x0, xt, t)
        mean, log_variance = self.p_mean_variance(model_output, xt, t, prediction_type)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance))
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance))
        return torch.where(t == 0, decoder_nll, kl) / math.log(2.0)


@dataclass
class Objective:
    """What training minimises, per image: the paper's simple loss or, for a learned Σ (the scheduler's
    variance_type is "learned_range"), Improved DDPM's hybrid L_simple + λ·L_vlb."""

    scheduler: DDPMScheduler
    vlb_weight: float = 0.001  # λ (Improved DDPM)
    posterior: Posterior = field(init=False, repr=False)

    def __post_init__(self):
        self.posterior = Posterior.from_scheduler(self.scheduler)

    @property
    def learns_variance(self) -> bool:
        return learns_variance(self.scheduler)

    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return sample_timesteps(batch_size, self.scheduler.config.num_train_timesteps, device)

    def losses(self, model_output: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image terms, fp32: "loss" (what is minimised); with a learned Σ also "loss_simple" and
        "loss_vlb" (L_t at the drawn t, in bits per dimension)."""
        target = training_target(self.scheduler, clean, noise, timesteps)
        if not self.learns_variance:
            return {"loss": per_sample_loss(model_output, target)}
        prediction, v = model_output.float().chunk(2, dim=1)
        simple = per_sample_loss(prediction, target)
        # L_vlb trains Σ_θ only: it sees the predicted mean as a constant (Improved DDPM, sec. 3.1), so that
        # the noisy bound does not pull on μ_θ, which L_simple fits.
        frozen_mean_output = torch.cat([prediction.detach(), v], dim=1)
        vlb = self.posterior.vlb_terms(frozen_mean_output, clean.float(), noisy.float(), timesteps,
                                       self.scheduler.config.prediction_type)
        # L_vlb = Σ_t L_t = T·E_t[L_t]: the drawn t's term times T estimates it (λ·T = 1 at T = 1000, as in ADM).
        total = simple + self.vlb_weight * self.scheduler.config.num_train_timesteps * vlb
        return {"loss": total, "loss_simple": simple, "loss_vlb": vlb}
