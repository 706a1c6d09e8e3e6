"""The sampling grids against diffusers' own trailing spacing, and the halving that distillation relies on."""

import pytest
from diffusers import DDIMScheduler

from lsun_ddpm.model.step_grids import X0, teacher_paths, trailing_grid


@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 8, 16, 25, 64, 256, 1000])
def test_the_grid_is_the_one_diffusers_trailing_spacing_visits(num_steps):
    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    scheduler.set_timesteps(num_steps)
    assert trailing_grid(num_steps, 1000) == scheduler.timesteps.tolist()


def test_the_papers_four_step_grid():
    assert trailing_grid(4, 1000) == [999, 749, 499, 249]


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 16, 32, 64, 128, 256])
def test_each_halving_keeps_every_other_point(num_steps):
    assert trailing_grid(2 * num_steps, 1000)[::2] == trailing_grid(num_steps, 1000)


def test_each_student_step_spans_two_teacher_steps_and_the_last_ends_on_x0():
    assert teacher_paths(2, 1000) == [(999, 749, 499), (499, 249, X0)]
    pairs = teacher_paths(4, 1000)
    assert [t for t, _, _ in pairs] == trailing_grid(4, 1000)
    assert [t2 for _, _, t2 in pairs] == [*trailing_grid(4, 1000)[1:], X0]
    assert [t1 for _, t1, _ in pairs] == trailing_grid(8, 1000)[1::2]


def test_a_span_of_one_is_the_teachers_own_grid_step_by_step():
    assert teacher_paths(4, 1000, span=1) == [(999, 749), (749, 499), (499, 249), (249, X0)]


@pytest.mark.parametrize("num_steps", [0, 1001])
def test_a_step_count_outside_one_to_t_is_refused(num_steps):
    with pytest.raises(ValueError, match="1 to 1000"):
        trailing_grid(num_steps, 1000)
