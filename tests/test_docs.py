"""Every command line the README and docs/ show, as a user would paste it, is accepted by this version's parsers."""

import argparse
import re
import shlex

import pytest

from conftest import REPO_ROOT
from lsun_ddpm import cli
from lsun_ddpm.train.parsing import parse_training_config
from lsun_ddpm.demo import demo_defaults
from lsun_ddpm.distill.options import parse_distillation_options
from lsun_ddpm.errors import InputError

DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


class Parsed(Exception):
    """Raised by the patched `parse_args` once a command's flags parsed: nothing of the command runs."""


def shown_command_lines(text: str) -> list[list[str]]:
    """The words of every line of the ```bash blocks that runs the training script or `lsun-ddpm`, comments and
    line continuations resolved; a line starting with `$` is a transcript (the README's refused typo), not advice."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] != "$" and any(w in ("train_unconditional.py", "lsun-ddpm", "lsun_ddpm.cli")
                                                 for w in words):
                lines.append(words)
    return lines


def command_argv(words: list[str]) -> list[str]:
    """The arguments a line hands to the training script, or `lsun-ddpm`'s command and its arguments."""
    for program in ("train_unconditional.py", "lsun-ddpm", "lsun_ddpm.cli"):
        if program in words:
            argv = words[words.index(program) + 1:]
            return ["train", *argv] if program == "train_unconditional.py" else argv
    raise AssertionError(words)


def documented_commands() -> list:
    return [pytest.param(command_argv(words), id=f"{path.name}: {' '.join(words)[:90]}")
            for path in DOCUMENTS for words in shown_command_lines(path.read_text())]


def test_the_documents_show_commands_of_every_kind():
    """The extraction finds what the README is known to show, so the test below does not pass on nothing."""
    shown = {argv[0] for argv in (param.values[0] for param in documented_commands())}
    assert {"train", "demo", "sample", "interpolate", "neighbours", "evaluate", "prepare", "push", "convert-adm",
            "distill"} <= shown


@pytest.mark.parametrize("argv", documented_commands())
def test_a_documented_command_line_parses(argv, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the documents name configs/ relative to the repository
    command, arguments = argv[0], argv[1:]
    if command in ("train", "demo"):  # one parser for both, the demo's defaults under the demo's flags
        try:
            parse_training_config(arguments, defaults=demo_defaults("demo-run") if command == "demo" else None)
        except InputError as error:
            pytest.fail(f"{' '.join(argv)}: {error}")
        return

    if command == "distill":  # its own flags, then training's
        try:
            parse_distillation_options(arguments)
        except InputError as error:
            pytest.fail(f"{' '.join(argv)}: {error}")
        return

    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        parse_args(parser, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed):
        cli.main(argv)
