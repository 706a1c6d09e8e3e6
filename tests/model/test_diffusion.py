"""The schedule, forward process and reverse step against the paper's formulas (float64)."""

import math

import numpy as np
import pytest
import torch

from lsun_ddpm.model import diffusion

T = 1000


@pytest.fixture()
def scheduler():
    return diffusion.make_noise_scheduler()


def paper_betas() -> np.ndarray:
    """β_t = β_0 + t (β_T − β_0)/(T − 1), t = 0 … T−1, with β_0 = 1e-4 and β_T = 0.02."""
    return 1e-4 + np.arange(T, dtype=np.float64) * (0.02 - 1e-4) / (T - 1)


def test_betas_are_linear_from_1e4_to_002(scheduler):
    betas = scheduler.betas.double().numpy()
    assert betas.shape == (T,)
    np.testing.assert_allclose(betas, paper_betas(), rtol=1e-6)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)


def test_alphas_cumprod_is_the_product_of_one_minus_beta(scheduler):
    expected = np.cumprod(1.0 - paper_betas())
    np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(), expected, rtol=1e-5)


def test_add_noise_is_q_sample(scheduler):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=generator)
    t = torch.tensor([0, 10, 500, 999])
    x_t = scheduler.add_noise(x0, eps, t).double()
    alpha_bar = torch.from_numpy(np.cumprod(1.0 - paper_betas()))[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * x0.double() + (1 - alpha_bar).sqrt() * eps.double()
    torch.testing.assert_close(x_t, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 50, 500, 999])
def test_reverse_step_mean_is_the_papers_mu(t):
    """prev_sample = μ_θ + σ_t z with μ_θ = (x_t − β_t/√(1−ᾱ_t) ε_θ)/√α_t and σ_t² = β̃_t."""
    scheduler = diffusion.make_noise_scheduler()
    scheduler.config.clip_sample = False  # the formula has no clipping of the x₀ estimate
    scheduler.set_timesteps(T)
    generator = torch.Generator().manual_seed(t)
    x_t = torch.randn(2, 3, 8, 8, generator=generator)
    eps_theta = torch.randn(2, 3, 8, 8, generator=generator)

    prev = scheduler.step(eps_theta, t, x_t, generator=torch.Generator().manual_seed(1)).prev_sample.double()
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).double()

    betas = paper_betas()
    alpha_bar = np.cumprod(1.0 - betas)
    beta_t, alpha_t = betas[t], 1.0 - betas[t]
    mu = (x_t.double() - beta_t / np.sqrt(1 - alpha_bar[t]) * eps_theta.double()) / np.sqrt(alpha_t)
    posterior_variance = beta_t * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t])  # β̃_t, "fixed_small"
    torch.testing.assert_close(prev - np.sqrt(posterior_variance) * z, mu, rtol=1e-4, atol=1e-4)


def test_trailing_respacing_visits_the_noisiest_step(scheduler):
    scheduler.set_timesteps(25)
    assert int(scheduler.timesteps[0]) == T - 1
    assert len(scheduler.timesteps) == 25


def test_epsilon_target_and_simple_loss(scheduler):
    x0 = torch.randn(3, 3, 4, 4)
    noise = torch.randint(-8, 8, (3, 3, 4, 4)) / 4  # exact in bf16
    t = torch.tensor([1, 2, 3])
    target = diffusion.training_target(scheduler, x0, noise, t)
    assert target is noise
    prediction = noise + 0.5
    losses = diffusion.per_sample_loss(prediction.bfloat16(), target)
    assert losses.dtype == torch.float32 and losses.shape == (3,)
    torch.testing.assert_close(losses, torch.full((3,), 0.25))


def test_v_and_sample_targets():
    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([100, 900])
    sample = diffusion.make_noise_scheduler(prediction_type="sample")
    assert diffusion.training_target(sample, x0, noise, t) is x0
    v = diffusion.make_noise_scheduler(prediction_type="v_prediction")
    alpha_bar = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    torch.testing.assert_close(diffusion.training_target(v, x0, noise, t), expected)


def test_timestep_quarters():
    t = torch.tensor([0, 249, 250, 499, 500, 749, 750, 999])
    assert diffusion.timestep_quarter(t, T).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("num_train_timesteps", [1000, 10, 7, 4])
def test_quarter_bounds_are_the_first_and_last_t_of_each_quarter(num_train_timesteps):
    t = torch.arange(num_train_timesteps)
    quarters = diffusion.timestep_quarter(t, num_train_timesteps)
    for quarter in range(4):
        members = t[quarters == quarter]
        expected = (members.min().item(), members.max().item())
        assert diffusion.quarter_bounds(quarter, num_train_timesteps) == expected
    assert diffusion.quarter_bounds(1, 1000) == (250, 499)


def test_training_timesteps_are_uniform_over_0_to_T_minus_1():
    torch.manual_seed(0)
    timesteps = diffusion.sample_timesteps(1_000_000, 1000, torch.device("cpu"))
    counts = torch.bincount(timesteps, minlength=1000).double()
    assert timesteps.dtype == torch.long and len(counts) == 1000  # nothing at T or above
    assert timesteps.min() == 0 and timesteps.max() == 999
    # Pearson's χ² with 999 degrees of freedom has mean 999 and s.d. 45: a uniform draw stays below
    # 1300 (6.7 s.d.) for practically every seed; leaving out one value of t alone adds ~1000.
    chi_square = float(((counts - 1000) ** 2 / 1000).sum())
    assert chi_square < 1300


# ---------------------------------------------------------------- Improved DDPM: learned Σ and L_vlb

LN2 = math.log(2.0)


def normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def paper_posterior_variance() -> np.ndarray:
    """β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t), with ᾱ_{−1} = 1."""
    betas = paper_betas()
    alpha_bar = np.cumprod(1.0 - betas)
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    return betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)


@pytest.mark.parametrize("mean1, var1, mean2, var2, expected_nats", [
    (0.0, 1.0, 1.0, 4.0, math.log(2.0) + (1.0 + 1.0) / 8.0 - 0.5),  # log(σ₂/σ₁) + (σ₁² + Δμ²)/(2σ₂²) − ½
    (1.0, 0.25, 0.0, 1.0, math.log(2.0) + (0.25 + 1.0) / 2.0 - 0.5),
    (0.3, 2.0, 0.3, 2.0, 0.0),
])
def test_gaussian_kl_is_the_closed_form(mean1, var1, mean2, var2, expected_nats):
    kl = diffusion.normal_kl(*(torch.tensor([value], dtype=torch.float64)
                               for value in (mean1, math.log(var1), mean2, math.log(var2))))
    assert float(kl) == pytest.approx(expected_nats, abs=1e-12)
    assert float(kl) / LN2 == pytest.approx(expected_nats / LN2)  # bits, as vlb_terms reports


@pytest.mark.parametrize("x, mean, scale, expected_probability", [
    (0.0, 0.0, 1 / 255, normal_cdf(1.0) - normal_cdf(-1.0)),  # an inner level: its bin of ±1/255
    (-1.0, -0.9, 0.1, normal_cdf((-0.1 + 1 / 255) / 0.1)),  # the first level's bin extends to −∞
    (1.0, 0.5, 0.5, 1.0 - normal_cdf((1.0 - 1 / 255 - 0.5) / 0.5)),  # the last level's to +∞
    (2 / 255 - 1.0, 0.2, 0.3, normal_cdf((3 / 255 - 1.2) / 0.3) - normal_cdf((1 / 255 - 1.2) / 0.3)),
])
def test_discretised_decoder_likelihood_is_the_bin_mass(x, mean, scale, expected_probability):
    x, mean = torch.tensor([x], dtype=torch.float64), torch.tensor([mean], dtype=torch.float64)
    log_p = diffusion.discretized_gaussian_log_likelihood(x, mean, torch.tensor([math.log(scale)], dtype=torch.float64))
    assert float(log_p) == pytest.approx(math.log(expected_probability), rel=1e-9)


@pytest.mark.parametrize("t", [1, 2, 250, 999])
def test_learned_variance_is_beta_tilde_at_minus_one_beta_at_one_and_log_linear_between(t):
    posterior = diffusion.Posterior.from_scheduler(diffusion.make_noise_scheduler())
    v = torch.tensor([-1.0, 1.0, 0.0, 0.5], dtype=torch.float64).view(4, 1, 1, 1)
    variance = posterior.learned_log_variance(v, torch.full((4,), t)).exp().flatten().tolist()
    beta, beta_tilde = paper_betas()[t], paper_posterior_variance()[t]
    assert variance[0] == pytest.approx(beta_tilde, rel=1e-6)
    assert variance[1] == pytest.approx(beta, rel=1e-6)
    assert variance[2] == pytest.approx(math.sqrt(beta * beta_tilde), rel=1e-6)  # f = ½: the geometric mean
    assert variance[3] == pytest.approx(beta ** 0.75 * beta_tilde ** 0.25, rel=1e-6)  # f = ¾


@pytest.mark.parametrize("t", [1, 10, 999])
def test_q_posterior_is_the_papers_mu_tilde_and_beta_tilde(t):
    """μ̃_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t) x₀ + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) x_t (Ho et al., eq. 7)."""
    posterior = diffusion.Posterior.from_scheduler(diffusion.make_noise_scheduler())
    generator = torch.Generator().manual_seed(t)
    x0, xt = (torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=generator) for _ in range(2))
    mean, log_variance = posterior.q_posterior_mean_variance(x0, xt, torch.full((2,), t))
    betas = paper_betas()
    alpha_bar = np.cumprod(1.0 - betas)
    expected = (np.sqrt(alpha_bar[t - 1]) * betas[t] / (1 - alpha_bar[t]) * x0
                + np.sqrt(1 - betas[t]) * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t]) * xt)
    # The scheduler's betas are float32 (diffusers' linspace), so each coefficient carries ~1e-8 of rounding:
    # where the two terms nearly cancel, that is more than rtol alone allows.
    torch.testing.assert_close(mean, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(log_variance.exp(), torch.full_like(x0, paper_posterior_variance()[t]), rtol=1e-6, atol=0)


def _noised(t_values, seed=0):
    scheduler = diffusion.make_noise_scheduler(variance_type="learned_range")
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, (len(t_values), 3, 8, 8), generator=generator) / 127.5 - 1.0  # pixel levels
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor(t_values)
    return scheduler, x0, noise, t, scheduler.add_noise(x0, noise, t)


def test_a_model_that_outputs_the_true_posterior_has_zero_vlb_terms_for_t_above_0():
    """ε = the true noise gives the true x₀, hence the true posterior mean μ̃_t; v = −1 gives Σ = β̃_t."""
    scheduler, x0, noise, t, xt = _noised([1, 10, 500, 999])
    posterior = diffusion.Posterior.from_scheduler(scheduler)
    true_posterior = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    assert posterior.vlb_terms(true_posterior, x0, xt, t).abs().max() < 1e-6
    wrong_variance = torch.cat([noise, torch.ones_like(noise)], dim=1)  # Σ = β_t ≠ β̃_t: KL > 0
    assert (posterior.vlb_terms(wrong_variance, x0, xt, t)[:2] > 1e-3).all()
    wrong_mean = torch.cat([noise + 0.1, -torch.ones_like(noise)], dim=1)
    assert (posterior.vlb_terms(wrong_mean, x0, xt, t) > 1e-5).all()


def test_the_vlb_term_at_t_0_is_the_decoder_nll_in_bits():
    """At t = 0 the mean is x̂₀ itself; with v = 1, σ² = β₀ = 1e-4 (σ = 0.01) for every pixel."""
    scheduler, x0, noise, t, xt = _noised([0, 0])
    posterior = diffusion.Posterior.from_scheduler(scheduler)
    output = torch.cat([noise, torch.ones_like(noise)], dim=1)
    half_bin = (1 / 255) / 0.01
    inner, edge = normal_cdf(half_bin) - normal_cdf(-half_bin), normal_cdf(half_bin)
    at_edge = (x0.abs() > 0.999).double()
    expected = -(at_edge * math.log(edge) + (1 - at_edge) * math.log(inner)).mean(dim=(1, 2, 3)) / LN2
    torch.testing.assert_close(posterior.vlb_terms(output, x0, xt, t).double(), expected, rtol=1e-4, atol=1e-5)


def test_the_fixed_variance_objective_is_the_simple_loss():
    scheduler = diffusion.make_noise_scheduler()
    _, x0, noise, t, xt = _noised([5, 600])
    output = noise + 0.5
    losses = diffusion.Objective(scheduler).losses(output, x0, xt, noise, t)
    assert set(losses) == {"loss"}
    torch.testing.assert_close(losses["loss"], torch.full((2,), 0.25))


def test_the_hybrid_loss_is_simple_plus_lambda_T_vlb_and_vlb_trains_only_the_variance():
    scheduler, x0, noise, t, xt = _noised([0, 3, 400, 999])
    output = torch.cat([noise + 0.3, torch.rand_like(noise) * 2 - 1], dim=1).requires_grad_()
    losses = diffusion.Objective(scheduler, vlb_weight=0.002).losses(output, x0, xt, noise, t)
    torch.testing.assert_close(losses["loss_simple"], torch.full((4,), 0.09))  # 0.3² per pixel, ε channels only
    torch.testing.assert_close(losses["loss"], losses["loss_simple"] + 0.002 * 1000 * losses["loss_vlb"])
    expected_vlb = diffusion.Posterior.from_scheduler(scheduler).vlb_terms(output.detach(), x0, xt, t)
    torch.testing.assert_close(losses["loss_vlb"], expected_vlb)

    (gradient,) = torch.autograd.grad(losses["loss_vlb"].sum(), output, retain_graph=True)
    assert torch.all(gradient[:, :3] == 0)  # the stop-gradient on the mean
    assert gradient[:, 3:].abs().sum() > 0
    (gradient,) = torch.autograd.grad(losses["loss_simple"].sum(), output)
    assert torch.all(gradient[:, 3:] == 0) and gradient[:, :3].abs().sum() > 0


@pytest.mark.parametrize("t", [1, 500, 999])
def test_ddpm_scheduler_samples_a_learned_variance_model_with_its_predicted_variance(t):
    """What stock DDPMPipeline does with a learned_range scheduler: prev = μ̃_t(x̂₀) + σ z with
    σ² = exp(f log β_t + (1 − f) log β̃_t), f = (v + 1)/2, from the [ε, v] output."""
    scheduler = diffusion.make_noise_scheduler(variance_type="learned_range")
    scheduler.config.clip_sample = False
    scheduler.set_timesteps(T)
    generator = torch.Generator().manual_seed(t)
    x_t = torch.randn(2, 3, 8, 8, generator=generator)
    eps_theta = torch.randn(2, 3, 8, 8, generator=generator)
    v = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    prev = scheduler.step(torch.cat([eps_theta, v], 1), t, x_t, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).double()

    betas = paper_betas()
    alpha_bar = np.cumprod(1.0 - betas)
    mu = (x_t.double() - betas[t] / np.sqrt(1 - alpha_bar[t]) * eps_theta.double()) / np.sqrt(1.0 - betas[t])
    fraction = (v.double() + 1) / 2
    sigma = torch.exp(0.5 * (fraction * np.log(betas[t]) + (1 - fraction) * np.log(paper_posterior_variance()[t])))
    torch.testing.assert_close(prev.prev_sample.double(), mu + sigma * z, rtol=1e-4, atol=1e-4)
