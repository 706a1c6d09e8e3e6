"""Training options: one dataclass, read from the command line, YAML or JSON.

Defaults are the paper's recipe; flag names are those of diffusers'
`examples/unconditional_image_generation/train_unconditional.py` wherever the
concept is the same. Everything is counted in optimizer steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml
from diffusers.optimization import SchedulerType
from transformers.hf_argparser import string_to_bool

from ..errors import InputError, did_you_mean
from ..files import write_text
from ..hardware import COMPILE_MODES
from ..layout import LOGS_FOLDER
from ..model.unet import PRESETS
from ..sample.sampling import SCHEDULERS
from .fast_defaults import COMPILE_BREAK_EVEN_MICRO_BATCHES

# Fields never written to disk (the saved config is uploaded with the model).
SECRET_FIELDS = ("hub_token",)
# What diffusers' get_scheduler accepts, but for the piecewise-constant schedule, whose step rules
# (as in diffusers' script) no option gives.
LR_SCHEDULERS = tuple(kind.value for kind in SchedulerType if kind is not SchedulerType.PIECEWISE_CONSTANT)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")  # DDPMScheduler's
# (options, test, what the test requires): checked when set (None means "not given").
VALUE_RANGES = (
    (("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "save_images_steps",
      "save_model_steps", "eval_batch_size", "ddpm_num_inference_steps", "ddpm_num_steps", "shuffle_buffer_size",
      "max_train_steps", "num_epochs", "max_train_samples", "checkpoints_total_limit",
      "max_nonfinite_steps"),  # --resolution: see check_resolution
     lambda value: value >= 1, "must be at least 1"),
    (("dataloader_num_workers", "lr_warmup_steps", "adam_weight_decay", "adam_epsilon", "min_image_size",
      "vlb_weight"),
     lambda value: value >= 0, "must be 0 or more"),
    (("learning_rate", "max_grad_norm", "ema_inv_gamma", "ema_power"),
     lambda value: value > 0 and math.isfinite(value), "must be a positive number"),
    (("adam_beta1", "adam_beta2"), lambda value: 0 <= value < 1, "must be at least 0 and below 1"),  # torch's Adam
    (("ema_max_decay", "ema_min_decay"), lambda value: 0 <= value <= 1, "must be between 0 and 1"),
    (("seed",), lambda value: 0 <= value < 2**32, "must be between 0 and 2**32 - 1 (NumPy's range)"),
)
# Fields that act on this invocation only: a saved config reused with --config must not move the run it came
# from aside, nor resume a checkpoint named for it.
ONE_TIME_FIELDS = ("overwrite_output_dir", "resume_from_checkpoint")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


# An Optional[bool] option whose unset value means "decide": HfArgumentParser then wants a value after the
# flag; with these, `--channels_last` alone means true, as for a plain bool (`--channels_last false` still works).
_BARE_FLAG = {"nargs": "?", "const": True}


@dataclass
class TrainingConfig:
    # ---------------------------------------------------------------- model
    model_preset: str = field(
        default="paper128",
        metadata=_help("U-Net preset: paper128 (the paper's ADM U-Net), small32 (CPU demo), tiny16 (tests).",
                       choices=sorted(PRESETS)),
    )
    model_config_name_or_path: Optional[str] = field(
        default=None,
        metadata=_help("A UNet2DModel config (file, model or pipeline folder, Hub id) to use instead of the preset."),
    )
    pretrained_model_name_or_path: Optional[str] = field(
        default=None,
        metadata=_help("Fine-tune these weights instead of training from scratch: a pipeline folder (its unet/), a "
                       "UNet2DModel folder or a Hub repo id, e.g. the output of `lsun-ddpm convert-adm`. "
                       "--resolution may differ from its sample_size."),
    )
    learn_sigma: Optional[bool] = field(
        default=None,
        metadata=_help("Learn the variance Σ_θ as Improved DDPM does: the U-Net outputs [ε, v] (6 channels), the "
                       "loss is the hybrid L_simple + λ·L_vlb and the scheduler is saved with "
                       "variance_type=learned_range. Unset: as the model's output channels say (off for presets).",
                       **_BARE_FLAG),
    )
    vlb_weight: float = field(
        default=0.001, metadata=_help("λ of the hybrid loss (Improved DDPM: 0.001); with --learn_sigma only.")
    )
    # ---------------------------------------------------------------- data
    dataset_name: Optional[str] = field(
        default="pcuenq/lsun-bedrooms", metadata=_help("Hub dataset with the training images.")
    )
    dataset_config_name: Optional[str] = field(default=None, metadata=_help("Config name of the Hub dataset."))
    train_data_dir: Optional[str] = field(
        default=None,
        metadata=_help("A local folder of images (every image at any depth; jpg/png/webp/bmp/gif/tiff) or an "
                       "LSUN LMDB export (a folder holding data.mdb), or a dataset written by `lsun-ddpm prepare` "
                       "(read without decoding). Overrides --dataset_name."),
    )
    image_column: str = field(default="image", metadata=_help("Dataset column holding the images."))
    max_train_samples: Optional[int] = field(
        default=None, metadata=_help("Train on the first N images only (a subset of LSUN, as the paper suggests).")
    )
    streaming: bool = field(
        default=False, metadata=_help("Stream the Hub dataset instead of downloading it (needs --max_train_steps).")
    )
    shuffle_buffer_size: int = field(default=10_000, metadata=_help("Shuffle buffer when streaming."))
    cache_dir: Optional[str] = field(default=None, metadata=_help("Where 🤗 datasets caches downloads."))
    resolution: Optional[int] = field(
        default=None, metadata=_help("Training resolution; default: the model's sample_size (128 for paper128).")
    )
    min_image_size: int = field(
        default=0,
        metadata=_help("Skip (and count) images whose shorter side is below N px; smaller than --resolution, "
                       "they are upscaled with a counted warning."),
    )
    center_crop: bool = field(default=True, metadata=_help("Centre crop (ADM) rather than a random crop."))
    random_flip: bool = field(default=True, metadata=_help("Random horizontal flips (ADM)."))
    dataloader_num_workers: int = field(default=0, metadata=_help("DataLoader worker processes per process."))
    # ---------------------------------------------------------------- optimisation
    output_dir: str = field(default="ddpm-lsun-bedroom-128", metadata=_help("Run folder: pipeline + checkpoints."))
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help("Start a new run in an --output_dir that holds another: the old run is moved aside to "
                       "OUTPUT_DIR.replaced-<UTC time>, not deleted."),
    )
    seed: Optional[int] = field(
        default=None, metadata=_help("Seed for a reproducible run (it also orders the data; unset: order seed 0).")
    )
    train_batch_size: int = field(default=8, metadata=_help("Micro-batch per process (the paper: 8)."))
    gradient_accumulation_steps: int = field(
        default=16, metadata=_help("Micro-batches per optimizer step (the paper: 16, for a batch of 128).")
    )
    num_epochs: Optional[int] = field(
        default=1, metadata=_help("Passes over the data; ignored when --max_train_steps is given.")
    )
    max_train_steps: Optional[int] = field(default=None, metadata=_help("Optimizer steps to train for."))
    learning_rate: float = field(default=3e-4, metadata=_help("Adam learning rate (the paper: 3e-4)."))
    lr_scheduler: str = field(
        default="constant_with_warmup",
        metadata=_help(f"diffusers' lr schedule: {', '.join(LR_SCHEDULERS)}."),
    )
    lr_warmup_steps: int = field(default=500, metadata=_help("Linear warm-up, in optimizer steps."))
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = field(default=0.0, metadata=_help("0 makes AdamW the paper's Adam."))
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping (global norm)."))
    max_nonfinite_steps: int = field(
        default=10,
        metadata=_help("Optimizer steps with a non-finite loss or gradient are skipped; this many in a row stop "
                       "the run with a checkpoint of the last good weights."),
    )
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = field(
        default=None,
        metadata=_help("Autocast precision. Unset: accelerate's config if it asks for bf16 or fp16, else bf16 where "
                       "the device runs it fast (CUDA with bf16, CPUs with AMX/AVX-512-BF16), fp32 elsewhere; "
                       "'no' trains in fp32. Data, noise, loss, Adam and the EMA stay fp32."),
    )
    channels_last: Optional[bool] = field(
        default=None,
        metadata=_help("channels_last memory format. Unset: on with bf16 (measured faster), off in fp32.", **_BARE_FLAG)
    )
    torch_compile: Optional[bool] = field(
        default=None,
        metadata=_help("torch.compile the U-Net. Unset: on for CUDA runs of at least "
                       f"{COMPILE_BREAK_EVEN_MICRO_BATCHES} micro-batches, which repay the minutes of compiling; "
                       "off on a CPU, where it was measured no faster (docs/performance.md). Checkpoints and "
                       "exports are the same either way.", **_BARE_FLAG),
    )
    torch_compile_mode: str = field(
        default="default", metadata=_help(f"torch.compile mode: {', '.join(COMPILE_MODES)}.")
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help("Recompute the U-Net's activations in the backward pass: less memory for a large "
                       "micro-batch on a small GPU, for more time per step (docs/performance.md)."),
    )
    # ---------------------------------------------------------------- diffusion
    ddpm_num_steps: int = field(default=1000, metadata=_help("T, the number of diffusion steps."))
    ddpm_beta_schedule: str = field(
        default="linear", metadata=_help(f"β schedule (the paper: linear 1e-4 → 0.02): {', '.join(BETA_SCHEDULES)}.")
    )
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = field(
        default="epsilon", metadata=_help("What the network predicts (the paper: epsilon).")
    )
    # ---------------------------------------------------------------- EMA
    # The paper samples from an EMA with decay 0.9999. A constant 0.9999 averages
    # over ~10k optimizer steps, so a run of a few thousand steps would still be
    # mostly its random initialisation. diffusers' warm-up, decay_t =
    # 1 - (1 + t/inv_gamma)^-power with power 3/4, averages over ~(1+t)^0.75
    # steps: ~180 at step 1k, ~600 at 5k, ~5.6k at 100k; it reaches 0.9999 at
    # step ~215k. Early runs sample well, long runs get the paper's decay.
    use_ema: bool = field(default=True, metadata=_help("Keep an EMA of the weights and sample/export it."))
    ema_max_decay: float = field(default=0.9999, metadata=_help("The paper's decay; the ramp's ceiling."))
    ema_min_decay: float = 0.0
    ema_use_warmup: bool = field(default=True, metadata=_help("Ramp the decay up (see the comment in config.py)."))
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    # ---------------------------------------------------------------- outputs
    logger: Literal["tensorboard", "wandb", "none"] = field(default="tensorboard")
    logging_dir: str = field(default=LOGS_FOLDER, metadata=_help("TensorBoard folder, inside --output_dir."))
    checkpointing_steps: int = field(default=500, metadata=_help("Save an accelerate checkpoint every N steps."))
    checkpoints_total_limit: Optional[int] = field(
        default=None, metadata=_help("Keep at most N (>= 1) checkpoints; unset: keep all.")
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata=_help('A checkpoint folder, or "latest" in --output_dir.')
    )
    save_images_steps: int = field(default=1000, metadata=_help("Sample a grid from the EMA weights every N steps."))
    save_model_steps: int = field(default=1000, metadata=_help("Export the pipeline folder every N steps."))
    eval_batch_size: int = field(default=16, metadata=_help("Images in each sample grid."))
    eval_scheduler: str = field(
        default="ddpm",
        metadata=_help(f"Sampler of the grids: {', '.join(sorted(SCHEDULERS))} (the paper: ddpm, 1000 steps; "
                       "dpmsolver++ at 25 steps is ~40x faster)."),
    )
    ddpm_num_inference_steps: int = field(default=1000, metadata=_help("Sampling steps for the grids."))
    # ---------------------------------------------------------------- Hub
    push_to_hub: bool = field(default=False, metadata=_help("Upload the pipeline folder at the end."))
    hub_model_id: Optional[str] = field(default=None, metadata=_help("USER/NAME of the model repo."))
    hub_token: Optional[str] = field(default=None, metadata=_help("Token (else HF_TOKEN or the login cache)."))
    hub_private_repo: bool = False
    # Not an option: the options the user gave (command line or --config file) rather than left at their
    # defaults, as `parse_training_config` found them; None when unknown (a config built in code). A resumed
    # run keeps its saved lr schedule unless the user gave one (resuming.resolve_lr_schedule).
    explicit_options: Optional[frozenset] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        """Refuse any value training could not use, before anything runs (HfArgumentParser calls this)."""
        for option in option_fields():
            setattr(self, option.name, coerce_option(f"--{option.name}", getattr(self, option.name),
                                                     option_types()[option.name]))
        self._check_ranges()
        _check_choice("--model_preset", self.model_preset, sorted(PRESETS))
        _check_choice("--lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _check_choice("--ddpm_beta_schedule", self.ddpm_beta_schedule, BETA_SCHEDULES)
        _check_choice("--torch_compile_mode", self.torch_compile_mode, COMPILE_MODES)
        _check_choice("--eval_scheduler", self.eval_scheduler, sorted(SCHEDULERS))
        if self.max_train_steps is None and self.num_epochs is None:
            raise InputError("give --max_train_steps or --num_epochs")
        if self.streaming and self.max_train_steps is None:
            raise InputError("a streamed dataset has no length: give --max_train_steps")
        if self.train_data_dir is None and self.dataset_name is None:
            raise InputError("give --dataset_name or --train_data_dir")
        if self.pretrained_model_name_or_path and self.model_config_name_or_path:
            raise InputError("give --pretrained_model_name_or_path (its weights and config) or "
                             "--model_config_name_or_path (a config to train from scratch), not both")
        self._check_hub_model_id()

    def _check_ranges(self) -> None:
        for names, is_valid, requirement in VALUE_RANGES:
            for name in names:
                self._check(name, is_valid, requirement)
        self._check("ema_min_decay", lambda value: value <= self.ema_max_decay, "must not exceed --ema_max_decay")
        self._check("ddpm_num_inference_steps", lambda value: value <= self.ddpm_num_steps,
                    f"must not exceed --ddpm_num_steps ({self.ddpm_num_steps})")

    def _check(self, name: str, is_valid, requirement: str) -> None:
        """Raise an InputError naming `--name` unless it is unset (None) or `is_valid(value)`."""
        value = getattr(self, name)
        if value is not None and not is_valid(value):
            raise InputError(f"--{name} {requirement}, got {value}")

    def _check_hub_model_id(self) -> None:
        """Check the repo id now, not after hours of training; by default it is the --output_dir folder's name."""
        from ..repo_ids import check_repo_id

        if self.hub_model_id is not None:
            check_repo_id(self.hub_model_id, "--hub_model_id")
        elif self.push_to_hub:
            self.hub_model_id = check_repo_id(self._default_hub_model_id(),
                                              "--hub_model_id (by default the --output_dir folder's name)")

    def _default_hub_model_id(self) -> str:
        return os.path.basename(os.path.normpath(self.output_dir))

    def to_dict(self, include_secrets: bool = False) -> dict[str, Any]:
        values = {option.name: getattr(self, option.name) for option in option_fields()}
        if not include_secrets:
            for name in SECRET_FIELDS:
                values.pop(name, None)
        return values

    def save(self, path: str) -> None:
        """Write the resolved configuration (no secrets, no one-time flags) as YAML, reusable with --config."""
        values = {name: value for name, value in self.to_dict().items() if name not in ONE_TIME_FIELDS}
        if values["hub_model_id"] == self._default_hub_model_id():  # reused for another --output_dir, it follows it
            values["hub_model_id"] = None
        write_text(yaml.safe_dump(values, sort_keys=False), path)  # a crash never leaves half a config


def option_fields() -> tuple[dataclasses.Field, ...]:
    """The fields of TrainingConfig that are options (flags and config keys)."""
    return tuple(option for option in dataclasses.fields(TrainingConfig) if option.init)


@functools.cache
def option_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainingConfig)


def coerce_option(label: str, value: Any, hint: Any) -> Any:
    """`value` as the type `hint` of an option (a string converted as its flag would be), or an InputError
    naming `label`. Whole numbers stay whole: 2.5 is no step count."""
    optional = type(None) in typing.get_args(hint)
    if optional:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if value is None:
        if optional:
            return None
        raise InputError(f"{label} needs a value, got none")
    if typing.get_origin(hint) is Literal:
        choices = [str(choice) for choice in typing.get_args(hint)]
        _check_choice(label, value, choices)
        return value
    try:
        return _CONVERTERS[hint](value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise InputError(f"{label} must be {_KIND_NAMES[hint]}, got {value!r}") from None


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(value)
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    return float(value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise TypeError(value)
    return string_to_bool(value)


def _to_str(value: Any) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):  # `output_dir: 2024` is a name
        raise TypeError(value)
    return str(value)


_CONVERTERS = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}
_KIND_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "a text value"}


def _check_choice(label: str, value: Any, choices) -> None:
    if value not in choices:
        raise InputError(f"{label} must be one of {', '.join(choices)}, got {value!r}"
                         f"{did_you_mean(str(value), choices)}")
