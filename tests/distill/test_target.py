"""The distillation target against the teacher's DDIM steps taken by diffusers' own DDIMScheduler, in float64."""

import pytest
import torch
from conftest import random_tiny_unet
from diffusers import DDIMScheduler

from lsun_ddpm.distill.target import DistillationObjective
from lsun_ddpm.model.diffusion import make_noise_scheduler


def ddim(num_steps: int, prediction_type: str, clip_sample: bool) -> DDIMScheduler:
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              prediction_type=prediction_type, clip_sample=clip_sample, set_alpha_to_one=True,
                              timestep_spacing="trailing", steps_offset=0)
    scheduler.set_timesteps(num_steps)
    return scheduler


def teacher_steps(teacher, z: torch.Tensor, start: int, count: int, num_steps: int) -> torch.Tensor:
    """`count` steps of diffusers' DDIM of a `num_steps`-step sampler from timestep `start`, as the project
    samples with it: x₀ clipped, ε re-derived from it (`use_clipped_model_output`)."""
    scheduler = ddim(num_steps, "epsilon", clip_sample=True)
    timesteps = scheduler.timesteps.tolist()
    for t in timesteps[timesteps.index(start):][:count]:
        epsilon = teacher(z, torch.full((z.shape[0],), t)).sample
        z = scheduler.step(epsilon, t, z, use_clipped_model_output=True).prev_sample
    return z


def student_step(v: torch.Tensor, z: torch.Tensor, t: int, num_steps: int) -> torch.Tensor:
    """One step of diffusers' DDIM for a v-predicting student (unclipped: the target itself is not clipped)."""
    return ddim(num_steps, "v_prediction", clip_sample=False).step(v, t, z).prev_sample


@pytest.fixture(scope="module")
def teacher():
    return random_tiny_unet(seed=3).double()


def objective(teacher, student_steps: int, span: int) -> DistillationObjective:
    return DistillationObjective(make_noise_scheduler(prediction_type="v_prediction"), teacher, "epsilon",
                                 student_steps, span)


@pytest.mark.parametrize("t", [999, 749, 249])  # the first step, one in the middle, the last (onto x₀)
def test_one_student_step_with_the_target_lands_where_two_teacher_steps_land(teacher, t):
    z_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    landing = teacher_steps(teacher, z_t, start=t, count=2, num_steps=8)
    v_target = objective(teacher, student_steps=4, span=2).target(z_t, torch.full((2,), t))
    assert v_target.dtype == torch.float64
    torch.testing.assert_close(student_step(v_target, z_t, t, num_steps=4), landing, rtol=0, atol=1e-6)
    # not one teacher step: the target differs from what one step would give
    assert (student_step(v_target, z_t, t, 4) - teacher_steps(teacher, z_t, t, 1, 8)).abs().max() > 1e-3


def test_with_a_span_of_one_the_target_is_the_teachers_own_step_as_v(teacher):
    z_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    landing = teacher_steps(teacher, z_t, start=499, count=1, num_steps=4)
    v_target = objective(teacher, student_steps=4, span=1).target(z_t, torch.full((2,), 499))
    torch.testing.assert_close(student_step(v_target, z_t, 499, num_steps=4), landing, rtol=0, atol=1e-6)


def test_a_learned_variance_half_of_the_teachers_output_is_not_used(teacher):
    class WithVariance(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, z, t):
            epsilon = self.unet(z, t).sample
            return type(self.unet(z, t))(sample=torch.cat([epsilon, torch.full_like(epsilon, 7.0)], dim=1))

    z_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([999, 499])
    torch.testing.assert_close(objective(WithVariance(teacher), 4, 2).target(z_t, t),
                               objective(teacher, 4, 2).target(z_t, t), rtol=0, atol=0)


def test_the_loss_is_the_mean_squared_error_to_the_target_per_image(teacher):
    distill = objective(teacher, student_steps=2, span=2)
    z_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.tensor([999, 499])
    target = distill.target(z_t, t)
    offset = torch.tensor([0.5, 2.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    losses = distill.losses(target + offset, None, z_t, None, t)
    torch.testing.assert_close(losses["loss"], torch.tensor([0.25, 4.0]), rtol=1e-6, atol=0)


def test_timesteps_are_drawn_from_the_students_grid_only_and_all_of_it(teacher):
    torch.manual_seed(0)
    drawn = objective(teacher, student_steps=4, span=2).sample_timesteps(400, torch.device("cpu"))
    assert drawn.dtype == torch.long and drawn.shape == (400,)
    assert sorted(set(drawn.tolist())) == [249, 499, 749, 999]
