"""guided-diffusion's tensors renamed into a diffusers `UNet2DModel`: loading them safely, the layer map, the qkv split."""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from ..errors import InputError
from ..layout import LEARNED_VARIANCE
from .adm_flags import ADMArchitecture, INFERRED_FLAGS, NOISE_SCHEDULES, infer_architecture, resolve_adm_flags
from .diffusion import make_noise_scheduler
from .unet import adm_config

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "ema", "ema_model")


# ADM ResBlock sub-layer → diffusers ResnetBlock2D sub-layer.
RESNET_LAYERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


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
