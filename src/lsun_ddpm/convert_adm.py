"""An OpenAI guided-diffusion (ADM) checkpoint → a stock diffusers `DDPMPipeline` folder.

guided-diffusion's `UNetModel` is, layer for layer, a `UNet2DModel` with the
configuration `models.adm_config` builds; converting it is renaming its
tensors and splitting each attention block's fused qkv convolution into
`to_q`/`to_k`/`to_v`. What the tensors say (widths, depth, attention levels,
learned Σ, resampling and time conditioning) is read from them; flags given
as guided-diffusion spells them are checked against them, and what a stock
`UNet2DModel` cannot express is refused. tests/test_convert_adm.py checks the
converted network against an independent forward pass of ADM.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from .diffusion import LEARNED_VARIANCE, make_noise_scheduler
from .errors import InputError
from .export import check_output_folder, file_sha256, replace_path
from .layout import (CARD_FILE, CARD_MODEL_ID_PLACEHOLDER, CONVERSION_FILE, MODEL_INDEX, SCHEDULER, UNET,
                     is_conversion)
from .models import adm_config

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

# guided-diffusion's model_and_diffusion_defaults(): the value of every flag that is not given.
ADM_MODEL_DEFAULTS: dict[str, Any] = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "num_head_channels": -1, "attention_resolutions": "16,8", "channel_mult": "", "dropout": 0.0,
    "class_cond": False, "use_checkpoint": False, "use_scale_shift_norm": True, "resblock_updown": False,
    "use_fp16": False, "use_new_attention_order": False,
}
ADM_DIFFUSION_DEFAULTS: dict[str, Any] = {
    "learn_sigma": False, "diffusion_steps": 1000, "noise_schedule": "linear", "timestep_respacing": "",
    "use_kl": False, "predict_xstart": False, "rescale_timesteps": False, "rescale_learned_sigmas": False,
}
ADM_DEFAULTS = {**ADM_MODEL_DEFAULTS, **ADM_DIFFUSION_DEFAULTS}
# Flags whose value the tensors fix: left out, they are read from the checkpoint, not defaulted.
INFERRED_FLAGS = ("num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "learn_sigma",
                  "class_cond", "resblock_updown", "use_scale_shift_norm")
# guided-diffusion's channel_mult for an empty --channel_mult, by --image_size.
DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
NOISE_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # guided-diffusion → DDPMScheduler
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "ema", "ema_model")
# Everything a conversion writes: the DDPMPipeline folder (its model_index.json and components), the card and
# the record. A previous conversion holding anything else (evaluation.json, a user's notes) is not replaced.
CONVERSION_ENTRIES = frozenset({MODEL_INDEX, UNET, SCHEDULER, CARD_FILE, CONVERSION_FILE})
CARD_TEMPLATE = Path(__file__).with_name("adm_model_card_template.md")
LICENSE = "mit"  # guided-diffusion's code and released checkpoints
SOURCE_URL = "https://github.com/openai/guided-diffusion"
DOWNLOAD_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/{name}"
PAPER_URL = "https://arxiv.org/abs/2105.05233"

# ADM ResBlock sub-layer → diffusers ResnetBlock2D sub-layer.
RESNET_LAYERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


@dataclass(frozen=True)
class PublishedResult:
    """A released checkpoint's published sample quality, as guided-diffusion's README and the ADM paper give it."""

    dataset: str
    fid: float | None = None
    precision: float | None = None
    recall: float | None = None
    note: str = ""


_HORSE_NOTE = ("guided-diffusion's README reports LSUN Horse FID 2.57 (precision 0.71, recall 0.55) without "
               "saying which of its two horse checkpoints (lsun_horse.pt, lsun_horse_nodropout.pt) that is")
# Only numbers that guided-diffusion's README ("Results") and the ADM paper give for one named file.
PUBLISHED_RESULTS = {
    "lsun_bedroom.pt": PublishedResult("LSUN Bedroom 256×256", 1.90, 0.66, 0.51),
    "lsun_cat.pt": PublishedResult("LSUN Cat 256×256", 5.57, 0.63, 0.52),
    "lsun_horse.pt": PublishedResult("LSUN Horse 256×256", note=_HORSE_NOTE),
    "lsun_horse_nodropout.pt": PublishedResult("LSUN Horse 256×256", note=_HORSE_NOTE),
}


# ---------------------------------------------------------------- flags


def str2bool(value: str) -> bool:
    """guided-diffusion's spelling of booleans on the command line: True/False, yes/no, t/f, y/n, 1/0."""
    lowered = value.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def add_adm_flags(parser: argparse.ArgumentParser) -> None:
    """guided-diffusion's model and diffusion flags (MODEL_FLAGS, DIFFUSION_FLAGS), spelt and typed as its
    scripts take them. Each defaults to None, so that a flag that was given can be told from one that was not."""
    model = parser.add_argument_group(
        "guided-diffusion's model flags (paste MODEL_FLAGS; left out: read from the checkpoint where the "
        "tensors say it, else guided-diffusion's default)")
    diffusion = parser.add_argument_group("guided-diffusion's diffusion flags (paste DIFFUSION_FLAGS)")
    notes = {
        "image_size": "not stored in the tensors; default: the size whose default channel_mult the checkpoint "
                      "has, else 64",
        "channel_mult": "comma-separated, e.g. 1,1,2,2,4,4; empty: guided-diffusion's default for --image_size",
        "attention_resolutions": "comma-separated pixel sizes, e.g. 32,16,8",
        "use_new_attention_order": "the qkv layout: False (legacy, lsun_bedroom.pt) splits heads before q/k/v, "
                                   "True splits q/k/v first; the tensors cannot tell the two apart",
        "use_fp16": "accepted; the weights are written as the checkpoint stores them (fp32)",
        "use_checkpoint": "accepted; gradient checkpointing does not change the weights",
        "noise_schedule": "linear or cosine",
        "timestep_respacing": "accepted; a sampling choice: pass num_inference_steps to the pipeline instead",
        "use_kl": "accepted; a training loss, nothing to convert",
        "rescale_learned_sigmas": "accepted; a training loss, nothing to convert",
        "rescale_timesteps": "only with --diffusion_steps 1000 (a stock UNet2DModel takes the timestep as is)",
        "predict_xstart": "the network predicts x0 (prediction_type='sample') instead of the noise",
    }
    for name, default in ADM_DEFAULTS.items():
        group = model if name in ADM_MODEL_DEFAULTS else diffusion
        kind = str2bool if isinstance(default, bool) else type(default)
        shown = f"{default!r}" if isinstance(default, str) else f"{default}"
        help_text = "; ".join(filter(None, [notes.get(name), f"guided-diffusion's default: {shown}"]))
        if name in INFERRED_FLAGS:
            help_text += " (read from the checkpoint when left out)"
        metavar = {str2bool: "True|False", int: "N", float: "P"}.get(
            kind, "STEPS" if name == "timestep_respacing" else "LIST")
        choices = tuple(NOISE_SCHEDULES) if name == "noise_schedule" else None
        group.add_argument(f"--{name}", type=kind, default=None, metavar=None if choices else metavar, choices=choices,
                           help=help_text)


def given_adm_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The guided-diffusion flags that were given on the command line (`add_adm_flags`), by name."""
    return {name: getattr(args, name) for name in ADM_DEFAULTS if getattr(args, name, None) is not None}


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """"32,16,8" → (32, 16, 8); an InputError naming `flag` for anything else."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--{flag} {text!r} must be comma-separated whole numbers, e.g. 32,16,8") from None
    if any(value < 1 for value in values):
        raise InputError(f"--{flag} {text!r} must hold positive numbers only")
    return values


def _format_list(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


# ---------------------------------------------------------------- loading


def load_adm_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a guided-diffusion checkpoint, loaded without running any code it may carry.

    A `.pt` file is a pickle, and unpickling can run code: `weights_only=True`
    lets torch rebuild tensors and plain containers only, and anything else is
    refused before it runs. A state dict nested under a usual key ("state_dict",
    "model", "ema", ...) is taken when it holds tensors only.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"CHECKPOINT {str(path)!r} is not a file: give the .pt file downloaded from guided-diffusion")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found:
            raise InputError(f"{path.name} holds more than tensors (it would call {found.group(1)} when unpickled, "
                             "which can run any code), so it was refused unread; convert only a plain state dict "
                             "from a source you trust") from None
        raise InputError(f"{path.name} did not load as tensors only (it is no PyTorch checkpoint, or it holds "
                         "objects torch will not unpickle safely), so it was refused: give guided-diffusion's .pt "
                         "file, downloaded again if need be") from None
    except (RuntimeError, EOFError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else "empty file"
        raise InputError(f"{path.name} is not a readable PyTorch checkpoint ({type(error).__name__}: {reason}); "
                         "download it again") from None
    return _tensors_only(_unwrap_state_dict(loaded, path.name), path.name)


def _unwrap_state_dict(loaded: Any, name: str) -> Any:
    if not isinstance(loaded, dict):
        raise InputError(f"{name} holds a {type(loaded).__name__}, not a state dict: give a U-Net's state dict")
    if "time_embed.0.weight" not in loaded:
        for key in STATE_DICT_KEYS:
            if isinstance(loaded.get(key), dict):
                return loaded[key]
    return loaded


def _tensors_only(state_dict: dict, name: str) -> dict[str, torch.Tensor]:
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InputError(f"{name} is not a plain state dict: {key!r} holds a {type(value).__name__}, not a "
                             "tensor; give the U-Net's state dict (guided-diffusion saves one)")
    return state_dict


# ---------------------------------------------------------------- what the tensors say


@dataclass(frozen=True)
class ADMArchitecture:
    """What a guided-diffusion `UNetModel` state dict fixes about the network."""

    num_channels: int  # model_channels: the width of the timestep features
    in_channels: int
    out_channels: int  # 6 with learned Σ
    stem_channels: int  # conv_in's output: channel_mult[0] × num_channels
    channel_mult: tuple[float, ...]
    num_res_blocks: int
    attention_levels: tuple[int, ...]  # levels (0 = full size) with self-attention
    resblock_updown: bool | None  # None: one level, nothing is resampled
    use_scale_shift_norm: bool
    class_cond: bool

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(int(m * self.num_channels) for m in self.channel_mult)


def _require(state_dict: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise InputError(f"the checkpoint has no tensor {key!r}, so it is not a guided-diffusion UNetModel "
                         "(a classifier or another network?): give a diffusion model's checkpoint")
    return state_dict[key]


def _block_count(state_dict: dict[str, torch.Tensor], name: str) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := re.match(rf"{name}\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def _is_upsampling_block(state_dict: dict[str, torch.Tensor], index: int) -> bool:
    """Whether output block `index` ends its level: a layer after the ResBlock (and attention) that resamples."""
    prefix = f"output_blocks.{index}."
    return any(re.match(rf"{re.escape(prefix)}[12]\.(in_layers\.0\.weight|conv\.weight)$", key) for key in state_dict)


def infer_architecture(state_dict: dict[str, torch.Tensor]) -> ADMArchitecture:
    """Widths, depth, attention levels, resampling, time conditioning and classes, read from the tensors."""
    num_channels = _require(state_dict, "time_embed.0.weight").shape[1]
    stem = _require(state_dict, "input_blocks.0.0.weight")
    out = _require(state_dict, "out.2.weight")
    _require(state_dict, "middle_block.1.qkv.weight")
    outputs = _block_count(state_dict, "output_blocks")
    ups = [i for i in range(outputs) if _is_upsampling_block(state_dict, i)]
    per_level = ups[0] + 1 if ups else outputs  # num_res_blocks + 1 output blocks per level
    levels = outputs // per_level if per_level else 0
    if levels == 0 or outputs % per_level or _block_count(state_dict, "input_blocks") != outputs:
        raise InputError("the checkpoint's input_blocks/output_blocks do not form a guided-diffusion UNetModel: "
                         "give a diffusion model's checkpoint")
    num_res_blocks = per_level - 1
    first_block = [1 + level * per_level for level in range(levels)]  # input block of each level's first ResBlock
    channels = [_require(state_dict, f"input_blocks.{i}.0.in_layers.2.weight").shape[0] for i in first_block]
    emb_width = _require(state_dict, "input_blocks.1.0.emb_layers.1.weight").shape[0]
    # The layer after the ResBlock (and attention) that upsamples: a ResBlock (resblock_updown) or a conv.
    updown = None
    if ups:
        updown = any(re.match(rf"output_blocks\.{ups[0]}\.[12]\.in_layers\.0\.weight$", key) for key in state_dict)
    return ADMArchitecture(
        num_channels=num_channels,
        in_channels=stem.shape[1],
        out_channels=out.shape[0],
        stem_channels=stem.shape[0],
        channel_mult=tuple(c / num_channels if c % num_channels else c // num_channels for c in channels),
        num_res_blocks=num_res_blocks,
        attention_levels=tuple(level for level, i in enumerate(first_block)
                               if f"input_blocks.{i}.1.qkv.weight" in state_dict),
        resblock_updown=updown,
        use_scale_shift_norm=emb_width == 2 * channels[0],
        class_cond="label_emb.weight" in state_dict,
    )


# ---------------------------------------------------------------- flags against tensors


def _mismatch(flag: str, value: Any, evidence: str, fix: str) -> InputError:
    shown = value if not isinstance(value, str) else value or '""'
    return InputError(f"--{flag} {shown} does not match the checkpoint ({evidence}); {fix}")


def _check_given(given: dict[str, Any], flag: str, actual: Any, evidence: str) -> None:
    if flag in given and given[flag] != actual:
        raise _mismatch(flag, given[flag], evidence, f"give --{flag} {actual} or leave it out")


def _default_image_size(architecture: ADMArchitecture) -> int:
    """The image size whose default channel_mult the checkpoint has (guided-diffusion's flags build it), else 64."""
    matching = [size for size, mult in DEFAULT_CHANNEL_MULT.items() if mult == architecture.channel_mult]
    return matching[0] if matching else ADM_DEFAULTS["image_size"]


def _attention_levels(resolutions: tuple[int, ...], image_size: int, num_levels: int) -> tuple[int, ...]:
    """The levels guided-diffusion gives attention: those whose downsampling rate image_size // res names."""
    rates = {image_size // resolution for resolution in resolutions}
    return tuple(level for level in range(num_levels) if 2**level in rates)


def resolve_adm_flags(architecture: ADMArchitecture, given: dict[str, Any]) -> dict[str, Any]:
    """Every guided-diffusion flag's value: given ones checked against the tensors, the tensors' for those
    left out that they fix, guided-diffusion's defaults for the rest. An InputError names a flag that does not fit."""
    unknown = sorted(set(given) - set(ADM_DEFAULTS))
    if unknown:
        raise InputError(f"unknown guided-diffusion flag --{unknown[0]}")
    arch = architecture
    flags = {**ADM_DEFAULTS, **given}
    levels = len(arch.channel_mult)
    if arch.stem_channels == arch.num_channels:
        _check_given(given, "num_channels", arch.num_channels,
                     f"input_blocks.0.0.weight has {arch.stem_channels} output channels")
    else:
        _check_given(given, "num_channels", arch.num_channels,
                     f"time_embed.0.weight takes {arch.num_channels} channels")
    flags["num_channels"] = arch.num_channels
    _check_given(given, "num_res_blocks", arch.num_res_blocks,
                 f"it has {arch.num_res_blocks} residual blocks per level ({len(arch.channel_mult)} levels)")
    flags["num_res_blocks"] = arch.num_res_blocks
    _check_given(given, "learn_sigma", arch.out_channels == 6, f"out.2.weight has {arch.out_channels} output channels")
    flags["learn_sigma"] = arch.out_channels == 6
    _check_given(given, "class_cond", arch.class_cond,
                 "it has a label_emb.weight" if arch.class_cond else "it has no label_emb.weight")
    flags["class_cond"] = arch.class_cond
    _check_given(given, "use_scale_shift_norm", arch.use_scale_shift_norm,
                 "input_blocks.1.0.emb_layers.1 gives "
                 + ("a scale and a shift per channel" if arch.use_scale_shift_norm else "one value per channel"))
    flags["use_scale_shift_norm"] = arch.use_scale_shift_norm
    if arch.resblock_updown is not None:
        _check_given(given, "resblock_updown", arch.resblock_updown,
                     "it resamples with " + ("residual blocks" if arch.resblock_updown else "convolutions"))
        flags["resblock_updown"] = arch.resblock_updown

    image_size = flags["image_size"] = given.get("image_size", _default_image_size(arch))
    if image_size < 2 ** (levels - 1) or image_size % 2 ** (levels - 1):
        raise InputError(f"--image_size {image_size} does not fit the checkpoint's {levels} levels: it must be a "
                         f"multiple of {2 ** (levels - 1)}, e.g. 256 for guided-diffusion's LSUN models")
    mult_text = _format_list(arch.channel_mult)
    if given.get("channel_mult"):
        if tuple(float(m) for m in parse_int_list(given["channel_mult"], "channel_mult")) != arch.channel_mult:
            raise _mismatch("channel_mult", given["channel_mult"], f"its levels have {mult_text} × num_channels "
                            "channels", f"give --channel_mult {mult_text} or leave it out")
    elif "image_size" in given and DEFAULT_CHANNEL_MULT.get(image_size, arch.channel_mult) != arch.channel_mult:
        raise _mismatch("image_size", image_size, f"guided-diffusion's default channel_mult at {image_size} px is "
                        f"{_format_list(DEFAULT_CHANNEL_MULT[image_size])}, the checkpoint's is {mult_text}",
                        f"add --channel_mult {mult_text}")
    flags["channel_mult"] = mult_text

    inferred_resolutions = ",".join(str(image_size // 2**level) for level in arch.attention_levels)
    if "attention_resolutions" in given:
        resolutions = parse_int_list(given["attention_resolutions"], "attention_resolutions")
        if _attention_levels(resolutions, image_size, levels) != arch.attention_levels:
            raise _mismatch("attention_resolutions", given["attention_resolutions"],
                            f"at --image_size {image_size} it has attention at {inferred_resolutions or 'no'} px",
                            f"give --attention_resolutions {inferred_resolutions} or leave it out")
    flags["attention_resolutions"] = given.get("attention_resolutions", inferred_resolutions)
    _check_counts(flags)
    return flags


def _check_counts(flags: dict[str, Any]) -> None:
    if flags["num_heads"] < 1:
        raise InputError(f"--num_heads must be at least 1, got {flags['num_heads']}")
    for name in ("num_head_channels", "num_heads_upsample"):
        if flags[name] != -1 and flags[name] < 1:
            raise InputError(f"--{name} must be -1 (unset) or at least 1, got {flags[name]}")
    if flags["diffusion_steps"] < 1:
        raise InputError(f"--diffusion_steps must be at least 1, got {flags['diffusion_steps']}")
    if not 0 <= flags["dropout"] < 1:
        raise InputError(f"--dropout must be in [0, 1), got {flags['dropout']}")


def attention_head_width(architecture: ADMArchitecture, flags: dict[str, Any]) -> int:
    """Channels per attention head, the one width a `UNet2DModel` uses in every attention block.

    guided-diffusion fixes either the width (--num_head_channels) or the
    number of heads (--num_heads, --num_heads_upsample in the decoder), which
    gives a width per level; a stock `UNet2DModel` needs them all equal.
    """
    channels = architecture.level_channels
    layers = [("down", channels[level]) for level in architecture.attention_levels]
    layers += [("middle", channels[-1])] + [("up", channels[level]) for level in architecture.attention_levels]
    if flags["num_head_channels"] != -1:
        width = flags["num_head_channels"]
        for _, layer_channels in layers:
            if layer_channels % width:
                raise InputError(f"--num_head_channels {width} does not divide the checkpoint's {layer_channels}-"
                                 "channel attention blocks: give the value the checkpoint was trained with")
        return width
    upsample_heads = flags["num_heads_upsample"] if flags["num_heads_upsample"] != -1 else flags["num_heads"]
    widths = {}
    for place, layer_channels in layers:
        heads = upsample_heads if place == "up" else flags["num_heads"]
        flag = "--num_heads_upsample" if place == "up" and flags["num_heads_upsample"] != -1 else "--num_heads"
        if layer_channels % heads:
            raise InputError(f"{flag} {heads} does not divide the checkpoint's {layer_channels}-channel attention "
                             "blocks: give the value the checkpoint was trained with")
        widths[layer_channels // heads] = (flag, heads, layer_channels)
    if len(widths) > 1:
        described = ", ".join(f"{w} at {c} channels" for w, (_, _, c) in sorted(widths.items()))
        flag, heads, _ = next(iter(widths.values()))
        raise InputError(f"{flag} {heads} gives attention heads of different widths ({described} per head), and a "
                         "stock UNet2DModel uses one width everywhere: this checkpoint cannot be converted (models "
                         "trained with --num_head_channels can)")
    return next(iter(widths))


def check_convertible(architecture: ADMArchitecture, flags: dict[str, Any]) -> None:
    """An InputError for what a stock `UNet2DModel` + `DDPMPipeline` cannot express."""
    arch = architecture
    if arch.class_cond:
        raise InputError("the checkpoint is class-conditional (--class_cond True, label_emb.weight): a stock "
                         "DDPMPipeline has no class labels; convert an unconditional model such as lsun_bedroom.pt")
    if arch.in_channels != 3:
        raise InputError(f"the checkpoint takes {arch.in_channels} input channels (input_blocks.0.0.weight), not an "
                         "RGB image: an upsampler needs its low-resolution image, which a stock DDPMPipeline "
                         "cannot give")
    if arch.out_channels not in (3, 6):
        raise InputError(f"the checkpoint predicts {arch.out_channels} channels (out.2.weight), not 3 (ε) or "
                         "6 (ε and Σ)")
    if arch.stem_channels != arch.num_channels:
        raise InputError(f"--channel_mult starts at {arch.channel_mult[0]:g}: a stock UNet2DModel's first level is "
                         "as wide as its timestep features, so this checkpoint cannot be converted")
    if flags["rescale_timesteps"] and flags["diffusion_steps"] != 1000:
        raise InputError(f"--rescale_timesteps True with --diffusion_steps {flags['diffusion_steps']} feeds the "
                         "network t × 1000 / T, which a stock UNet2DModel does not: this cannot be converted")


# ---------------------------------------------------------------- the diffusers components


def adm_unet_config(architecture: ADMArchitecture, flags: dict[str, Any], head_width: int) -> dict[str, Any]:
    """The `UNet2DModel` config of the checkpoint (`models.adm_config` with its widths and choices)."""
    arch = architecture
    return adm_config(
        flags["image_size"], arch.level_channels,
        attention_resolutions=tuple(flags["image_size"] // 2**level for level in arch.attention_levels),
        layers_per_block=arch.num_res_blocks, attention_head_dim=head_width, dropout=flags["dropout"],
        out_channels=arch.out_channels, resblock_updown=bool(arch.resblock_updown),
        use_scale_shift_norm=arch.use_scale_shift_norm,
    )


def adm_scheduler(flags: dict[str, Any]) -> DDPMScheduler:
    """guided-diffusion's noise schedule as a `DDPMScheduler` (`diffusion.make_noise_scheduler`).

    Its linear schedule is scaled by 1000/T so that any T keeps the endpoints'
    noise levels: β from 1e-4·scale to 0.02·scale. Without learned Σ it samples
    with σ² = β ("fixed_large"): its create_gaussian_diffusion never sets sigma_small.
    """
    steps = flags["diffusion_steps"]
    scheduler = make_noise_scheduler(
        steps, NOISE_SCHEDULES[flags["noise_schedule"]], "sample" if flags["predict_xstart"] else "epsilon",
        variance_type=LEARNED_VARIANCE if flags["learn_sigma"] else "fixed_large",
    )
    if flags["noise_schedule"] == "linear" and steps != 1000:
        scale = 1000 / steps
        scheduler = DDPMScheduler.from_config(scheduler.config, beta_start=1e-4 * scale, beta_end=0.02 * scale)
    return scheduler


def _split_qkv(tensor: torch.Tensor, heads: int, legacy: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v of a fused (3C, ...) qkv weight or bias.

    Legacy order (QKVAttentionLegacy): the 3C outputs are `heads` groups of
    [q, k, v] of one head each. New order (QKVAttention): [q, k, v] of all heads.
    """
    rest = tensor.shape[1:]
    channels = tensor.shape[0] // 3
    if legacy:
        grouped = tensor.reshape(heads, 3, channels // heads, *rest)
        return tuple(grouped[:, part].reshape(channels, *rest) for part in range(3))
    return tuple(tensor.reshape(3, channels, *rest).unbind(0))


def _layer_pairs(architecture: ADMArchitecture) -> list[tuple[str, str, str]]:
    """(guided-diffusion module, diffusers module, kind) for every layer, walking both U-Nets in step.

    Kinds: "plain" (weight and bias as they are), "resnet" (a ResBlock),
    "attention" (an AttentionBlock). A level's downsampler is its own input
    block in ADM and the last module of the level's block in diffusers.
    """
    arch = architecture
    levels = len(arch.channel_mult)
    resample = "resnet" if arch.resblock_updown else "plain"
    pairs = [("time_embed.0", "time_embedding.linear_1", "plain"), ("time_embed.2", "time_embedding.linear_2", "plain"),
             ("input_blocks.0.0", "conv_in", "plain")]
    block = 1
    for level in range(levels):
        for j in range(arch.num_res_blocks):
            pairs.append((f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if level in arch.attention_levels:
                pairs.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}", "attention"))
            block += 1
        if level < levels - 1:
            suffix = ("", "") if arch.resblock_updown else (".op", ".conv")
            pairs.append((f"input_blocks.{block}.0{suffix[0]}", f"down_blocks.{level}.downsamplers.0{suffix[1]}",
                          resample))
            block += 1
    pairs += [("middle_block.0", "mid_block.resnets.0", "resnet"),
              ("middle_block.1", "mid_block.attentions.0", "attention"),
              ("middle_block.2", "mid_block.resnets.1", "resnet")]
    block = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(arch.num_res_blocks + 1):
            pairs.append((f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{j}", "resnet"))
            layer = 1
            if level in arch.attention_levels:
                pairs.append((f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{j}", "attention"))
                layer = 2
            if level > 0 and j == arch.num_res_blocks:
                suffix = "" if arch.resblock_updown else ".conv"
                pairs.append((f"output_blocks.{block}.{layer}{suffix}", f"up_blocks.{up}.upsamplers.0{suffix}",
                              resample))
            block += 1
    return pairs + [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]


def _take(state_dict: dict[str, torch.Tensor], key: str, used: set[str]) -> torch.Tensor:
    if key not in state_dict:
        raise InputError(f"the checkpoint has no tensor {key!r}, which a guided-diffusion UNetModel with these flags "
                         "has: check the flags against the checkpoint's (MODEL_FLAGS)")
    used.add(key)
    return state_dict[key]


def _rename(state_dict: dict[str, torch.Tensor], source: str, target: str, out: dict[str, torch.Tensor],
            used: set[str]) -> None:
    for parameter in ("weight", "bias"):
        out[f"{target}.{parameter}"] = _take(state_dict, f"{source}.{parameter}", used)


def convert_state_dict(state_dict: dict[str, torch.Tensor], architecture: ADMArchitecture, head_width: int,
                       legacy_attention: bool = True) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under `UNet2DModel`'s names (fp32, each its own contiguous copy).

    qkv (Conv1d, weight (3C, C, 1)) becomes `to_q`/`to_k`/`to_v` (Linear, (C, C)),
    `proj_out` `to_out.0` and `norm` `group_norm`. An InputError names a tensor
    the walk did not use, so nothing of the checkpoint is silently dropped.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for source, target, kind in _layer_pairs(architecture):
        if kind == "plain":
            _rename(state_dict, source, target, out, used)
        elif kind == "resnet":
            for adm_layer, diffusers_layer in RESNET_LAYERS.items():
                # The 1x1 skip convolution exists only where a block changes the width.
                if adm_layer != "skip_connection" or f"{source}.{adm_layer}.weight" in state_dict:
                    _rename(state_dict, f"{source}.{adm_layer}", f"{target}.{diffusers_layer}", out, used)
        else:
            _rename(state_dict, f"{source}.norm", f"{target}.group_norm", out, used)
            heads = _take(state_dict, f"{source}.proj_out.weight", used).shape[0] // head_width
            for parameter in ("weight", "bias"):
                fused = _take(state_dict, f"{source}.qkv.{parameter}", used)
                projection = _take(state_dict, f"{source}.proj_out.{parameter}", used)
                if parameter == "weight":  # Conv1d (out, in, 1) → Linear (out, in)
                    fused, projection = fused.squeeze(-1), projection.squeeze(-1)
                for name, part in zip(("to_q", "to_k", "to_v"), _split_qkv(fused, heads, legacy_attention)):
                    out[f"{target}.{name}.{parameter}"] = part
                out[f"{target}.to_out.0.{parameter}"] = projection
    leftover = [key for key in state_dict if key not in used]
    if leftover:
        raise InputError(f"the checkpoint has a tensor {leftover[0]!r} that a guided-diffusion UNetModel with these "
                         "flags does not: check the flags against the checkpoint's (MODEL_FLAGS)")
    return {name: tensor.detach().float().contiguous().clone() for name, tensor in out.items()}


def build_unet(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> UNet2DModel:
    """A plain `UNet2DModel` holding `tensors`; an InputError when a name or shape does not fit `config`."""
    with torch.device("meta"):
        unet = UNet2DModel.from_config(config)
    expected = {name: tuple(tensor.shape) for name, tensor in unet.state_dict().items()}
    for name in sorted(set(expected) ^ set(tensors)):
        raise InputError(f"the converted checkpoint {'lacks' if name in expected else 'has an extra'} {name!r}: "
                         "check the flags against the checkpoint's (MODEL_FLAGS)")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise InputError(f"{name} has shape {tuple(tensors[name].shape)} in the checkpoint, {shape} in a "
                             "UNet2DModel with these flags: check the flags against the checkpoint's (MODEL_FLAGS)")
    unet.load_state_dict(tensors, assign=True)
    return unet.eval()


@dataclass(frozen=True)
class ADMConversion:
    """A converted checkpoint: the pipeline, every flag's value, and which flags the tensors gave."""

    pipeline: DDPMPipeline
    flags: dict[str, Any]
    inferred: tuple[str, ...]  # flags left out and read from the checkpoint


def convert_adm_state_dict(state_dict: dict[str, torch.Tensor], given: dict[str, Any] | None = None) -> ADMConversion:
    """A stock `DDPMPipeline` equivalent to a guided-diffusion `UNetModel` state dict and its diffusion flags.

    `given`: the guided-diffusion flags the user gave, by name (strings and
    numbers as its scripts take them); the rest are read from the tensors or
    take guided-diffusion's defaults. An InputError names the flag that does
    not fit the checkpoint, or says what a stock pipeline cannot express.
    """
    given = dict(given or {})
    architecture = infer_architecture(state_dict)
    flags = resolve_adm_flags(architecture, given)
    check_convertible(architecture, flags)
    head_width = attention_head_width(architecture, flags)
    tensors = convert_state_dict(state_dict, architecture, head_width,
                                 legacy_attention=not flags["use_new_attention_order"])
    unet = build_unet(adm_unet_config(architecture, flags, head_width), tensors)
    inferred = tuple(name for name in INFERRED_FLAGS if name not in given)
    return ADMConversion(DDPMPipeline(unet=unet, scheduler=adm_scheduler(flags)), flags, inferred)


# ---------------------------------------------------------------- the card and the folder


def flags_command_line(flags: dict[str, Any]) -> str:
    """The flags as guided-diffusion's scripts take them: `--name value`, booleans as True/False."""
    return " ".join(f"--{name} {value if value != '' else chr(34) * 2}" for name, value in flags.items())


def build_adm_model_card(source_name: str, sha256: str, flags: dict[str, Any], inferred: tuple[str, ...],
                         unet_config: dict[str, Any]) -> ModelCard:
    """The folder's model card: the source checkpoint (name, SHA-256), the flags, the licence (MIT) and the
    published FID, precision and recall where guided-diffusion gives them for that file."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    published = PUBLISHED_RESULTS.get(source_name)
    metrics = {"fid": "FID", "precision": "Precision", "recall": "Recall"}
    results = [
        EvalResult(task_type="unconditional-image-generation", dataset_type="lsun", dataset_name=published.dataset,
                   metric_type=key, metric_name=label, metric_value=getattr(published, key),
                   source_name="Diffusion Models Beat GANs on Image Synthesis (Dhariwal & Nichol, 2021)",
                   source_url=PAPER_URL)
        for key, label in metrics.items() if published is not None and getattr(published, key) is not None
    ]
    name = Path(source_name).stem
    card_data = ModelCardData(
        library_name="diffusers", pipeline_tag="unconditional-image-generation", license=LICENSE,
        tags=["diffusers", "unconditional-image-generation", "ddpm", "guided-diffusion", "adm"],
        model_name=f"guided-diffusion {name} (diffusers)", eval_results=results or None,
    )
    known = source_name in PUBLISHED_RESULTS
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE.read_text(), title=f"guided-diffusion `{source_name}` for diffusers",
        model_id=CARD_MODEL_ID_PLACEHOLDER, source_name=source_name, sha256=sha256, download_url=DOWNLOAD_URL.format(name=source_name) if known else None,
        source_url=SOURCE_URL, paper_url=PAPER_URL, command_line=flags_command_line(flags),
        inferred=", ".join(f"`--{n}`" for n in inferred) or "none", published=published,
        metrics=[(label, getattr(published, key)) for key, label in metrics.items()
                 if published is not None and getattr(published, key) is not None],
        resolution=unet_config["sample_size"], learn_sigma=flags["learn_sigma"],
        attention_order="new (q, k, v split first)" if flags["use_new_attention_order"] else
        "legacy (heads split before q, k, v)",
    )


def check_conversion_output(out_dir: str | os.PathLike) -> Path:
    """`out_dir` as a Path if a conversion may be written there: new, empty, or a previous conversion holding
    nothing but what a conversion writes (it is replaced whole, so anything else there would be lost)."""
    out_dir = check_output_folder(out_dir, "OUT_DIR")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"OUT_DIR {str(out_dir)!r} is a file: give a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return out_dir
    if not is_conversion(out_dir):  # only a previous conversion may be replaced
        raise InputError(f"OUT_DIR {str(out_dir)!r} is not empty and was not written by convert-adm: give a new "
                         "or empty folder")
    foreign = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in CONVERSION_ENTRIES)
    if foreign:
        raise InputError(f"OUT_DIR {str(out_dir)!r} holds a previous conversion and also {', '.join(foreign)}, "
                         "which convert-adm did not write and a new conversion would delete: move them out of "
                         "it, or give a new folder")
    return out_dir


def write_conversion(conversion: ADMConversion, card: ModelCard, record: dict[str, Any],
                     out_dir: str | os.PathLike) -> Path:
    """Write the pipeline (safetensors), README.md and adm_conversion.json into `out_dir`.

    Everything is written into a temporary sibling first and moved into place
    at the end (`export.replace_path`), so an interrupted conversion never
    leaves a half-written OUT_DIR; a previous conversion there is replaced whole.
    """
    out_dir = check_conversion_output(out_dir).resolve()  # "." has no name to make a sibling's from
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.convert-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run that had this process id
    try:
        conversion.pipeline.save_pretrained(staging, safe_serialization=True)
        card.save(staging / CARD_FILE)
        (staging / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Put the finished conversion `staging` where `out_dir` is: the whole folder at once.

    Except where `out_dir` is (or holds) the working directory, as in `convert-adm CKPT .`: renaming it away
    would leave this process and the user's shell in a deleted folder, so the folder stays and each of its
    entries is replaced at once instead.
    """
    if not Path.cwd().is_relative_to(out_dir):
        replace_path(staging, out_dir)
        return
    for entry in sorted(staging.iterdir()):
        replace_path(entry, out_dir / entry.name)


def convert_adm(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
                given: dict[str, Any] | None = None) -> ADMConversion:
    """Convert a guided-diffusion checkpoint file into a stock `DDPMPipeline` folder `out_dir`, with its card.

    `given` holds the guided-diffusion flags that were given (see
    `convert_adm_state_dict`). OUT_DIR is checked before the checkpoint is read.
    """
    check_conversion_output(out_dir)
    checkpoint = Path(checkpoint)
    conversion = convert_adm_state_dict(load_adm_state_dict(checkpoint), given)
    sha256 = file_sha256(checkpoint)
    card = build_adm_model_card(checkpoint.name, sha256, conversion.flags, conversion.inferred,
                                dict(conversion.pipeline.unet.config))
    record = {"source": checkpoint.name, "sha256": sha256, "flags": conversion.flags,
              "inferred_from_checkpoint": list(conversion.inferred)}
    write_conversion(conversion, card, record, out_dir)
    return conversion
