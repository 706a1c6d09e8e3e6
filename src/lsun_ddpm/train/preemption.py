"""Ending a run early but resumably: a stop signal (preemption, Ctrl-C) or non-finite steps.

The training loop asks once per optimizer step whether to stop. Every process
takes the same decision (the loop sums the processes' votes in the all-reduce
it already makes for the losses), saves the same checkpoint and exits with a
status a scheduler understands:

- 128 + the signal's number after SIGTERM (143) or SIGINT (130), as a shell
  reports a process killed by that signal: a requeue script treats it like the
  kill it asked for, and the run resumes with `--resume_from_checkpoint latest`;
- `NONFINITE_EXIT_STATUS` (4) after `--max_nonfinite_steps` optimizer steps in a
  row had a non-finite loss or gradient norm: resuming as is would likely fail
  again, so it is not a status a requeue script should retry blindly.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass

from accelerate.logging import get_logger

from ..errors import signal_exit_status

logger = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
NONFINITE_EXIT_STATUS = 4  # after 2 (input to fix) and 3 (finished, not pushed): see errors.py
# A launcher (torchrun) forwards the Ctrl-C its workers already got from the terminal: a repeat this
# soon is the same request, not a second Ctrl-C.
REPEAT_WINDOW_SECONDS = 2.0


class RunStopped(SystemExit):
    """The run stopped early on purpose after saving a checkpoint; `code` is the process's exit status."""

    def __init__(self, status: int, message: str):
        super().__init__(status)
        self.message = message


class StopRequest:
    """Records SIGTERM/SIGINT instead of dying, so that the loop can finish its step and save.

    Use it as a context manager around the loop: the previous handlers come back
    on exit. A second Ctrl-C (after `REPEAT_WINDOW_SECONDS`) aborts at once;
    repeated SIGTERMs are ignored (a scheduler and a launcher may both send one).
    """

    def __init__(self):
        self.signal_number = 0  # the first stop signal this process received; 0: none
        self._received_at = 0.0
        self._previous_handlers: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python lets only the main thread set them
            for signal_number in STOP_SIGNALS:
                self._previous_handlers[signal_number] = signal.signal(signal_number, self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        for signal_number, handler in self._previous_handlers.items():
            signal.signal(signal_number, handler)
        self._previous_handlers.clear()

    def _record(self, signal_number: int, frame) -> None:
        if self.signal_number:
            if signal_number == signal.SIGINT and time.monotonic() - self._received_at > REPEAT_WINDOW_SECONDS:
                raise KeyboardInterrupt  # the user insists: abort now (the last complete checkpoint stays)
            return
        self.signal_number, self._received_at = signal_number, time.monotonic()
        # os.write, not print or logging: a handler may run in the middle of another write to stderr.
        os.write(2, f"received {signal.Signals(signal_number).name}: finishing the current optimizer step, then "
                    "saving a checkpoint and exiting (press Ctrl-C again to abort at once)\n".encode())

    def votes(self) -> list[float]:
        """One entry per `STOP_SIGNALS`, 1.0 for the signal this process received; the loop sums them."""
        return [float(self.signal_number == signal_number) for signal_number in STOP_SIGNALS]


def agreed_signal(vote_totals: list[float]) -> int:
    """The signal all processes stop for, from the summed votes: the first of `STOP_SIGNALS` that any
    process received (a signal reaching one worker stops them all); 0 if none."""
    return next((int(s) for s, votes in zip(STOP_SIGNALS, vote_totals) if votes > 0), 0)


@dataclass
class NonFiniteSteps:
    """Optimizer steps skipped because the loss or the gradient norm was not finite."""

    limit: int  # this many in a row stop the run
    last_good_step: int  # the optimizer step whose weights the model holds
    total: int = 0  # in this run (since its start or resume)
    in_a_row: int = 0

    def record(self, finite: bool, step: int) -> None:
        if finite:
            self.in_a_row, self.last_good_step = 0, step
            return
        self.total += 1
        self.in_a_row += 1
        logger.warning("optimizer step %d skipped: non-finite loss or gradient norm (%d in a row, %d in this run)",
                       step, self.in_a_row, self.total, main_process_only=True)

    @property
    def limit_reached(self) -> bool:
        return self.in_a_row >= self.limit


def stop_reason(step: int, vote_totals: list[float], nonfinite: NonFiniteSteps) -> RunStopped | None:
    """Why the run must stop after optimizer `step` (which is saved as checkpoint-`step`), or None."""
    if nonfinite.limit_reached:
        return RunStopped(NONFINITE_EXIT_STATUS, (
            f"stopped after step {step}: {nonfinite.in_a_row} optimizer steps in a row had a non-finite loss or "
            f"gradient norm; checkpoint-{step} holds the weights of step {nonfinite.last_good_step}, the last "
            "finite one (lower --learning_rate or use bf16, then resume with --resume_from_checkpoint latest)"
        ))
    signal_number = agreed_signal(vote_totals)
    if signal_number:
        return RunStopped(signal_exit_status(signal_number), (
            f"stopped by {signal.Signals(signal_number).name} after step {step}; checkpoint-{step} saved; "
            "resume with --resume_from_checkpoint latest"
        ))
    return None


def is_finite(*values: float) -> bool:
    return all(math.isfinite(value) for value in values)
