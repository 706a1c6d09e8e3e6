"""ε, x₀ and v against their definitions: z_t = α_t x₀ + σ_t ε and v = α_t ε − σ_t x₀ (Salimans & Ho 2022)."""

import pytest
import torch
from diffusers import DDIMScheduler

from lsun_ddpm.model.diffusion import make_noise_scheduler
from lsun_ddpm.model.parameterisation import alpha_sigma, ddim_step, one_step_x0, to_epsilon, to_v, to_x0

TIMESTEPS = torch.tensor([0, 1, 250, 500, 998, 999])


@pytest.fixture
def truth():
    """x₀ and ε drawn in float64, z_t from the paper's schedule, and v as diffusers defines it."""
    scheduler = make_noise_scheduler()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(len(TIMESTEPS), 3, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    epsilon = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    alpha, sigma = alpha_sigma(scheduler.alphas_cumprod.double(), TIMESTEPS, x0)
    z = alpha * x0 + sigma * epsilon
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    v = scheduler.get_velocity(x0, epsilon, TIMESTEPS)  # diffusers' own v = √ᾱ ε − √(1 − ᾱ) x₀
    return dict(x0=x0, epsilon=epsilon, v=v, z=z, alpha=alpha, sigma=sigma)


def test_alpha_and_sigma_are_the_square_roots_of_alpha_bar_and_its_complement(truth):
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    alpha, sigma = truth["alpha"].flatten(), truth["sigma"].flatten()
    torch.testing.assert_close(alpha, alphas_cumprod[TIMESTEPS].sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha), rtol=0, atol=1e-12)


@pytest.mark.parametrize("given", ["epsilon", "sample", "v_prediction"])
def test_each_prediction_gives_the_other_two(truth, given):
    prediction = {"epsilon": truth["epsilon"], "sample": truth["x0"], "v_prediction": truth["v"]}[given]
    common = (given, truth["z"], truth["alpha"], truth["sigma"])
    torch.testing.assert_close(to_x0(prediction, *common), truth["x0"], rtol=0, atol=1e-9)
    torch.testing.assert_close(to_epsilon(prediction, *common), truth["epsilon"], rtol=0, atol=1e-9)
    torch.testing.assert_close(to_v(prediction, *common), truth["v"], rtol=0, atol=1e-9)


def test_an_unknown_prediction_type_is_refused(truth):
    with pytest.raises(ValueError, match="v_prediction"):
        to_x0(truth["v"], "velocity", truth["z"], truth["alpha"], truth["sigma"])


def two_draws(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64) for _ in range(2))


def levels(timesteps: list[int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α and σ of the paper's schedule at each image's t, in float64."""
    return alpha_sigma(make_noise_scheduler().alphas_cumprod.double(), torch.tensor(timesteps), like)


def test_a_ddim_step_from_an_exact_prediction_is_diffusers_ddim_step_and_keeps_the_noise():
    """From z_t = α_t x₀ + σ_t ε, DDIM with the exact prediction (ε or v) lands on z_s = α_s x₀ + σ_s ε, as
    diffusers' DDIMScheduler's step does."""
    x0, epsilon = two_draws(1)
    t, s = 999, 749
    (alpha_t, sigma_t), (alpha_s, sigma_s) = levels([t, t], x0), levels([s, s], x0)
    z_t = alpha_t * x0 + sigma_t * epsilon
    for prediction_type, prediction in (("epsilon", epsilon), ("v_prediction", alpha_t * epsilon - sigma_t * x0)):
        x0_hat = to_x0(prediction, prediction_type, z_t, alpha_t, sigma_t)
        epsilon_hat = to_epsilon(prediction, prediction_type, z_t, alpha_t, sigma_t)
        z_s = ddim_step(x0_hat, epsilon_hat, alpha_s, sigma_s)
        torch.testing.assert_close(z_s, alpha_s * x0 + sigma_s * epsilon, rtol=0, atol=1e-12)
        scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=False, timestep_spacing="trailing")
        scheduler.set_timesteps(4)  # 999 → 749
        torch.testing.assert_close(scheduler.step(prediction, t, z_t).prev_sample, z_s, rtol=0, atol=1e-5)


def test_the_one_step_x0_makes_a_single_ddim_step_land_where_two_steps_landed():
    """Algorithm 2's target: one DDIM step from z_t with x̃ reaches the z_s the teacher's two steps reached;
    at s = 0 (α = 1, σ = 0) x̃ is z_s itself."""
    z_t, z_s = two_draws(2)
    (alpha_t, sigma_t), (alpha_s, sigma_s) = levels([999, 500], z_t), levels([499, 250], z_t)
    target = one_step_x0(z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s)
    epsilon = (z_t - alpha_t * target) / sigma_t  # what one DDIM step from z_t with x̃ implies
    torch.testing.assert_close(ddim_step(target, epsilon, alpha_s, sigma_s), z_s, rtol=0, atol=1e-9)
    at_zero = one_step_x0(z_t, z_s, alpha_t, sigma_t, torch.ones(()), torch.zeros(()))
    torch.testing.assert_close(at_zero, z_s, rtol=0, atol=0)
