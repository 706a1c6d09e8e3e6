"""guided-diffusion's UNetModel, written for the tests in plain torch from its math.

`random_adm_state_dict` builds a random state dict with guided-diffusion's tensor
names and shapes; `adm_forward` runs the network it describes. Neither uses
diffusers or the converter, so a converted `UNet2DModel` that agrees with
`adm_forward` agrees with ADM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Spec:
    """The guided-diffusion flags of a tiny model (channels multiples of 32: ADM always uses GroupNorm(32))."""

    num_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (1,)  # levels (0 = full size) with attention
    head_channels: int = 32  # channels per head, fixed (num_head_channels)
    learn_sigma: bool = True
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    new_attention_order: bool = False
    class_cond: bool = False

    @property
    def out_channels(self) -> int:
        return 6 if self.learn_sigma else 3


# ---------------------------------------------------------------- the state dict


class _Tensors:
    def __init__(self, seed: int, meta: bool):
        self.generator = torch.Generator().manual_seed(seed)
        self.meta = meta
        self.tensors: dict[str, torch.Tensor] = {}

    def randn(self, *shape: int, scale: float) -> torch.Tensor:
        if self.meta:  # shapes only: a full-size model without its memory
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=self.generator) * scale

    def conv(self, name: str, c_in: int, c_out: int, kernel: int, dims: int = 2) -> None:
        fan_in = c_in * kernel**dims
        self.tensors[f"{name}.weight"] = self.randn(c_out, c_in, *(kernel,) * dims, scale=fan_in**-0.5)
        self.tensors[f"{name}.bias"] = self.randn(c_out, scale=0.1)

    def linear(self, name: str, c_in: int, c_out: int) -> None:
        self.tensors[f"{name}.weight"] = self.randn(c_out, c_in, scale=c_in**-0.5)
        self.tensors[f"{name}.bias"] = self.randn(c_out, scale=0.1)

    def norm(self, name: str, channels: int) -> None:
        self.tensors[f"{name}.weight"] = 1 + self.randn(channels, scale=0.1)
        self.tensors[f"{name}.bias"] = self.randn(channels, scale=0.1)

    def resblock(self, name: str, c_in: int, c_out: int, emb: int, scale_shift: bool) -> None:
        self.norm(f"{name}.in_layers.0", c_in)
        self.conv(f"{name}.in_layers.2", c_in, c_out, 3)
        self.linear(f"{name}.emb_layers.1", emb, 2 * c_out if scale_shift else c_out)
        self.norm(f"{name}.out_layers.0", c_out)
        self.conv(f"{name}.out_layers.3", c_out, c_out, 3)
        if c_in != c_out:
            self.conv(f"{name}.skip_connection", c_in, c_out, 1)

    def attention(self, name: str, channels: int) -> None:
        self.norm(f"{name}.norm", channels)
        self.conv(f"{name}.qkv", channels, 3 * channels, 1, dims=1)
        self.conv(f"{name}.proj_out", channels, channels, 1, dims=1)


def random_adm_state_dict(spec: Spec, seed: int = 0, meta: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors under guided-diffusion's UNetModel names and shapes for `spec` (`meta`: shapes only)."""
    t = _Tensors(seed, meta)
    mc, emb, levels = spec.num_channels, 4 * spec.num_channels, len(spec.channel_mult)
    t.linear("time_embed.0", mc, emb)
    t.linear("time_embed.2", emb, emb)
    if spec.class_cond:
        t.tensors["label_emb.weight"] = t.randn(1000, emb, scale=1.0)
    t.conv("input_blocks.0.0", 3, mc * spec.channel_mult[0], 3)
    ch, skips, block = mc * spec.channel_mult[0], [mc * spec.channel_mult[0]], 1
    for level, mult in enumerate(spec.channel_mult):
        for _ in range(spec.num_res_blocks):
            t.resblock(f"input_blocks.{block}.0", ch, mc * mult, emb, spec.use_scale_shift_norm)
            ch = mc * mult
            if level in spec.attention_levels:
                t.attention(f"input_blocks.{block}.1", ch)
            skips.append(ch)
            block += 1
        if level < levels - 1:
            if spec.resblock_updown:
                t.resblock(f"input_blocks.{block}.0", ch, ch, emb, spec.use_scale_shift_norm)
            else:
                t.conv(f"input_blocks.{block}.0.op", ch, ch, 3)
            skips.append(ch)
            block += 1
    t.resblock("middle_block.0", ch, ch, emb, spec.use_scale_shift_norm)
    t.attention("middle_block.1", ch)
    t.resblock("middle_block.2", ch, ch, emb, spec.use_scale_shift_norm)
    block = 0
    for level, mult in reversed(list(enumerate(spec.channel_mult))):
        for i in range(spec.num_res_blocks + 1):
            t.resblock(f"output_blocks.{block}.0", ch + skips.pop(), mc * mult, emb, spec.use_scale_shift_norm)
            ch, layer = mc * mult, 1
            if level in spec.attention_levels:
                t.attention(f"output_blocks.{block}.1", ch)
                layer = 2
            if level > 0 and i == spec.num_res_blocks:
                if spec.resblock_updown:
                    t.resblock(f"output_blocks.{block}.{layer}", ch, ch, emb, spec.use_scale_shift_norm)
                else:
                    t.conv(f"output_blocks.{block}.{layer}.conv", ch, ch, 3)
            block += 1
    t.norm("out.0", ch)
    t.conv("out.2", ch, spec.out_channels, 3)
    return t.tensors


# ---------------------------------------------------------------- the forward pass


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t·f_i), sin(t·f_i)] with f_i = 10000^(−i/half), i < half = dim/2."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def _norm(sd, name, x):
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _conv(sd, name, x, **kwargs):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], **kwargs)


def _resample(x, direction):
    if direction == "down":
        return F.avg_pool2d(x, 2)
    if direction == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


def resblock(sd, name, x, emb, scale_shift: bool, direction: str | None = None):
    """in_layers (norm, SiLU, [resample], conv); + the embedding (or norm·(1+scale)+shift); out_layers; + skip."""
    h = F.silu(_norm(sd, f"{name}.in_layers.0", x))
    h, x = _resample(h, direction), _resample(x, direction)
    h = _conv(sd, f"{name}.in_layers.2", h, padding=1)
    e = F.linear(F.silu(emb), sd[f"{name}.emb_layers.1.weight"], sd[f"{name}.emb_layers.1.bias"])[:, :, None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = _norm(sd, f"{name}.out_layers.0", h) * (1 + scale) + shift
    else:
        h = _norm(sd, f"{name}.out_layers.0", h + e)
    h = _conv(sd, f"{name}.out_layers.3", F.silu(h), padding=1)  # dropout is the identity at inference
    skip = _conv(sd, f"{name}.skip_connection", x) if f"{name}.skip_connection.weight" in sd else x
    return skip + h


def attention(sd, name, x, head_channels: int, new_order: bool):
    """Self-attention over positions; heads split before q/k/v (legacy) or after (new order)."""
    b, c, height, width = x.shape
    tokens = x.reshape(b, c, -1)
    qkv = F.conv1d(_norm(sd, f"{name}.norm", tokens), sd[f"{name}.qkv.weight"], sd[f"{name}.qkv.bias"])
    heads, length = c // head_channels, tokens.shape[-1]
    if new_order:
        q, k, v = (part.reshape(b * heads, head_channels, length) for part in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * head_channels, length).split(head_channels, dim=1)
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(head_channels), dim=-1)
    mixed = torch.einsum("bts,bcs->bct", weights, v).reshape(b, c, length)
    out = F.conv1d(mixed, sd[f"{name}.proj_out.weight"], sd[f"{name}.proj_out.bias"])
    return (tokens + out).reshape(b, c, height, width)


def adm_forward(sd: dict[str, torch.Tensor], spec: Spec, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ADM's output for images `x` at timesteps `t`: encoder (skips kept), middle, decoder (skips consumed), out."""
    ss, levels = spec.use_scale_shift_norm, len(spec.channel_mult)
    emb = F.linear(timestep_features(t, spec.num_channels), sd["time_embed.0.weight"], sd["time_embed.0.bias"])
    emb = F.linear(F.silu(emb), sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    h = _conv(sd, "input_blocks.0.0", x, padding=1)
    skips, block = [h], 1
    for level in range(levels):
        for _ in range(spec.num_res_blocks):
            h = resblock(sd, f"input_blocks.{block}.0", h, emb, ss)
            if level in spec.attention_levels:
                h = attention(sd, f"input_blocks.{block}.1", h, spec.head_channels, spec.new_attention_order)
            skips.append(h)
            block += 1
        if level < levels - 1:
            if spec.resblock_updown:
                h = resblock(sd, f"input_blocks.{block}.0", h, emb, ss, "down")
            else:
                h = _conv(sd, f"input_blocks.{block}.0.op", h, stride=2, padding=1)
            skips.append(h)
            block += 1
    h = resblock(sd, "middle_block.0", h, emb, ss)
    h = attention(sd, "middle_block.1", h, spec.head_channels, spec.new_attention_order)
    h = resblock(sd, "middle_block.2", h, emb, ss)
    block = 0
    for level in reversed(range(levels)):
        for i in range(spec.num_res_blocks + 1):
            h = resblock(sd, f"output_blocks.{block}.0", torch.cat([h, skips.pop()], dim=1), emb, ss)
            layer = 1
            if level in spec.attention_levels:
                h = attention(sd, f"output_blocks.{block}.1", h, spec.head_channels, spec.new_attention_order)
                layer = 2
            if level > 0 and i == spec.num_res_blocks:
                if spec.resblock_updown:
                    h = resblock(sd, f"output_blocks.{block}.{layer}", h, emb, ss, "up")
                else:
                    h = _conv(sd, f"output_blocks.{block}.{layer}.conv", _resample(h, "up"), padding=1)
            block += 1
    return _conv(sd, "out.2", F.silu(_norm(sd, "out.0", h)), padding=1)
