"""The EMA of the weights (the paper samples from it), on top of diffusers' `EMAModel`."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel

def make_ema(
    model: torch.nn.Module,
    max_decay: float = 0.9999,
    min_decay: float = 0.0,
    use_warmup: bool = True,
    inv_gamma: float = 1.0,
    power: float = 0.75,
) -> EMAModel:
    """An `EMAModel` of `model`'s parameters; step it once per optimizer step.

    Its decay at optimizer step s (counted from 1) is, with d = s - 1:
    `min(max_decay, 1 - (1 + d/inv_gamma)^-power)` with warm-up, otherwise
    `min(max_decay, (1 + d)/(10 + d))`; 0 at the first step, so the average
    starts at the weights after one update.
    """
    return EMAModel(
        model.parameters(),
        decay=max_decay,
        min_decay=min_decay,
        use_ema_warmup=use_warmup,
        inv_gamma=inv_gamma,
        power=power,
        model_cls=UNet2DModel,
        model_config=model.config,
    )


@contextlib.contextmanager
def ema_weights(ema: EMAModel | None, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Temporarily put the EMA weights into `model`, in eval mode.

    store → copy_to → restore: on exit the training weights come back
    bit-identical and the model returns to its previous train/eval mode,
    even if the body raises. With `ema=None` the model is used as it is.
    """
    was_training = model.training
    model.eval()
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        if ema is not None:
            ema.restore(model.parameters())
        model.train(was_training)
