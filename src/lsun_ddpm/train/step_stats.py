"""The losses of an optimizer step's micro-batches, added up on every process in one all-reduce."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from ..model import diffusion
from .preemption import is_finite

@dataclass
class StepOutcome:
    """What every process knows after the all-reduce that ends an optimizer step."""

    metrics: dict[str, float]
    finite: bool  # the loss (all processes) and the gradient norm are finite
    stop_votes: list[float]  # per stop signal, how many processes received it


# The objective's terms logged beside the loss when it has them (the hybrid loss of a learned Σ).
LOSS_TERMS = ("loss_simple", "loss_vlb")


@dataclass
class StepStats:
    """Losses of the micro-batches of one optimizer step: overall, per quarter of t, and per term."""

    device: torch.device
    last_loss: float = float("nan")
    micro_batches: int = 0  # this process, this run
    terms: tuple[str, ...] = ()  # which of LOSS_TERMS the objective reports
    sums: torch.Tensor = field(init=False)
    counts: torch.Tensor = field(init=False)
    term_sums: torch.Tensor = field(init=False)

    def __post_init__(self):
        self._reset()

    def _reset(self):
        self.sums = torch.zeros(4, device=self.device, dtype=torch.float64)
        self.counts = torch.zeros(4, device=self.device, dtype=torch.float64)
        self.term_sums = torch.zeros(len(LOSS_TERMS), device=self.device, dtype=torch.float64)

    def add(self, losses: dict[str, torch.Tensor], quarters: torch.Tensor) -> None:
        """One micro-batch's per-image terms ("loss" and any of LOSS_TERMS) and the quarter of t of each image."""
        self.micro_batches += 1
        loss = losses["loss"].double()
        self.sums.index_add_(0, quarters, loss)
        self.counts.index_add_(0, quarters, torch.ones_like(loss))
        self.terms = tuple(name for name in LOSS_TERMS if name in losses)
        for index, name in enumerate(LOSS_TERMS):
            if name in losses:
                self.term_sums[index] += losses[name].double().sum()

    def finish_step(self, accelerator: Accelerator, num_train_timesteps: int, grad_norm: torch.Tensor,
                    stop_votes: list[float]) -> StepOutcome:
        """Means over all processes' samples of this step, whether the step is finite, and the summed stop
        votes: one all-reduce and one copy to the host per optimizer step. Then start the next step.

        A NaN on any process makes the summed losses NaN on all of them, and the
        gradient norm is the same everywhere (DDP averaged the gradients), so
        every process takes the same decision.
        """
        votes = torch.tensor(stop_votes, device=self.device, dtype=torch.float64)
        totals = accelerator.reduce(torch.cat([self.sums, self.counts, self.term_sums, votes]), reduction="sum")
        norm = torch.as_tensor(grad_norm, device=self.device).double().reshape(1)
        values = torch.cat([totals, norm]).tolist()
        sums, counts, term_sums = values[:4], values[4:8], values[8:8 + len(LOSS_TERMS)]
        vote_totals, grad_norm_value = values[8 + len(LOSS_TERMS):-1], values[-1]
        self.last_loss = sum(sums) / sum(counts)
        metrics = {"train/loss": self.last_loss, "train/grad_norm": grad_norm_value}
        for name, total in zip(LOSS_TERMS, term_sums):
            if name in self.terms:
                metrics[f"train/{name}"] = total / sum(counts)
        for quarter in range(4):
            if counts[quarter] > 0:
                low, high = diffusion.quarter_bounds(quarter, num_train_timesteps)
                metrics[f"train/loss_t{low}-{high}"] = sums[quarter] / counts[quarter]
        self._reset()
        return StepOutcome(metrics, is_finite(self.last_loss, grad_norm_value), vote_totals)
