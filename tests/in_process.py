"""Running a command's entry point inside the test process, as its own process would run it.

A command run as a subprocess spends most of a tiny test run importing torch and diffusers again. What a
single-process command does does not depend on its having a process of its own, so tests that check what
it writes, prints or refuses run its `main(argv)` here instead and get the same `CompletedProcess`: exit
status, stdout, and stderr with its log lines, warnings and, for an uncaught exception, the traceback.
What does need a process — signals, kills, several processes, a fresh import, the offline switches that
huggingface_hub reads once at import — stays in processes of its own, forked from a server that has
imported torch (`forked_process.py`); so does `accelerate launch`, whose workers torchrun starts afresh.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

# What `accelerate launch --cpu --mixed_precision no --dynamo_backend no` hands its one process
# (accelerate.utils.launch.prepare_simple_launcher_cmd_env), so a run here configures itself as a launched one.
LAUNCHED_ON_CPU = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no",
                   "ACCELERATE_DYNAMO_BACKEND": "NO"}


def run_in_process(main: Callable[[list[str]], None], argv: list[str], env: dict[str, str],
                   cwd: Path) -> subprocess.CompletedProcess:
    """`main(argv)` with `env` as the whole environment, `cwd` as the working directory and one torch thread
    (the subprocesses' OMP_NUM_THREADS=1, so results are bitwise those of a launched run)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    fresh_process_state()
    with _process_like(env, cwd, stderr), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        returncode = _exit_status(main, argv)
    return subprocess.CompletedProcess(argv, returncode, stdout.getvalue(), stderr.getvalue())


def fresh_process_state() -> None:
    """Reset what the package keeps per process: how many skipped and upscaled images it has logged (it logs
    the first few of each kind in a process, lsun_ddpm.data.report)."""
    from lsun_ddpm.data import report

    report._logged.update(dict.fromkeys(report._logged, 0))


def _exit_status(main: Callable[[list[str]], None], argv: list[str]) -> int:
    """What the interpreter would exit with: SystemExit's code (a message is printed, status 1), or 1 and
    the traceback on stderr."""
    try:
        main(argv)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - an uncaught exception ends a process with its traceback
        traceback.print_exc()
        return 1
    return 0


@contextlib.contextmanager
def _process_like(env: dict[str, str], cwd: Path, stderr: io.StringIO) -> Iterator[None]:
    """Environment, directory, threads, logging and warnings as a fresh process has them; all restored after,
    and accelerate's process-wide state reset, so the next run (or test) starts clean."""
    saved_env, saved_cwd, saved_threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    root = logging.getLogger()
    saved_level = root.level
    # The training script's logging.basicConfig would do nothing here: pytest's handlers are already on the root.
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    torch.set_num_threads(1)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            warnings.simplefilter("default")
            warnings.showwarning = _warning_to(stderr)
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        torch.set_num_threads(saved_threads)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        AcceleratorState._reset_state(reset_partial_state=True)


def _warning_to(stream: io.StringIO) -> Callable[..., None]:
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        stream.write(warnings.formatwarning(message, category, filename, lineno, line))
    return show
