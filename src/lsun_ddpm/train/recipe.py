"""What a run trains, toward what, and what it exports: the paper's DDPM, or a stage's own (distillation).

The loop (`loop.py`) is the same for every recipe: data, accumulation, clipping,
Adam, EMA, checkpoints, resume, signals, logs. A recipe says only what differs:
the weights a run starts from, the loss and the timesteps it is drawn at, and
the scheduler and pipeline class of the folder it exports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

from ..model import diffusion
from ..model.unet import build_model
from .options import TrainingConfig
from .setup import size_override


@dataclass(frozen=True)
class Recipe:
    make_model: Callable[[], UNet2DModel]  # the weights step 0 starts from
    # noise scheduler → objective: `sample_timesteps(batch_size, device)` and `losses(output, clean, noisy, noise, t)`
    make_objective: Callable[[DDPMScheduler], Any]
    description: str  # what is learned how, for the run's first log lines
    # noise scheduler → the scheduler that the run's grids and exported pipeline sample with
    sampling_scheduler: Callable[[DDPMScheduler], Any] = lambda noise_scheduler: noise_scheduler
    pipeline_class: type[DiffusionPipeline] = DDPMPipeline


def paper_recipe(config: TrainingConfig) -> Recipe:
    """The paper's DDPM: a fresh or fine-tuned U-Net, the simple loss at t ~ U{0, …, T−1} (the hybrid loss
    with a learned Σ), exported as a stock `DDPMPipeline`."""
    if config.learn_sigma:
        description = f"learned Σ, hybrid loss L_simple + {config.vlb_weight:g}·L_vlb"
    else:
        description = "fixed Σ, simple loss"
    return Recipe(
        make_model=lambda: build_model(config.model_preset, config.model_config_name_or_path, config.learn_sigma,
                                       config.pretrained_model_name_or_path, **size_override(config)),
        make_objective=lambda noise_scheduler: diffusion.Objective(noise_scheduler, config.vlb_weight),
        description=description,
    )
