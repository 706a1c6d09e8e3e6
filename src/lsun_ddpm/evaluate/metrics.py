"""FID, KID and precision/recall between two sets of features, by torchmetrics and torch-fidelity."""

from __future__ import annotations

import warnings

import torch

from ..errors import InputError
from .inception_features import INSTALL_HINT

KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torchmetrics' and torch-fidelity's defaults
PRC_NEIGHBOURS = 3
MIN_IMAGES = PRC_NEIGHBOURS + 1  # a k-NN radius needs k other images


class GivenFeatures(torch.nn.Module):
    """The identity as torchmetrics' feature module: the metrics are handed features computed (and gathered) before."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (N, D), by torchmetrics' `FrechetInceptionDistance` (float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    # sync_on_compute=False: only the main process computes; a sync would wait for the others forever.
    metric = FrechetInceptionDistance(feature=GivenFeatures(real.shape[1]), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = KID_SUBSETS,
                    subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float | None, int]:
    """(KID mean, its standard deviation over `subsets` random subsets, the subset size used), by torchmetrics.

    The subset size is at most the size of either set; the subsets are drawn
    from torch's RNG, seeded here, so the value is reproducible. When every
    subset is the same one (a single subset, or subsets holding all of both
    sets, as with 64 samples against 64 images) there is no spread to give:
    the standard deviation is None, not a rounding error's 1e-16.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features": they are in memory already
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=GivenFeatures(real.shape[1]), subsets=subsets, subset_size=size,
                                         sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    one_subset = subsets == 1 or size == len(real) == len(fake)
    return float(mean), None if one_subset else float(std), size


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PRC_NEIGHBOURS) -> tuple[float, float]:
    """(precision, recall) in the k-NN manifold sense, by torch-fidelity.

    Precision: the share of samples inside the union of the real images'
    k-NN balls; recall: the share of real images inside the samples' balls.
    """
    from torch_fidelity.metric_prc import prc_features_to_metric

    result = prc_features_to_metric(fake.float(), real.float(), prc_neighborhood=k, prc_batch_size=10000,
                                    save_cpu_ram=True, verbose=False)
    return float(result["precision"]), float(result["recall"])


def compute_metrics(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict:
    """{"fid", "kid", "kid_std", "kid_subset_size", "precision", "recall"} between reference and sample features."""
    for name, features in (("reference images", real), ("samples", fake)):
        if len(features) < MIN_IMAGES:
            raise InputError(f"{len(features)} {name} are too few: precision/recall's k = {PRC_NEIGHBOURS} "
                             f"neighbours need at least {MIN_IMAGES}")
    kid, kid_std, subset_size = kernel_distance(real, fake, seed=seed)
    precision, recall = precision_recall(real, fake)
    return {"fid": frechet_distance(real, fake), "kid": kid, "kid_std": kid_std, "kid_subset_size": subset_size,
            "precision": precision, "recall": recall}


def check_libraries() -> None:
    """An InputError naming the extra to install when torchmetrics or torch-fidelity is missing."""
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in ("torchmetrics", "torch_fidelity")):
        raise InputError(INSTALL_HINT)
