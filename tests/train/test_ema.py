"""The EMA: its decay schedule, one update per optimizer step, and weights that come back intact."""

import pytest
import torch

from lsun_ddpm.train.ema import ema_weights, make_ema
from lsun_ddpm.model.unet import ADMUNet2DModel


@pytest.fixture()
def model():
    torch.manual_seed(0)
    model = ADMUNet2DModel.from_preset("tiny16")
    for p in model.parameters():
        p.data.normal_(std=0.1)
    return model.train()


@pytest.mark.parametrize("step", [1, 2, 10, 1000, 5000, 300_000])
def test_warmup_decay_values(model, step):
    ema = make_ema(model, max_decay=0.9999, use_warmup=True, inv_gamma=1.0, power=0.75)
    d = step - 1
    expected = 0.0 if d == 0 else min(0.9999, 1 - (1 + d) ** -0.75)
    assert ema.get_decay(step) == pytest.approx(expected)


@pytest.mark.parametrize("step", [1, 2, 100, 200_000])
def test_default_decay_values(model, step):
    ema = make_ema(model, max_decay=0.9999, use_warmup=False)
    d = step - 1
    expected = 0.0 if d == 0 else min(0.9999, (1 + d) / (10 + d))
    assert ema.get_decay(step) == pytest.approx(expected)


def test_a_few_thousand_steps_average_a_few_hundred(model):
    """The training defaults' ramp: the EMA horizon 1/(1-decay) is ~(1+d)^0.75 steps."""
    ema = make_ema(model)
    assert 100 < 1 / (1 - ema.get_decay(1_000)) < 300
    assert 400 < 1 / (1 - ema.get_decay(5_000)) < 800
    assert ema.get_decay(300_000) == 0.9999


def test_update_is_the_papers_formula(model):
    ema = make_ema(model, use_warmup=False)
    ema.step(model.parameters())  # first step: decay 0, the average is the weights
    before = [p.clone() for p in ema.shadow_params]
    for p in model.parameters():
        p.data.add_(1.0)
    ema.step(model.parameters())
    decay = ema.cur_decay_value
    assert decay == pytest.approx(2 / 11)
    for shadow, old, p in zip(ema.shadow_params, before, model.parameters()):
        torch.testing.assert_close(shadow, decay * old + (1 - decay) * p)


def test_sampling_with_ema_weights_restores_training_weights_bit_identically(model):
    ema = make_ema(model)
    for p in model.parameters():
        p.data.mul_(1.5)
    ema.step(model.parameters())
    for p in model.parameters():
        p.data.add_(0.01)  # the training weights now differ from the EMA
    training = {k: v.clone() for k, v in model.state_dict().items()}
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])

    with ema_weights(ema, model) as swapped:
        assert not swapped.training
        for p, shadow in zip(model.parameters(), ema.shadow_params):
            assert torch.equal(p, shadow)
        swapped(x, t)
    assert model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, training[name]), name


def test_weights_are_restored_even_if_sampling_fails(model):
    ema = make_ema(model)
    for p in model.parameters():
        p.data.add_(1.0)
    training = [p.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError):
        with ema_weights(ema, model):
            raise RuntimeError("sampling crashed")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), training))


def test_without_ema_the_model_is_used_as_is(model):
    training = [p.clone() for p in model.parameters()]
    with ema_weights(None, model):
        assert not model.training
    assert model.training and all(torch.equal(a, b) for a, b in zip(model.parameters(), training))


@pytest.mark.slow
def test_a_fresh_run_uses_its_own_ema_max_decay(tmp_path, image_folder):
    """--ema_max_decay 0.5 caps the warm-up's decay from the third optimizer step on: 0, 1 − 2^−¾, then 0.5."""
    from conftest import read_scalars, run_training

    output_dir = tmp_path / "out"
    run_training(tmp_path, output_dir, ["--train_data_dir", str(image_folder), "--max_train_steps", "5",
                                        "--gradient_accumulation_steps", "1", "--ema_max_decay", "0.5",
                                        "--logger", "tensorboard"])
    expected = {1: 0.0, 2: 1 - 2 ** -0.75, 3: 0.5, 4: 0.5, 5: 0.5}
    assert read_scalars(output_dir, "train/ema_decay") == pytest.approx(expected)
