"""A run's segments (its start and every resume) and its whole-run totals.

A run that is stopped and resumed trains in segments, one per job. Every
checkpoint records the segments that led to it (`HISTORY_FILE`); a resumed run
reads them from the checkpoint it resumes and appends its own, so the summary,
the model card and the logs give the whole run's wall time, images,
micro-batches and skipped steps, not the last job's. Work a job did after its
last checkpoint is lost with the job, and is not counted.

A checkpoint written before segments were recorded stands for one segment of
unknown cost: a total that depends on it is None (shown as unknown), not a
number that leaves part of the run out.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..files import write_text
from ..layout import HISTORY_FILE, checkpoint_step

# What adds up over the segments (per-segment values in `Segment`).
TOTALS = ("wall_time_seconds", "images", "micro_batches_per_process", "nonfinite_steps")


@dataclass(frozen=True)
class Segment:
    """One job's share of a run: optimizer steps `first_step` + 1 to `last_step`, and what they took."""

    first_step: int
    last_step: int
    started: str | None = None  # UTC, ISO 8601
    num_processes: int | None = None
    micro_batches_per_process: int | None = None
    images: int | None = None
    nonfinite_steps: int | None = None
    wall_time_seconds: float | None = None


def read_segments(checkpoint: Path | None) -> list[Segment]:
    """The segments that led to `checkpoint` (none for a new run); for a checkpoint written before they were
    recorded, one segment of unknown cost up to its step."""
    if checkpoint is None:
        return []
    try:
        records = json.loads((checkpoint / HISTORY_FILE).read_text())["segments"]
        return [Segment(**record) for record in records]
    except (OSError, ValueError, KeyError, TypeError):
        return [Segment(first_step=0, last_step=checkpoint_step(checkpoint))]


def write_segments(segments: list[Segment], folder: Path) -> None:
    """Record `segments` in `folder` (a checkpoint being written)."""
    text = json.dumps({"segments": [asdict(segment) for segment in segments]}, indent=2)
    write_text(text + "\n", folder / HISTORY_FILE)


def totals(segments: list[Segment]) -> dict[str, Any]:
    """Each of TOTALS summed over the segments; None where a segment's value is unknown."""
    summed = {}
    for name in TOTALS:
        values = [getattr(segment, name) for segment in segments]
        summed[name] = None if any(value is None for value in values) else sum(values)
    if summed["wall_time_seconds"] is not None:
        summed["wall_time_seconds"] = round(summed["wall_time_seconds"], 1)
    return summed


class RunHistory:
    """The segments that led to the checkpoint this job resumed, and the one this job is training."""

    def __init__(self, earlier: list[Segment], first_step: int, num_processes: int, images_per_micro_batch: int):
        self.earlier = earlier
        self.first_step = first_step
        self.num_processes = num_processes
        self.images_per_micro_batch = images_per_micro_batch  # micro-batch size x processes
        self.started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._clock = time.perf_counter()

    @property
    def earlier_nonfinite_steps(self) -> int:
        return sum(segment.nonfinite_steps or 0 for segment in self.earlier)

    def until(self, last_step: int, micro_batches: int, nonfinite_steps: int) -> list[Segment]:
        """Every segment, this job's up to optimizer step `last_step` (left out if it trained no step)."""
        if last_step == self.first_step and self.earlier:  # a resumed run that only wrote its results
            return list(self.earlier)
        wall_time = round(time.perf_counter() - self._clock, 1)
        return [*self.earlier, Segment(self.first_step, last_step, self.started, self.num_processes, micro_batches,
                                       micro_batches * self.images_per_micro_batch, nonfinite_steps, wall_time)]
