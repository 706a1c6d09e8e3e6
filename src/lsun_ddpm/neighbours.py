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

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import datasets
import numpy as np
import torch

from .data import REPORTED_EXAMPLES, ImagePreprocessor, UNREADABLE_IMAGE_ERRORS, describe_image_source, walk_images
from .errors import InputError
from .lpips_features import LpipsFeatures, check_lpips_resolution, load_lpips
from .lsun_lmdb import LMDB_DATA_FILE, is_lmdb_export
from .models import weights_fingerprint

# The candidates scored exactly per query and batch, beyond k: covers float32
# rounding in the expanded product (ties among near-duplicates aside).
EXACT_RESCORING_SLACK = 16
# A bound, relative to ‖q‖² + ‖x‖², on the float32 error of the expanded
# distance (float32's epsilon is 6e-8: this leaves three orders of margin).
FLOAT32_TOLERANCE = 1e-4
CACHE_FORMAT = 1
# The parts of the cache's identity that say which images the data options named when it was written.
CONTENTS_KEYS = ("num_images", "images_sha256")


# ---------------------------------------------------------------- running top-k


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


# ---------------------------------------------------------------- the dataset pass


@dataclass
class DatasetPass:
    """How this process walks the dataset: which batches, how large, and the feature cache."""

    batch_size: int
    process_index: int = 0
    num_processes: int = 1
    cache_dir: Path | None = None
    num_images: int = 0  # filled in as the pass goes
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)  # "file (why)" of the first few skipped

    def owns(self, batch: int) -> bool:
        return batch % self.num_processes == self.process_index

    def cache_file(self, batch: int) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"batch-{batch:08d}.safetensors"


def stream_batches(stream: datasets.IterableDataset, batch_size: int) -> Iterator[tuple[int, list]]:
    """(batch number, [(dataset index, undecoded image)]) for consecutive batches of a stream."""
    batch, members = 0, []
    for index, example in enumerate(stream):
        if index // batch_size != batch:
            yield batch, members
            batch, members = index // batch_size, []
        members.append((index, example["image"]))
    if members:
        yield batch, members


class DecodedBatches(torch.utils.data.Dataset):
    """Item i: (batch number, pixels, indices, skipped) of this process's i-th map-style batch.

    A DataLoader over it decodes batches in worker processes
    (`--dataloader_num_workers`); a batch already in the feature cache is
    not decoded (pixels is None).
    """

    def __init__(self, dataset: datasets.Dataset, plan: DatasetPass, preprocess: ImagePreprocessor):
        self.dataset, self.plan, self.preprocess = dataset, plan, preprocess
        self.batches = range(plan.process_index, math.ceil(len(dataset) / plan.batch_size), plan.num_processes)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, item: int):
        batch = self.batches[item]
        cached = self.plan.cache_file(batch)
        if cached is not None and cached.is_file():
            return batch, None, None, []
        start = batch * self.plan.batch_size
        members = list(enumerate(self.dataset[start:start + self.plan.batch_size]["image"], start))
        return (batch, *decode_batch(members, self.preprocess))


def decoded_batches(dataset, plan: DatasetPass, preprocess: ImagePreprocessor, num_workers: int = 0):
    """(batch number, pixels or None when cached, indices, skipped images) for this process's batches, in order."""
    if isinstance(dataset, datasets.IterableDataset):
        # A stream is read in order by every process, each keeping its own batches (reading
        # undecoded bytes is cheap next to decoding them); it is decoded here, as it arrives.
        for batch, members in stream_batches(dataset, plan.batch_size):
            cached = plan.cache_file(batch)
            if not plan.owns(batch):
                continue
            if cached is not None and cached.is_file():
                yield batch, None, None, []
            else:
                yield (batch, *decode_batch(members, preprocess))
        return
    yield from torch.utils.data.DataLoader(DecodedBatches(dataset, plan, preprocess), batch_size=None,
                                           num_workers=num_workers, collate_fn=_unchanged)


def _unchanged(item):
    return item


def decode_batch(members: list[tuple[int, object]], preprocess: ImagePreprocessor
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(pixels (n, 3, H, W), their dataset indices, "file (why)" of each unreadable image skipped)."""
    pixels, indices, skipped = [], [], []
    for index, source in members:
        try:
            pixels.append(preprocess(source))
            indices.append(index)
        except UNREADABLE_IMAGE_ERRORS as error:
            skipped.append(f"{describe_image_source(source)} ({error})")
            warnings.warn(f"skipping unreadable image {skipped[-1]}")
    empty = torch.empty(0, 3, preprocess.resolution, preprocess.resolution)
    return (torch.stack(pixels) if pixels else empty), torch.tensor(indices, dtype=torch.long), skipped


def featurised_batches(dataset, extractor: LpipsFeatures, preprocess: ImagePreprocessor, plan: DatasetPass,
                       device: torch.device, on_batch: Callable[[int], None] = lambda n: None,
                       num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features, dataset indices) of each of this process's batches, read from or written to the cache.

    A cache file is written under a temporary name and renamed when complete,
    so an interrupted pass leaves only whole files, which the next run reuses.
    """
    from safetensors.torch import load_file, save_file

    for batch, pixels, indices, skipped in decoded_batches(dataset, plan, preprocess, num_workers):
        cached = plan.cache_file(batch)
        if pixels is None:
            stored = load_file(str(cached))
            features, indices, num_skipped = stored["features"], stored["indices"], int(stored["skipped"])
        else:
            features = extractor(pixels.to(device)).cpu() if len(indices) else torch.empty(0, 0)
            num_skipped = len(skipped)
            if cached is not None:  # it keeps the number skipped, not which files
                staging = cached.with_name(f".{cached.name}.partial-{os.getpid()}")
                save_file({"features": features.contiguous(), "indices": indices,
                           "skipped": torch.tensor(num_skipped)}, str(staging))
                os.replace(staging, cached)
            plan.skipped_examples = (plan.skipped_examples + skipped)[:REPORTED_EXAMPLES]
        plan.num_images += len(indices)
        plan.skipped += num_skipped
        on_batch(len(indices) + num_skipped)
        if len(indices):
            yield features.to(device), indices


def prepare_feature_cache(cache_dir: str | None, identity: dict) -> Path | None:
    """The cache folder, checked against what its features were computed from (net, data, resolution...)."""
    if cache_dir is None:
        return None
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    identity = {"format": CACHE_FORMAT, **identity}
    meta = folder / "cache.json"
    if meta.is_file():
        stored = json.loads(meta.read_text())
        different = {key: (stored.get(key), value) for key, value in identity.items() if stored.get(key) != value}
        if different:
            described = ", ".join(f"{key}: cached {old!r}, now {new!r}" for key, (old, new) in different.items())
            if set(different) <= set(CONTENTS_KEYS):
                raise InputError(f"--feature_cache {cache_dir!r} holds features of the training images as they "
                                 f"were before they changed ({described}); give a new folder or delete this one")
            raise InputError(f"--feature_cache {cache_dir!r} holds features of another set-up ({described}); "
                             "give a new folder or the same options")
    else:
        staging = meta.with_name(f".cache.json.partial-{os.getpid()}")
        staging.write_text(json.dumps(identity, indent=2))
        os.replace(staging, meta)
    return folder


def dataset_contents(dataset, train_data_dir: str | None) -> dict:
    """The cache identity's `CONTENTS_KEYS`: how many images `dataset` holds and a hash of what they are.

    The options that name the data stay the same when images are added to
    its folder or changed: cached batches would then be matched against
    shifted indices. A 🤗 map-style dataset has its fingerprint (a hash of its
    source files with their modification times, or of the Hub revision); a
    stream has none (nor a length), so a local folder's files are hashed here.
    """
    if not isinstance(dataset, datasets.IterableDataset):
        return {"num_images": len(dataset), "images_sha256": dataset._fingerprint}
    return {"num_images": None, "images_sha256": files_sha256(train_data_dir) if train_data_dir else None}


def files_sha256(folder: str) -> str:
    """A hash of the image files below `folder` (an LMDB export: its data file): relative names, sizes, mtimes."""
    files = [os.path.join(folder, LMDB_DATA_FILE)] if is_lmdb_export(folder) else sorted(walk_images(folder))
    digest = hashlib.sha256()
    for path in files:
        status = os.stat(path)
        digest.update(f"{os.path.relpath(path, folder)}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- the search


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


# ---------------------------------------------------------------- the memorisation verdict


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


# ---------------------------------------------------------------- the whole command


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
