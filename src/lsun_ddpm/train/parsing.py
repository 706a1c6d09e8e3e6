"""Reading the options: command line over a --config file over a command's defaults; the checks that read the disk."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..errors import DEBUG_FLAG, InputError, did_you_mean
from ..files import check_output_folder
from ..model.unet import downsampling_factor, model_config, unet_channels
from .options import TrainingConfig, coerce_option, option_fields, option_types

def read_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON file of TrainingConfig fields; unknown keys are an error."""
    try:
        text = Path(path).read_text()
    except OSError as error:  # missing, a folder, unreadable
        raise InputError(f"--config {path}: {error.strerror.lower()}") from None
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise InputError(f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                         f"{' '.join(str(error).split())}") from None
    values = values or {}
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a mapping of option names to values")
    known = [option.name for option in option_fields()]
    for name in values:
        if name not in known:
            raise InputError(f"{path}: unknown option {name!r}{did_you_mean(str(name), known)}")
    return values


class TrainingArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors are InputErrors: one sentence each, without the
    usage block (dozens of lines for this many options) that argparse prints first."""

    def error(self, message: str):
        raise InputError(f"{message} (see --help)")


def make_parser(prog: str | None = None, add_help: bool = True) -> HfArgumentParser:
    parser = TrainingArgumentParser(TrainingConfig, prog=prog, add_help=add_help,
                                    description="Train the paper's DDPM with 🤗 accelerate.")
    parser.add_argument("--config", help="YAML or JSON file of options; flags given on the command line win.")
    # Taken out of the command line before parsing (errors.take_debug_flag); listed so that --help shows it.
    parser.add_argument(DEBUG_FLAG, action="store_true", help="Show the traceback of an error (or LSUN_DDPM_DEBUG=1).")
    return parser


def parse_training_config(argv: list[str] | None = None, defaults: dict[str, Any] | None = None,
                          prog: str | None = None) -> TrainingConfig:
    """Parse `--config FILE` and flags; command-line flags override the file,
    which overrides `defaults` (a command's own defaults, e.g. the demo's).

    `HfArgumentParser.parse_yaml_file` cannot merge flags, so the file's values
    become the parser's defaults and the command line is parsed on top.
    Every error is an InputError that names the flag or key.
    """
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config")
    config_file = pre_parser.parse_known_args(argv)[0].config

    parser = make_parser(prog)
    parser.set_defaults(**(defaults or {}))
    from_file = read_config_file(config_file) if config_file else {}
    parser.set_defaults(**typed_options(from_file, config_file))
    # Unknown flags first: HfArgumentParser would build (and check) the config before reporting them.
    _check_known_arguments(parser, parser.parse_known_args(argv)[1])
    given = options_on_command_line(argv)
    if "num_epochs" in given and "max_train_steps" not in given:  # diffusers' script knows only --num_epochs:
        parser.set_defaults(max_train_steps=None)  # it wins over a file's (or a command's) step count
    config = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)[0]
    config.explicit_options = frozenset(given | set(from_file))
    return config


def options_on_command_line(argv: list[str] | None) -> set[str]:
    """The options `argv` sets, as argparse reads them (abbreviations and `--no_<option>` included)."""
    probe = make_parser(add_help=False)
    unset = object()
    probe.set_defaults(**{option.name: unset for option in option_fields()})
    namespace = probe.parse_known_args(argv)[0]
    return {option.name for option in option_fields() if getattr(namespace, option.name) is not unset}


def _check_known_arguments(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    if not unknown:
        return
    flags = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("--")]
    if not flags:
        raise InputError(f"unexpected argument {unknown[0]!r}: every option is a --flag (see --help)")
    raise InputError(f"unknown option {flags[0]}{did_you_mean(flags[0], parser._option_string_actions)}")


def typed_options(values: dict[str, Any], path: str) -> dict[str, Any]:
    """Convert and check a file's values as the command line would (YAML reads `3e-4` as a string)."""
    types = option_types()
    return {name: coerce_option(f"{path}: {name}", value, types[name]) for name, value in values.items()}


def check_training_inputs(config: TrainingConfig) -> None:
    """What `TrainingConfig` cannot check from its values alone: the output paths can be
    written, and the model can take the resolution and has the outputs --learn_sigma needs;
    an unset --learn_sigma is resolved from the model. Nothing is created or written."""
    check_output_folder(config.output_dir, "--output_dir")
    check_output_folder(os.path.join(config.output_dir, config.logging_dir), "--logging_dir")
    if config.logger == "wandb" and importlib.util.find_spec("wandb") is None:  # accelerate would only warn
        raise InputError("--logger wandb needs the wandb package (pip install wandb), or use --logger tensorboard")
    unet = read_model_config(config)
    check_resolution(config, unet)
    resolve_learn_sigma(config, unet)


def model_source_flag(config: TrainingConfig) -> tuple[str, str | None]:
    """The flag naming where the model's config comes from, and its value (None: the preset)."""
    if config.pretrained_model_name_or_path:
        return "--pretrained_model_name_or_path", config.pretrained_model_name_or_path
    return "--model_config_name_or_path", config.model_config_name_or_path


def read_model_config(config: TrainingConfig) -> dict[str, Any]:
    """The UNet2DModel config training starts from (preset, config, or pretrained model), as an InputError if unreadable."""
    flag, source = model_source_flag(config)
    try:
        return model_config(config.model_preset, source)
    except (OSError, ValueError) as error:
        raise InputError(f"{flag} {source}: no UNet2DModel config could be read "
                         f"({' '.join(str(error).split())})") from None


def resolve_learn_sigma(config: TrainingConfig, unet: dict[str, Any]) -> None:
    """Set an unset --learn_sigma from the model's outputs ([ε, v] is twice its inputs); refuse a mismatch
    that a fresh model cannot absorb (a fresh model with --learn_sigma gets the extra outputs)."""
    flag, source = model_source_flag(config)
    inputs, outputs = unet_channels(unet)
    if outputs not in (inputs, 2 * inputs):
        raise InputError(f"{flag} {source}: the U-Net has {outputs} output channels for {inputs} inputs; a DDPM "
                         f"predicts {inputs} (ε) or, with a learned variance, {2 * inputs} ([ε, v])")
    model_learns_sigma = outputs == 2 * inputs
    if config.learn_sigma is None:
        config.learn_sigma = model_learns_sigma
    elif model_learns_sigma and not config.learn_sigma:
        raise InputError(f"{flag} {source}: the U-Net outputs {outputs} channels, a learned variance ([ε, v]); "
                         "train it with --learn_sigma (or leave the flag unset)")
    elif config.learn_sigma and not model_learns_sigma and config.pretrained_model_name_or_path:
        raise InputError(f"--learn_sigma: the pretrained U-Net of {source} outputs only ε ({outputs} channels) "
                         "and has no weights for v; fine-tune it without --learn_sigma")


def check_resolution(config: TrainingConfig, unet: dict[str, Any]) -> None:
    """The U-Net halves the image at every level but the last, and its up path must meet the
    down path: a model with L levels takes a resolution that is a multiple of 2^(L-1)."""
    source = model_source_flag(config)[1]
    factor = downsampling_factor(unet)
    sizes = config.resolution if config.resolution is not None else unet["sample_size"]
    for size in sizes if isinstance(sizes, (list, tuple)) else [sizes]:
        if size < 1 or size % factor:
            model = f"the {config.model_preset} model" if source is None else f"the model of {source}"
            raise InputError(
                f"--resolution {size} does not fit {model}: its U-Net has {int(math.log2(factor)) + 1} levels, "
                f"so the resolution must be a positive multiple of {factor} (e.g. {max(factor, round(size / factor) * factor)})"
            )
