"""Commands that need a process of their own, forked from a server that has already imported torch.

A test that kills its command, signals it, or runs it offline needs a real process: exit statuses, signal
handlers and atexit belong to a process. Started as `python ...`, each such process spends seconds of CPU
importing torch before it does anything. Here it is forked instead from multiprocessing's fork server, which
imports once what is costly and reads no environment at import (torch, dynamo, numpy, pandas, PIL); the
child then takes the command's environment, working directory, `sys.path` and `sys.argv`, imports the rest
(diffusers, huggingface_hub, datasets, lsun_ddpm) under that environment, as a fresh interpreter does, and
runs the command as `python` would: `python SCRIPT`, `-m MODULE` or `-c CODE`. Its stdout and stderr go to
files. `accelerate launch` is forked too; its torchrun starts the workers as fresh interpreters. What a fresh
interpreter must show (stock diffusers loading a folder with lsun_ddpm hidden, a process's own peak memory)
still starts with `subprocess`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psutil  # accelerate's own dependency

# Costly to import and read no environment variable that a test sets (huggingface_hub, diffusers and
# datasets read HF_HOME, HF_HUB_OFFLINE and the like at import: the child imports those itself).
PRELOADED = ["torch", "torch._dynamo", "torch.distributed", "numpy", "pandas", "pyarrow", "PIL.Image"]
# Read by the OpenMP runtime when torch loads it: the server starts without them, the child applies its own.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_context = multiprocessing.get_context("forkserver")
_fresh_sys_path: list[str] | None = None


class ForkedProcess:
    """A command forked from the server, with the parts of `subprocess.Popen` the tests use."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, stdout: Path, stderr: Path):
        _ensure_server()
        self.args = args
        for path in (stdout, stderr):
            path.write_bytes(b"")  # there to read, whatever becomes of the child
        self._process = _context.Process(target=_run_command,
                                         args=(args, env, str(cwd), str(stdout), str(stderr), _fresh_path()))
        self._process.start()
        self.pid = self._process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit status (minus the signal's number if a signal ended it), or None while it runs."""
        if self.returncode is None:
            self._process.join(0)
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired([sys.executable, *self.args], timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL the command and what it started: its session (DataLoader workers, say), and the workers of
        an `accelerate launch`, which torchrun starts in sessions of their own."""
        if self.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                for descendant in psutil.Process(self.pid).children(recursive=True):
                    descendant.kill()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):  # had it not made its session yet
                os.kill(self.pid, signal.SIGKILL)
            self.wait()


def run_forked(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True)`, forked."""
    with tempfile.TemporaryDirectory(prefix="forked-") as outputs:
        stdout, stderr = Path(outputs, "stdout"), Path(outputs, "stderr")
        process = ForkedProcess(args, env, cwd, stdout, stderr)
        try:
            process.wait(timeout)
        finally:
            process.kill()  # an interrupted or timed-out test leaves nothing running
        return subprocess.CompletedProcess([sys.executable, *args], process.returncode,
                                           _read(stdout), _read(stderr))


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _ensure_server() -> None:
    """Start the fork server once per test process, its environment without thread settings."""
    saved = dict(os.environ)
    try:
        for name in THREAD_VARIABLES:
            os.environ.pop(name, None)
        _context.set_forkserver_preload(PRELOADED)
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _fresh_path() -> list[str]:
    """`sys.path` of a fresh interpreter, less its first entry (the script's folder, or the working folder)."""
    global _fresh_sys_path
    if _fresh_sys_path is None:
        printed = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
                                 capture_output=True, text=True, check=True).stdout
        _fresh_sys_path = json.loads(printed)
    return _fresh_sys_path


def _run_command(args: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str,
                 fresh_path: list[str]) -> None:
    """In the child: become `python ARGS` run with `env` in `cwd`, and exit as it would."""
    os.setsid()  # its own session, so that a kill reaches what it starts
    for fd, path in ((1, stdout), (2, stderr)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if "OMP_NUM_THREADS" in env:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        _run_as_main(args, fresh_path)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        traceback.print_exc()
        _exit_by_signal(signal.SIGINT)  # what the interpreter does with an uncaught Ctrl-C
    except BaseException:
        traceback.print_exc()
        raise SystemExit(1) from None
    finally:
        _wind_up()


def _run_as_main(args: list[str], fresh_path: list[str]) -> None:
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        sys.path[:] = [os.getcwd(), *fresh_path]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        sys.path[:] = ["", *fresh_path]
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:
        script = str(Path(args[0]).resolve())
        sys.argv = [args[0], *args[1:]]
        sys.path[:] = [str(Path(script).parent), *fresh_path]
        runpy.run_path(script, run_name="__main__")


def _wind_up() -> None:
    """What the interpreter does on its way out: a forked child leaves with os._exit, which skips atexit."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()


def _exit_by_signal(signum: int) -> None:
    _wind_up()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    time.sleep(1)
