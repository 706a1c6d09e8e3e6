"""The exceptions for input a user can fix, and how every command reports errors.

A flag, a config key, a path, a run folder or a file that is wrong is reported
as one sentence (`error: ...`, exit status 2, no traceback) by the command that
received it; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Callable, Iterable

INPUT_ERROR_STATUS = 2  # argparse's own status for a bad command line
RUN_NOT_PUSHED_STATUS = 3  # training finished and is saved; only the upload at the end failed
DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "LSUN_DDPM_DEBUG"


class InputError(ValueError):
    """Input the user can fix; the message is the whole report, so it says what to do."""


class DatasetUnavailableError(InputError):
    """The requested dataset cannot be loaded (no network, unknown repo, wrong column, missing package)."""


class ModelUnavailableError(InputError):
    """The model folder or Hub repo cannot be loaded."""


class HubUploadError(InputError):
    """The upload failed; the local folder is untouched."""


class LpipsWeightsUnavailableError(InputError):
    """The backbone's ImageNet weights can neither be downloaded nor read from a file."""


class RunNotPushedError(RuntimeError):
    """Training finished and its run folder is complete; only the upload to the Hub failed."""


def signal_exit_status(signal_number: int) -> int:
    """The status a shell reports for a process killed by this signal: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + signal_number


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """"; did you mean X?" when one of `choices` is close to `word`, else ""."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def take_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` without `--debug`, and whether tracebacks were asked for (the flag or LSUN_DDPM_DEBUG=1).

    The flag is taken out before any parser sees it, so it works the same for every command.
    """
    from_environment = os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")
    return [arg for arg in argv if arg != DEBUG_FLAG], DEBUG_FLAG in argv or from_environment


def input_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "fix the input", not "a bug": each command reports them in one line."""
    return InputError, FileNotFoundError, FileExistsError


def run_command(program: str, command: Callable[[list[str]], None], argv: list[str], debug: bool = False) -> None:
    """Run `command(argv)`; print an input error as `<program>: error: <message>` and exit 2,
    a finished run whose upload failed likewise with exit 3. With `debug`, let the traceback through."""
    try:
        command(argv)
    except RunNotPushedError as error:
        if debug:
            raise
        _exit_with_message(program, error, RUN_NOT_PUSHED_STATUS)
    except input_error_types() as error:
        if debug:
            raise
        _exit_with_message(program, error, INPUT_ERROR_STATUS)


def _exit_with_message(program: str, error: BaseException, status: int) -> None:
    print(f"{program}: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(status)
