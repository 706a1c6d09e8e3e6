"""FID, KID and precision/recall of generated images against training images, on Inception features.

Two feature passes, each shared between accelerate processes as the neighbour
search shares its pass: the images are cut into batches of `batch_size`
consecutive indices and batch b belongs to process b mod N. A batch (its
images, its seeds, its features) does not depend on N, and the features are
gathered and put in index order before any statistic, so the numbers are the
same on one process or many.

1. Reference: `num_reference` training images (all of them when there are
   fewer; otherwise a seeded random subset, the same every time), with the
   training preprocessing at the training resolution. Their features, mean
   and covariance are kept in an .npz file (`mu`, `sigma` as pytorch-fid
   names them, plus `features`, which KID and precision/recall need), keyed
   by everything that determines them, and reused.
2. Samples: image i generated from (seed, i) as `lsun-ddpm sample` makes it,
   quantised to uint8 as a saved PNG is.

The arithmetic is the libraries': torchmetrics' `FrechetInceptionDistance`
and `KernelInceptionDistance` (given the features through an identity
feature module) and torch-fidelity's k-NN precision and recall (k = 3, as
Kynkäänniemi et al. 2019 and ADM's evaluator).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.preprocessing import ImagePreprocessor
from ..errors import InputError
from .dataset_pass import DatasetPass, featurised_batches
from .inception_features import ExtractorInfo
from .neighbours import choose_reference_indices

CACHE_FORMAT = 1
REFERENCE_SEED = 0  # which training images form the reference set: fixed, so every evaluation shares one
PREPROCESSING = "ADM resize of the shorter side: BOX halving, then BICUBIC; centre crop; no flip"


@dataclass
class ReferenceStats:
    """The reference set's features (R, D), what they were computed from, and how many images were unreadable."""

    features: torch.Tensor
    identity: dict
    num_skipped: int = 0

    @property
    def mu(self) -> np.ndarray:
        return self.features.double().mean(0).numpy()

    @property
    def sigma(self) -> np.ndarray:
        return np.cov(self.features.double().numpy(), rowvar=False)

    def save(self, path: str | os.PathLike) -> None:
        """An .npz (`mu`, `sigma`, `features`, `identity` as JSON, `num_skipped`), written atomically."""
        from ..files import staged

        with staged(path) as staging, open(staging, "wb") as file:
            np.savez(file, mu=self.mu, sigma=self.sigma, features=self.features.float().numpy(),
                     identity=np.array(json.dumps(self.identity, sort_keys=True)),
                     num_skipped=np.array(self.num_skipped))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        try:
            with np.load(path, allow_pickle=False) as stored:
                return cls(torch.from_numpy(stored["features"]), json.loads(str(stored["identity"])),
                           int(stored["num_skipped"]))
        except (OSError, ValueError, KeyError) as error:
            raise InputError(f"--reference_stats {str(path)!r} is not a reference-statistics file written by "
                             f"`lsun-ddpm evaluate` ({type(error).__name__}: {error})") from None


def reference_identity(data: dict, dataset_size: int, resolution: int, num_reference: int,
                       extractor: ExtractorInfo, convention: str) -> dict:
    """Everything the reference features depend on: the data, its size, resolution, preprocessing, subset, network."""
    data = dict(data)
    if data.get("train_data_dir"):
        data["train_data_dir"] = str(Path(data["train_data_dir"]).resolve())
    data.pop("streaming", None)
    return {"format": CACHE_FORMAT, "data": data, "split": "train", "dataset_size": dataset_size,
            "resolution": resolution, "preprocessing": PREPROCESSING,
            "num_reference": min(num_reference, dataset_size), "subset_seed": REFERENCE_SEED,
            "features": {"weights_sha256": extractor.weights_sha256, "input": convention}}


def default_cache_file(identity: dict) -> Path:
    """Where the reference statistics of `identity` are cached: $XDG_CACHE_HOME (or ~/.cache)/lsun_ddpm/."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lsun_ddpm" / "reference_stats"
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"reference-{identity['resolution']}px-{key}.npz"


def differences(stored: dict, wanted: dict) -> str:
    """"key: stored X, now Y" for each top-level key that differs ("" when none does)."""
    keys = sorted(set(stored) | set(wanted))
    return ", ".join(f"{key}: stored {stored.get(key)!r}, now {wanted.get(key)!r}"
                     for key in keys if stored.get(key) != wanted.get(key))


def reference_subset(dataset, num_reference: int):
    """The dataset itself when it has at most `num_reference` images, else a seeded random subset of them."""
    if len(dataset) <= num_reference:
        return dataset
    return dataset.select(choose_reference_indices(dataset, num_reference, REFERENCE_SEED))


def reference_features(dataset, extractor: torch.nn.Module, resolution: int, identity: dict, batch_size: int,
                       accelerator=None, num_workers: int = 0, progress: bool = True) -> ReferenceStats:
    """The reference pass: this process's batches of the (subset of the) dataset, gathered from all processes."""
    subset = reference_subset(dataset, identity["num_reference"])
    plan = DatasetPass(batch_size, *_rank(accelerator))
    preprocess = ImagePreprocessor(resolution, center_crop=True, random_flip=False)
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    features, indices = [], []
    with progress_bar("evaluate 1/2: reference images", len(subset), accelerator, progress) as bar:
        for batch_features, batch_indices in featurised_batches(subset, extractor, preprocess, plan, device,
                                                                bar.update, num_workers):
            features.append(batch_features.cpu())
            indices.append(batch_indices)
    skipped = sum(_gather(accelerator, [plan.skipped]))
    return ReferenceStats(in_index_order(accelerator, features, indices), identity, skipped)


def sample_features(unet, scheduler_config: dict, plan, num_samples: int, seed: int, extractor: torch.nn.Module,
                    accelerator=None, samples_dir: str | None = None, progress: bool = True) -> torch.Tensor:
    """Features (num_samples, D) of images 0 … n−1 from (seed, i), in index order; this process makes its batches.

    With `samples_dir`, each sample is also written there as `<i>.png` (5 digits).
    """
    from ..files import save_image
    from ..pipelines.ddpm_interpolation import to_tensor
    from ..sample.sampling import generate

    process_index, num_processes = _rank(accelerator)
    features, indices = [], []
    with progress_bar("evaluate 2/2: samples", num_samples, accelerator, progress) as bar:
        for batch in range(process_index, math.ceil(num_samples / plan.batch_size), num_processes):
            first = batch * plan.batch_size
            images = generate(unet, scheduler_config, min(plan.batch_size, num_samples - first), seed, plan,
                              first_index=first)
            if samples_dir:
                for offset, image in enumerate(images):
                    save_image(image, Path(samples_dir) / f"{first + offset:05d}.png")
            pixels = torch.stack([to_tensor(image) for image in images]).to(unet.device)
            features.append(extractor(pixels).cpu())
            indices.append(torch.arange(first, first + len(images)))
            bar.update(len(images))
    return in_index_order(accelerator, features, indices)


def _rank(accelerator) -> tuple[int, int]:
    return (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)


def _gather(accelerator, items: list) -> list:
    """accelerate's `gather_object` (every process's list, concatenated in process order) when there are several."""
    if accelerator is None or accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def in_index_order(accelerator, features: list[torch.Tensor], indices: list[torch.Tensor]) -> torch.Tensor:
    """All processes' feature batches as one tensor, rows sorted by image index."""
    shares = _gather(accelerator, [(torch.cat(features) if features else None,
                                    torch.cat(indices) if indices else None)])
    shares = [(f, i) for f, i in shares if f is not None]
    if not shares:
        return torch.empty(0, 0)
    all_features = torch.cat([f for f, _ in shares])
    return all_features[torch.cat([i for _, i in shares]).argsort()]


def progress_bar(description: str, total: int, accelerator, enabled: bool):
    """tqdm in images (with images/s) on the main process, over this process's share when there are several."""
    from tqdm.auto import tqdm

    process_index, num_processes = _rank(accelerator)
    if num_processes > 1:
        description += f" (process 0's share of {num_processes})"
    return tqdm(total=math.ceil(total / num_processes), desc=description, unit="img", dynamic_ncols=True,
                disable=not enabled or process_index != 0)
