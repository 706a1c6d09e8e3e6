"""guided-diffusion's flags: parsed as its scripts parse them, checked against what a checkpoint's tensors fix."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError

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


def flags_command_line(flags: dict[str, Any]) -> str:
    """The flags as guided-diffusion's scripts take them: `--name value`, booleans as True/False."""
    return " ".join(f"--{name} {value if value != '' else chr(34) * 2}" for name, value in flags.items())


# The example of `convert-adm --help` (the README has it too): {url} is the checkpoint's download.
EXAMPLE = """\
example (guided-diffusion's LSUN bedroom model, FID 1.90 at 256 px):
  curl -LO {url}
  lsun-ddpm convert-adm lsun_bedroom.pt adm-lsun-bedroom-256 \\
    --attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 \\
    --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 \\
    --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True \\
    --use_scale_shift_norm True
  lsun-ddpm sample adm-lsun-bedroom-256

Paste guided-diffusion's MODEL_FLAGS and DIFFUSION_FLAGS as they are; what the tensors fix is checked
against them. --use_fp16 and --use_checkpoint are accepted and change nothing: the weights are written
in fp32, as the checkpoint stores them. See docs/adm.md."""
