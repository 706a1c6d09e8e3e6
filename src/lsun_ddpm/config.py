"""Training options: one dataclass, read from the command line, YAML or JSON.

Defaults are the paper's recipe; flag names are those of diffusers'
`examples/unconditional_image_generation/train_unconditional.py` wherever the
concept is the same. Everything is counted in optimizer steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml
from transformers import HfArgumentParser

from .models import PRESETS

# Fields never written to disk (the saved config is uploaded with the model).
SECRET_FIELDS = ("hub_token",)
# Fields that act on this invocation only: a saved config reused with --config must not
# move the run it came from aside.
ONE_TIME_FIELDS = ("overwrite_output_dir",)


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


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
    # ---------------------------------------------------------------- data
    dataset_name: Optional[str] = field(
        default="pcuenq/lsun-bedrooms", metadata=_help("Hub dataset with the training images.")
    )
    dataset_config_name: Optional[str] = field(default=None, metadata=_help("Config name of the Hub dataset."))
    train_data_dir: Optional[str] = field(
        default=None,
        metadata=_help("A local folder of images (every image at any depth; jpg/png/webp/bmp/gif/tiff) or an "
                       "LSUN LMDB export (a folder holding data.mdb). Overrides --dataset_name."),
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
        metadata=_help("diffusers.optimization.get_scheduler name: constant_with_warmup, cosine, linear, ..."),
    )
    lr_warmup_steps: int = field(default=500, metadata=_help("Linear warm-up, in optimizer steps."))
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = field(default=0.0, metadata=_help("0 makes AdamW the paper's Adam."))
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping (global norm)."))
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = field(
        default=None, metadata=_help("Autocast precision; default: accelerate's config. Data, noise, loss stay fp32.")
    )
    channels_last: bool = field(default=False, metadata=_help("channels_last memory format (faster with bf16)."))
    # ---------------------------------------------------------------- diffusion
    ddpm_num_steps: int = field(default=1000, metadata=_help("T, the number of diffusion steps."))
    ddpm_beta_schedule: str = field(default="linear", metadata=_help("β schedule (the paper: linear 1e-4 → 0.02)."))
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
    logging_dir: str = field(default="logs", metadata=_help("TensorBoard folder, inside --output_dir."))
    checkpointing_steps: int = field(default=500, metadata=_help("Save an accelerate checkpoint every N steps."))
    checkpoints_total_limit: Optional[int] = field(default=None, metadata=_help("Keep at most N checkpoints."))
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata=_help('A checkpoint folder, or "latest" in --output_dir.')
    )
    save_images_steps: int = field(default=1000, metadata=_help("Sample a grid from the EMA weights every N steps."))
    save_model_steps: int = field(default=1000, metadata=_help("Export the pipeline folder every N steps."))
    eval_batch_size: int = field(default=16, metadata=_help("Images in each sample grid."))
    ddpm_num_inference_steps: int = field(default=1000, metadata=_help("Sampling steps for the grids."))
    # ---------------------------------------------------------------- Hub
    push_to_hub: bool = field(default=False, metadata=_help("Upload the pipeline folder at the end."))
    hub_model_id: Optional[str] = field(default=None, metadata=_help("USER/NAME of the model repo."))
    hub_token: Optional[str] = field(default=None, metadata=_help("Token (else HF_TOKEN or the login cache)."))
    hub_private_repo: bool = False

    def __post_init__(self):
        positive = ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                    "save_images_steps", "save_model_steps", "eval_batch_size", "ddpm_num_inference_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_train_steps is None and self.num_epochs is None:
            raise ValueError("give --max_train_steps or --num_epochs")
        if self.streaming and self.max_train_steps is None:
            raise ValueError("a streamed dataset has no length: give --max_train_steps")
        if self.train_data_dir is None and self.dataset_name is None:
            raise ValueError("give --dataset_name or --train_data_dir")
        if self.push_to_hub and self.hub_model_id is None:
            self.hub_model_id = os.path.basename(os.path.normpath(self.output_dir))

    def to_dict(self, include_secrets: bool = False) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if not include_secrets:
            for name in SECRET_FIELDS:
                values.pop(name, None)
        return values

    def save(self, path: str) -> None:
        """Write the resolved configuration (no secrets, no one-time flags) as YAML, reusable with --config."""
        values = {name: value for name, value in self.to_dict().items() if name not in ONE_TIME_FIELDS}
        with open(path, "w") as file:
            yaml.safe_dump(values, file, sort_keys=False)


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON file of TrainingConfig fields; unknown keys are an error."""
    with open(path) as file:
        values = json.load(file) if path.endswith(".json") else yaml.safe_load(file)
    values = values or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}")
    return values


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser(TrainingConfig, description="Train the paper's DDPM with 🤗 accelerate.")
    parser.add_argument("--config", help="YAML or JSON file of options; flags given on the command line win.")
    return parser


def parse_training_config(argv: list[str] | None = None, defaults: dict[str, Any] | None = None) -> TrainingConfig:
    """Parse `--config FILE` and flags; command-line flags override the file,
    which overrides `defaults` (a command's own defaults, e.g. the demo's).

    `HfArgumentParser.parse_yaml_file` cannot merge flags, so the file's values
    become the parser's defaults and the command line is parsed on top.
    """
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config")
    config_file = pre_parser.parse_known_args(argv)[0].config

    parser = make_parser()
    parser.set_defaults(**(defaults or {}))
    if config_file:
        parser.set_defaults(**_typed_defaults(parser, read_config_file(config_file)))
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)[0]


def _typed_defaults(parser: argparse.ArgumentParser, values: dict[str, Any]) -> dict[str, Any]:
    """Convert file values the way the command line would (YAML reads `3e-4` as a string)."""
    actions = {action.dest: action for action in parser._actions}
    typed = {}
    for name, value in values.items():
        convert = actions[name].type
        typed[name] = convert(value) if isinstance(value, str) and callable(convert) else value
    return typed
