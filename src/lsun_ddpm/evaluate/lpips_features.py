"""LPIPS as a feature map: `LpipsFeatures(x)` with `lpips.LPIPS(x, y) == ‖a(x) − a(y)‖²`.

LPIPS (Zhang et al. 2018, the `lpips` package) compares two images through
the per-position unit-normalised features f̂_l of a backbone:

    d(x, y) = Σ_l 1/(H_l W_l) Σ_{h,w} Σ_c w_lc (f̂_lchw(x) − f̂_lchw(y))²

with non-negative linear weights w_l. With a_l(x) = √(w_l / (H_l W_l)) ⊙ f̂_l(x)
flattened and a(x) the concatenation over layers, d(x, y) = ‖a(x) − a(y)‖²
exactly, which makes a nearest-neighbour search over millions of images a
matter of one feature pass and matrix products (`neighbours.py`).

Also here: the backbone's ImageNet weights, downloaded by torchvision as
usual, or read from the file torchvision downloads (for offline machines).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch

from ..errors import InputError, LpipsWeightsUnavailableError

# The smallest square input each backbone takes (measured with lpips 0.1): below it, a
# pooling layer of the backbone has an empty output and torch raises.
MIN_RESOLUTION = {"alex": 31, "vgg": 16, "squeeze": 17}


def torchvision_weights(net: str):
    """The torchvision ImageNet weights `lpips` builds its backbone `net` from."""
    from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

    choices = {"alex": AlexNet_Weights.IMAGENET1K_V1, "vgg": VGG16_Weights.IMAGENET1K_V1,
               "squeeze": SqueezeNet1_1_Weights.IMAGENET1K_V1}
    if net not in choices:
        raise ValueError(f"--net must be one of {sorted(choices)}, got {net!r}")
    return choices[net]


def imagenet_weights_cached(net: str) -> bool:
    """Whether torchvision already has the backbone's ImageNet weights on disk (no download needed)."""
    from torch.hub import get_dir

    return (Path(get_dir()) / "checkpoints" / torchvision_weights(net).url.rsplit("/", 1)[-1]).is_file()


def check_lpips_resolution(net: str, resolution: int) -> None:
    """An InputError when images of `resolution` px are too small for the backbone `net`.

    The resolution defaults to the model's image size, so a small model needs one given.
    """
    minimum = MIN_RESOLUTION[net]
    if resolution < minimum:
        others = [name for name, size in MIN_RESOLUTION.items() if size <= resolution]
        instead = f", or --net {' or '.join(others)}" if others else ""
        raise InputError(f"images of {resolution} px are too small for LPIPS' {net} backbone: give --resolution "
                         f"{minimum} or more (smaller images are upscaled to it){instead}")


def load_lpips(net: str = "alex", backbone_weights: str | None = None, random_backbone: bool = False):
    """`lpips.LPIPS(net)` with its calibrated linear layers and the backbone's ImageNet weights.

    `backbone_weights`: a torchvision state-dict file (as torchvision downloads
    it) for machines without network access. `random_backbone` builds a
    randomly initialised (seeded) backbone instead: only for tests and
    labelled demos, never chosen silently.
    """
    import lpips

    url = torchvision_weights(net).url
    with warnings.catch_warnings():  # lpips still uses torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        if backbone_weights is not None or random_backbone:
            with torch.random.fork_rng():
                torch.manual_seed(0)  # a random backbone is the same one every run
                model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
            if backbone_weights is not None:
                load_backbone_state_dict(model.net, _read_state_dict(backbone_weights))
            return model.eval()
        try:
            return lpips.LPIPS(net=net, verbose=False).eval()
        except Exception as error:  # URLError, DNS, proxy, timeout: torchvision's download failed
            raise LpipsWeightsUnavailableError(
                f"cannot download the ImageNet weights of LPIPS' {net} backbone ({type(error).__name__}). "
                f"Fetch {url} on a machine with network access and pass --lpips_weights {url.rsplit('/', 1)[-1]}"
            ) from None


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise LpipsWeightsUnavailableError(f"--lpips_weights {path!r} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise LpipsWeightsUnavailableError(
            f"--lpips_weights {path!r} is not a torchvision state-dict file ({type(error).__name__}: {error})"
        ) from None


def load_backbone_state_dict(backbone: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load torchvision's `features.<i>.*` tensors into lpips' `slice<j>.<i>.*` modules.

    lpips cuts torchvision's `features` Sequential into slices and keeps each
    layer's index as its name, so the mapping is by that index.
    """
    slice_of = {index: slice_name for slice_name, block in backbone.named_children()
                for index, _ in block.named_children()}
    renamed = {}
    for key, tensor in state_dict.items():
        _, index, rest = key.split(".", 2) if key.startswith("features.") else (None, None, None)
        if index in slice_of:
            renamed[f"{slice_of[index]}.{index}.{rest}"] = tensor
    expected = set(backbone.state_dict())
    if set(renamed) != expected:
        raise LpipsWeightsUnavailableError(
            f"the --lpips_weights file does not match this backbone: missing {sorted(expected - set(renamed))[:4]}"
        )
    backbone.load_state_dict(renamed)


class LpipsFeatures(torch.nn.Module):
    """x ↦ a(x), flattened, with `lpips_model(x, y) == ‖a(x) − a(y)‖²` (module docstring).

    Reuses the lpips model's own modules (scaling layer, backbone,
    `normalize_tensor`, linear-layer weights); x is (N, 3, H, W) in [-1, 1].
    """

    def __init__(self, lpips_model):
        super().__init__()
        self.lpips = lpips_model.eval()
        weights = [next(m for m in lin.modules() if isinstance(m, torch.nn.Conv2d)).weight for lin in lpips_model.lins]
        if any(bool((w < 0).any()) for w in weights):
            raise ValueError("LPIPS linear weights must be non-negative for the feature-space identity")
        self.sqrt_weights = [w.detach().reshape(1, -1, 1, 1).sqrt() for w in weights]
        self.num_layers = len(weights)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from lpips import normalize_tensor

        outputs = self.lpips.net(self.lpips.scaling_layer(images))
        parts = []
        for output, sqrt_weight in zip(outputs, self.sqrt_weights):
            height, width = output.shape[-2:]
            scaled = normalize_tensor(output) * sqrt_weight.to(output.device) / math.sqrt(height * width)
            parts.append(scaled.flatten(1))
        return torch.cat(parts, dim=1).float()
