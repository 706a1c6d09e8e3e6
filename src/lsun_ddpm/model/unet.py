"""The ADM ("Diffusion Models Beat GANs") U-Net as a diffusers `UNet2DModel`.

`ADMUNet2DModel` adds nothing to the forward pass of `UNet2DModel`: every ADM
feature the paper relies on is a `UNet2DModel` configuration (see `PRESETS`).
What the subclass adds is ADM's initialisation (zero output layers) and the
export back to a plain `UNet2DModel`, so that published folders load with stock
diffusers, where `lsun_ddpm` is not installed.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

import torch
from diffusers import UNet2DModel

from ..layout import UNET, UNET_CONFIG

def _adm_block_types(attention: tuple[bool, ...], resblock_updown: bool = True) -> dict[str, Any]:
    """Down/up block types for levels with or without self-attention.

    ADM's `resblock_updown` resamples inside a residual block. diffusers does
    this with `downsample_type="resnet"` in the attention blocks, and with the
    `Resnet{Down,Up}sampleBlock2D` blocks in levels without attention. Without
    it ADM resamples with a strided (down) or a nearest-neighbour + 3x3 (up)
    convolution: diffusers' `conv` resampling and plain `{Down,Up}Block2D`.
    """
    down_plain, up_plain = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if resblock_updown else (
        "DownBlock2D", "UpBlock2D")
    down = tuple("AttnDownBlock2D" if a else down_plain for a in attention)
    up = tuple("AttnUpBlock2D" if a else up_plain for a in reversed(attention))
    return {"down_block_types": down, "up_block_types": up}


def adm_config(
    sample_size: int,
    block_out_channels: tuple[int, ...],
    attention_resolutions: tuple[int, ...],
    layers_per_block: int = 2,
    attention_head_dim: int = 64,
    dropout: float = 0.1,
    norm_num_groups: int = 32,
    out_channels: int = 3,
    resblock_updown: bool = True,
    use_scale_shift_norm: bool = True,
) -> dict[str, Any]:
    """A `UNet2DModel` config with ADM's architecture choices.

    Level *i* of the U-Net runs at `sample_size / 2**i`; it gets attention when
    that resolution is in `attention_resolutions` (ADM's `--attention_resolutions`).
    The last three arguments are ADM's `learn_sigma` (6 output channels),
    `--resblock_updown` and `--use_scale_shift_norm`; the defaults are the paper's.
    """
    resampling = "resnet" if resblock_updown else "conv"
    attention = tuple(sample_size // 2**i in attention_resolutions for i in range(len(block_out_channels)))
    return {
        "sample_size": sample_size,
        "in_channels": 3,
        "out_channels": out_channels,
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        **_adm_block_types(attention, resblock_updown),
        "downsample_type": resampling,
        "upsample_type": resampling,
        "resnet_time_scale_shift": "scale_shift" if use_scale_shift_norm else "default",
        "attention_head_dim": attention_head_dim,  # channels per head (num_head_channels)
        "attn_norm_num_groups": norm_num_groups,  # ADM normalises the middle attention too
        "norm_num_groups": norm_num_groups,
        "norm_eps": 1e-5,
        "dropout": dropout,
        "act_fn": "silu",
        # ADM's timestep embedding is [cos, sin] with no frequency shift.
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's model at 128 px. Widths 128-128-256-256-512-512 over six
    # levels (128 → 4 px) are those of the original DDPM LSUN model; ADM's own
    # 128-px widths (256 × (1,1,2,3,4)) are ~4x the compute and do not fit a
    # micro-batch of 8 on a 24 GB GPU. Parameter count, FLOPs and memory are
    # measured by bench/model_stats.py and recorded in docs/model.md.
    "paper128": adm_config(128, (128, 128, 256, 256, 512, 512), attention_resolutions=(32, 16, 8)),
    # The same architecture scaled down for the CPU demo and recipe: attention at
    # 8 px, one residual block per level.
    "small32": adm_config(
        32, (32, 64, 128), attention_resolutions=(8,), layers_per_block=1, attention_head_dim=32,
        norm_num_groups=8, dropout=0.0,
    ),
    # The smallest model that still exercises every block type, for tests.
    "tiny16": adm_config(
        16,
        (32, 64),
        attention_resolutions=(8,),
        layers_per_block=1,
        attention_head_dim=32,
        norm_num_groups=8,
        dropout=0.0,
    ),
}


class ADMUNet2DModel(UNet2DModel):
    """`UNet2DModel` with ADM's zero-initialised output layers.

    ADM initialises to zero the last convolution of every residual block, the
    output projection of every attention block and the final `conv_out`, so
    each block starts as the identity and the network starts by predicting
    ε = 0. This keeps early training stable at the paper's learning rate of 3e-4.
    The constructor takes exactly the arguments of `UNet2DModel`.
    """

    @functools.wraps(UNet2DModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.zero_init_output_layers()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ADMUNet2DModel":
        """Build a freshly initialised model from one of `PRESETS`."""
        return cls.from_config({**model_config(name), **overrides})

    @torch.no_grad()
    def zero_init_output_layers(self) -> None:
        resnets = [m for m in self.modules() if hasattr(m, "conv2") and hasattr(m, "time_emb_proj")]
        attentions = [m for m in self.modules() if hasattr(m, "to_out") and hasattr(m, "to_q")]
        layers = [r.conv2 for r in resnets] + [a.to_out[0] for a in attentions] + [self.conv_out]
        for layer in layers:
            torch.nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                torch.nn.init.zeros_(layer.bias)

    def to_unet2d(self) -> UNet2DModel:
        """A plain `UNet2DModel` that shares this model's weights (no copy).

        Pipelines record the class of each component in `model_index.json`; a
        pipeline holding this subclass could only be loaded with `lsun_ddpm`
        installed. Saving the returned model instead keeps exports stock.
        """
        with torch.device("meta"):
            stock = UNet2DModel.from_config(self.config)
        stock.load_state_dict(self.state_dict(), assign=True)
        return stock.train(self.training)


def unet_subfolder(name_or_path: str) -> str | None:
    """Where a U-Net's files live: "unet" in a pipeline folder, None (the top) in a UNet2DModel folder or
    config file. For a Hub repo id, "unet" if the repo has one (pipelines, the common case), else None."""
    if os.path.isdir(name_or_path):
        return UNET if os.path.isfile(os.path.join(name_or_path, UNET, UNET_CONFIG)) else None
    if os.path.isfile(name_or_path):
        return None
    try:
        UNet2DModel.load_config(name_or_path, subfolder=UNET)
        return UNET
    except (OSError, ValueError):
        return None


def load_model_config(name_or_path: str) -> dict[str, Any]:
    """A `UNet2DModel` config from a config file, a model folder, a pipeline
    folder (its `unet/`), or a Hub repo id."""
    return dict(UNet2DModel.load_config(name_or_path, subfolder=unet_subfolder(name_or_path)))


def model_config(preset: str = "paper128", config_name_or_path: str | None = None) -> dict[str, Any]:
    """The `UNet2DModel` config of a preset, or of `config_name_or_path` when given; no weights are built."""
    if config_name_or_path is not None:
        return load_model_config(config_name_or_path)
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[preset])


def unet_channels(unet_config: dict[str, Any]) -> tuple[int, int]:
    """(in_channels, out_channels) of a `UNet2DModel` config; a config file may leave them at diffusers' defaults."""
    defaults = inspect.signature(UNet2DModel.__init__).parameters
    return tuple(unet_config.get(name, defaults[name].default) for name in ("in_channels", "out_channels"))


def downsampling_factor(unet_config: dict[str, Any]) -> int:
    """How much the U-Net shrinks its input: every level but the last halves it."""
    return 2 ** (len(unet_config["block_out_channels"]) - 1)


def build_model(preset: str = "paper128", config_name_or_path: str | None = None, learn_sigma: bool = False,
                pretrained_model_name_or_path: str | None = None, **overrides: Any) -> ADMUNet2DModel:
    """The model to train: a preset or any `UNet2DModel` config, freshly initialised; or the weights of
    `pretrained_model_name_or_path` (a pipeline or U-Net folder, a Hub id) to fine-tune.

    `learn_sigma` gives a fresh model twice its input channels as outputs, [ε, v]
    (a pretrained model keeps its own). `overrides` change the config, e.g.
    `sample_size`: the convolutions and attention layers do not depend on it.
    """
    if pretrained_model_name_or_path is not None:
        return ADMUNet2DModel.from_pretrained(pretrained_model_name_or_path, use_safetensors=True,
                                              subfolder=unet_subfolder(pretrained_model_name_or_path), **overrides)
    unet_config = model_config(preset, config_name_or_path)
    if learn_sigma:
        overrides = {"out_channels": 2 * unet_channels(unet_config)[0], **overrides}
    return ADMUNet2DModel.from_config({**unet_config, **overrides})


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_fingerprint(tensors) -> str:
    """SHA-256 of the tensors' values (as float32), in order: equal weights, equal fingerprint."""
    import hashlib

    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
