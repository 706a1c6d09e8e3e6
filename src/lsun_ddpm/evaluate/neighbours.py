"""Exact nearest training images under LPIPS, over a whole dataset (the paper's Fig. 4).

LPIPS is a squared Euclidean distance between per-image feature vectors
(`lpips_features.py`). So the search is one feature pass over the dataset
and matrix products against the queries' features (‖a‖² + ‖b‖² − 2a·b,
float32, to pick candidates), with the few candidates per query then scored
as a sum of squares ‖a − b‖², so distances match pairwise `lpips.LPIPS`
calls to float32 rounding. No network call per pair.

The dataset is cut into batches of `batch_size` consecutive images; batch b
belongs to process b mod N, and each batch is one file of the feature cache.
A batch's images (and so its features) do not depend on N, and every process
keeps its own top-k, merged on all processes by (distance, index): the answer
is the same on one process or many.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import datasets
import numpy as np
import torch

from ..data.preprocessing import ImagePreprocessor, UNREADABLE_IMAGE_ERRORS
from ..data.report import REPORTED_EXAMPLES
from ..errors import InputError
from ..model.unet import weights_fingerprint
from .dataset_pass import DatasetPass, dataset_contents, decode_batch, featurised_batches, prepare_feature_cache
from .lpips_features import LpipsFeatures, check_lpips_resolution, load_lpips

# The candidates scored exactly per query and batch, beyond k: covers float32
# rounding in the expanded product (ties among near-duplicates aside).
EXACT_RESCORING_SLACK = 16
# A bound, relative to ‖q‖² + ‖x‖², on the float32 error of the expanded
# distance (float32's epsilon is 6e-8: this leaves three orders of margin).
FLOAT32_TOLERANCE = 1e-4


class RunningTopK:
    """Per query, the k smallest (distance, index) pairs seen so far, ordered by distance then index."""

    def __init__(self, num_queries: int, k: int):
        self.k = k
        self.distances = torch.empty(num_queries, 0, dtype=torch.float64)
        self.indices = torch.empty(num_queries, 0, dtype=torch.long)

    def add(self, distances: torch.Tensor, indices: torch.Tensor) -> None:
        distances = torch.cat([self.distances, distances.double().cpu()], dim=1)
        indices = torch.cat([self.indices, indices.cpu()], dim=1)
        # lexicographic (distance, index): the same order whatever the arrival order
        order = torch.sort(indices, dim=1, stable=True).indices
        distances, indices = distances.gather(1, order), indices.gather(1, order)
        order = torch.sort(distances, dim=1, stable=True).indices[:, : self.k]
        self.distances, self.indices = distances.gather(1, order), indices.gather(1, order)

    def kth_distance(self, k: int | None = None) -> torch.Tensor:
        """Each query's k-th best distance so far (+inf while it has fewer than k); k: this top k's own."""
        k = k or self.k
        if self.distances.shape[1] < k:
            return torch.full((len(self.distances),), math.inf, dtype=torch.float64)
        return self.distances[:, k - 1]


def score_batch(queries: torch.Tensor, excluded: torch.Tensor, features: torch.Tensor, indices: torch.Tensor,
                best: RunningTopK) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact distances of the candidates of one batch that can still enter each query's top k.

    The float32 expansion ‖q‖² + ‖x‖² − 2q·x ranks the batch; a candidate is
    scored exactly, as ‖q − x‖² (`exact_distances`), if it is among the k + slack
    nearest and its approximate distance (error well under
    `FLOAT32_TOLERANCE` × (‖q‖² + ‖x‖²)) could beat the k-th best so far.
    The rest get +inf. `excluded[q]` is a dataset index query q must not
    match (a reference image is not its own neighbour), or -1.
    """
    k = best.k
    query_norms, feature_norms = queries.square().sum(1), features.square().sum(1)
    approximate = query_norms[:, None] + feature_norms[None] - 2 * queries @ features.T
    approximate[excluded[:, None] == indices[None].to(excluded.device)] = math.inf
    count = min(k + EXACT_RESCORING_SLACK, features.shape[0])
    nearest = approximate.topk(count, dim=1, largest=False)
    tolerance = FLOAT32_TOLERANCE * (query_norms + feature_norms.max())
    kth_so_far = best.kth_distance().to(approximate.device)
    kth_here = nearest.values[:, min(k, count) - 1]
    bound = torch.minimum(kth_so_far + tolerance, kth_here + 2 * tolerance)
    rows, columns = torch.nonzero((nearest.values <= bound[:, None]) & nearest.values.isfinite(), as_tuple=True)
    exact = torch.full(nearest.values.shape, math.inf, dtype=torch.float64, device=approximate.device)
    exact[rows, columns] = exact_distances(queries, features, rows, nearest.indices[rows, columns])
    return exact, indices.to(approximate.device)[nearest.indices]


def exact_distances(queries: torch.Tensor, features: torch.Tensor, query_rows: torch.Tensor,
                    feature_rows: torch.Tensor, pairs_per_chunk: int = 256) -> torch.Tensor:
    """‖queries[i] − features[j]‖² for the listed pairs (i, j), a chunk of pairs at a time.

    A sum of squares has no cancellation: float32 terms with torch's cascaded
    summation are within ~1e-6 relative of the exact value (measured against
    float64: 2e-7), where the expanded form loses digits for near-duplicates.
    """
    out = torch.empty(len(query_rows), dtype=torch.float64, device=queries.device)
    for start in range(0, len(query_rows), pairs_per_chunk):
        chunk = slice(start, start + pairs_per_chunk)
        difference = queries[query_rows[chunk]] - features[feature_rows[chunk]]
        out[chunk] = difference.square().sum(1).double()
    return out


@dataclass
class SearchResult:
    """What `search` found; distances are LPIPS values (float64), indices are dataset indices."""

    sample_distances: torch.Tensor  # (num_samples, k)
    sample_indices: torch.Tensor  # (num_samples, k)
    reference_distances: torch.Tensor  # (num_references,): each reference image's nearest *other* image
    reference_indices: list[int]  # the dataset indices of the reference queries
    num_searched: int  # training images compared (unreadable ones excluded)
    num_skipped: int
    skipped_examples: list[str]  # "file (why)" of a few of the skipped images


def search(sample_features: torch.Tensor, reference_features: torch.Tensor, reference_indices: list[int],
           dataset, extractor: LpipsFeatures, preprocess: ImagePreprocessor, k: int, plan: DatasetPass,
           device: torch.device, on_batch: Callable[[int], None] = lambda n: None,
           gather: Callable[[list], list] = lambda objects: objects, num_workers: int = 0) -> SearchResult:
    """One pass over this process's share of `dataset`; `gather` (accelerate's `gather_object`) merges processes."""
    queries = torch.cat([sample_features, reference_features]).to(device)
    excluded = torch.tensor([-1] * len(sample_features) + list(reference_indices), dtype=torch.long, device=device)
    best = RunningTopK(len(queries), k)
    for features, indices in featurised_batches(dataset, extractor, preprocess, plan, device, on_batch, num_workers):
        best.add(*score_batch(queries, excluded, features, indices, best))
    shares = gather([(best.distances, best.indices, plan.num_images, plan.skipped, plan.skipped_examples)])
    merged = RunningTopK(len(queries), k)
    for distances, indices, *_ in shares:
        merged.add(distances, indices)
    n = len(sample_features)
    return SearchResult(
        sample_distances=merged.distances[:n], sample_indices=merged.indices[:n],
        reference_distances=merged.kth_distance(1)[n:], reference_indices=list(reference_indices),
        num_searched=sum(share[2] for share in shares), num_skipped=sum(share[3] for share in shares),
        skipped_examples=[example for share in shares for example in share[4]][:REPORTED_EXAMPLES],
    )


def choose_reference_indices(dataset, count: int, seed: int) -> list[int]:
    """A seeded random subset of the training images that serve as queries for the real-to-real distances.

    A stream has no length: its subset is drawn from its first 20 × `count` images.
    """
    if count <= 0:
        return []
    pool = len(dataset) if not isinstance(dataset, datasets.IterableDataset) else None
    if pool is None:
        pool = sum(1 for _ in dataset.take(20 * count))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(pool, size=min(count, pool), replace=False).tolist())


def fetch_images(dataset, indices: list[int]) -> dict[int, object]:
    """{index: undecoded image} for a few dataset indices (one partial read of a stream)."""
    wanted = set(indices)
    if not isinstance(dataset, datasets.IterableDataset):
        return {index: dataset[int(index)]["image"] for index in wanted}
    found = {}
    for index, example in enumerate(dataset):
        if index in wanted:
            found[index] = example["image"]
            if len(found) == len(wanted):
                break
    return found


def preprocess_samples(samples: list, names: list[str], preprocess: ImagePreprocessor) -> torch.Tensor:
    """The samples as one (n, 3, H, W) stack; an InputError names the first one that cannot be read."""
    pixels = []
    for sample, name in zip(samples, names):
        try:
            pixels.append(preprocess(sample))
        except UNREADABLE_IMAGE_ERRORS as error:
            where = os.fspath(sample) if isinstance(sample, (str, os.PathLike)) else name
            raise InputError(f"sample {where!r} is not an image that can be read ({error}); remove or replace it") \
                from None
    return torch.stack(pixels)


def featurise(images: torch.Tensor, extractor: LpipsFeatures, batch_size: int, device: torch.device) -> torch.Tensor:
    """Features of a stack of preprocessed images, in batches."""
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)] or [images]  # (0, D) if empty
    return torch.cat([extractor(batch.to(device)).cpu() for batch in batches])


def memorisation_summary(nearest: np.ndarray, reference: np.ndarray, copy_percentile: float = 1.0) -> dict:
    """Where each sample's nearest distance falls among real images' nearest-other distances.

    percentile = % of real images closer to their nearest other training image
    than the sample is to its nearest; below `copy_percentile` → a possible copy.
    """
    reference = np.sort(np.asarray(reference, dtype=np.float64))
    reference = reference[np.isfinite(reference)]
    if len(reference) == 0:
        percentiles = np.full(len(nearest), np.nan)
        threshold = float("nan")
    else:
        percentiles = 100.0 * np.searchsorted(reference, nearest, side="left") / len(reference)
        threshold = float(np.percentile(reference, copy_percentile))
    flagged = np.asarray(nearest) < threshold if len(reference) else np.zeros(len(nearest), bool)
    return {
        "percentiles": percentiles,
        "flagged": flagged,
        "threshold": threshold,
        "num_flagged": int(flagged.sum()),
        "median_percentile": float(np.median(percentiles)) if len(percentiles) else float("nan"),
        "reference_median_distance": float(np.median(reference)) if len(reference) else float("nan"),
    }


@dataclass
class NeighbourReport:
    """Samples, their k nearest training images, and the memorisation verdict."""

    sample_names: list[str]
    samples: torch.Tensor  # (n, 3, H, W) in [-1, 1], preprocessed
    result: SearchResult
    labels: dict[int, str]  # dataset index → file path, or "index:<i>"
    thumbnails: dict[int, torch.Tensor]  # dataset index → preprocessed image
    verdict: dict
    settings: dict

    def rows(self) -> Iterator[tuple[str, int, str, float]]:
        """(sample, rank, neighbour, distance), as in the CSV."""
        for name, distances, indices in zip(self.sample_names, self.result.sample_distances,
                                            self.result.sample_indices):
            for rank, (distance, index) in enumerate(zip(distances.tolist(), indices.tolist()), start=1):
                if math.isfinite(distance):
                    yield name, rank, self.labels[index], distance


def find_neighbours(samples: list, sample_names: list[str], dataset, *, resolution: int, k: int = 5,
                    net: str = "alex", lpips_weights: str | None = None, random_backbone: bool = False,
                    batch_size: int = 64, feature_cache: str | None = None, num_reference: int = 1000,
                    seed: int = 0, label_by_path: bool = True, dataset_identity: dict | None = None,
                    num_workers: int = 0, accelerator=None, progress: bool = True) -> NeighbourReport:
    """Each sample's k nearest images of `dataset` under LPIPS, and the real-to-real reference distances.

    `samples`: images in any form `ImagePreprocessor` takes (PIL, paths, tensors).
    Every image, sample or training image, gets the training preprocessing
    (shorter side to `resolution`, centre crop; no flip).
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    # The pruning bound assumes true float32 products: no TF32 or bf16 reduced-precision matmuls.
    torch.set_float32_matmul_precision("highest")
    check_lpips_resolution(net, resolution)
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    num_processes = accelerator.num_processes if accelerator is not None else 1
    preprocess = ImagePreprocessor(resolution, center_crop=True, random_flip=False)
    pixels = preprocess_samples(samples, sample_names, preprocess)
    lpips_model = load_lpips(net, lpips_weights, random_backbone)
    extractor = LpipsFeatures(lpips_model).to(device)

    sample_features = featurise(pixels, extractor, batch_size, device)
    reference_indices = choose_reference_indices(dataset, num_reference, seed)
    reference_pixels, reference_indices = _decode_indices(dataset, reference_indices, preprocess)
    reference_features = featurise(reference_pixels, extractor, batch_size, device)

    identity = {"net": net, "backbone_sha256": weights_fingerprint(lpips_model.state_dict().values())[:16], "resolution": resolution,
                "batch_size": batch_size, "dataset": dataset_identity or {},
                **dataset_contents(dataset, (dataset_identity or {}).get("train_data_dir"))}
    plan = DatasetPass(batch_size, accelerator.process_index if accelerator else 0, num_processes,
                       prepare_feature_cache(feature_cache, identity))
    total = None if isinstance(dataset, datasets.IterableDataset) else len(dataset)
    is_main = accelerator is None or accelerator.is_main_process
    with tqdm(total=total and math.ceil(total / num_processes), desc="neighbours: training images", unit="img",
              dynamic_ncols=True, disable=not (progress and is_main)) as bar:
        result = search(sample_features, reference_features, reference_indices, dataset, extractor, preprocess,
                        k, plan, device, bar.update, gather_object if num_processes > 1 else (lambda x: x),
                        num_workers)
    if result.num_searched == 0:
        raise no_readable_images(result, dataset_identity or {})

    found = sorted({int(i) for i in result.sample_indices.flatten().tolist() if i >= 0})
    sources = fetch_images(dataset, found)
    labels = {i: _label(sources[i], i, label_by_path) for i in found}
    thumbnails = {i: preprocess(sources[i]) for i in found}
    verdict = memorisation_summary(result.sample_distances[:, 0].numpy(), result.reference_distances.numpy())
    backbone = f"weights from {Path(lpips_weights).name}" if lpips_weights else (
        "randomly initialised" if random_backbone else "ImageNet")
    settings = {"net": net, "backbone": backbone, "resolution": resolution, "k": k}
    return NeighbourReport(list(sample_names), pixels, result, labels, thumbnails, verdict, settings)


def no_readable_images(result: SearchResult, data: dict) -> InputError:
    """The error for training data that held no image that could be read: where, how many, a few of them."""
    where = data.get("train_data_dir") or data.get("dataset_name") or "the training data"
    examples = "; ".join(result.skipped_examples)
    return InputError(f"no readable training images in {where} ({result.num_skipped} skipped"
                      f"{': ' + examples if examples else ''}); check the folder or dataset")


def _decode_indices(dataset, indices: list[int], preprocess: ImagePreprocessor) -> tuple[torch.Tensor, list[int]]:
    sources = fetch_images(dataset, indices)
    pixels, indices = decode_batch([(i, sources[i]) for i in indices if i in sources], preprocess)[:2]
    return pixels, indices.tolist()


def _label(source, index: int, by_path: bool) -> str:
    path = source.get("path") if isinstance(source, dict) else None
    return str(path) if by_path and path else f"index:{index}"
