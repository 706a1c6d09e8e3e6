"""The exact LPIPS search against the pair-by-pair `lpips` loop, at identical results; and the LSUN projection.

    python bench/neighbours_speed.py --train_data_dir DIR --num_train 128 --num_samples 16
    python bench/neighbours_speed.py --num_train 64 --json bench-neighbours.json   # generated images

Both sides use the same backbone weights (random unless --lpips_weights: the
cost does not depend on the weights) and the same preprocessed images, and the
benchmark checks that they find the same neighbours and distances. The loop is
given its best case: one `lpips.LPIPS` call per training image, batched over
all samples (a strictly pair-at-a-time loop is slower still).

It also measures the three costs of a full-dataset pass (decoding +
preprocessing per image, backbone features per image, and the float32 matrix
product against the queries) and projects the wall time of 64 samples against
all 3,033,042 LSUN bedrooms from them.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lsun_ddpm.data.preprocessing import ImagePreprocessor
from lsun_ddpm.data.sources import load_image_dataset
from lsun_ddpm.evaluate.lpips_features import LpipsFeatures, load_lpips
from lsun_ddpm.evaluate.neighbours import find_neighbours
from lsun_ddpm.sample.sampling import to_pil

LSUN_BEDROOMS = 3_033_042


def make_images(count: int, resolution: int, seed: int) -> torch.Tensor:
    """Smooth random images in [-1, 1]: a stand-in when no folder is given."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 8, 8, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=resolution, mode="bicubic").clamp(-1, 1)


def save_random_backbone(net: str, path: Path) -> str:
    """A seeded random torchvision backbone, saved as torchvision saves its weights (the cost is the same)."""
    import torchvision

    torch.manual_seed(0)
    builder = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16,
               "squeeze": torchvision.models.squeezenet1_1}[net]
    torch.save(builder().state_dict(), path)
    return str(path)


def timed(function, repeat: int = 1):
    started = time.perf_counter()
    for _ in range(repeat):
        result = function()
    return result, (time.perf_counter() - started) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_data_dir", help="a folder of training images (default: generated images)")
    parser.add_argument("--num_train", type=int, default=128)
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--net", default="alex")
    parser.add_argument("--lpips_weights")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--gpu_tflops", type=float, default=20.0,
                        help="assumed sustained fp32 TFLOP/s of one GPU for the projection (no TF32: see docs)")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="decoding processes of the search")
    parser.add_argument("--decode_workers", type=int, default=16,
                        help="for the projection: CPU cores decoding for each GPU (--dataloader_num_workers)")
    parser.add_argument("--num_queries", type=int, default=64 + 1000, help="samples + reference queries")
    args = parser.parse_args()

    import lpips

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = Path(tempfile.mkdtemp(prefix="bench-neighbours-"))
    weights = args.lpips_weights or save_random_backbone(args.net, folder / "backbone.pth")
    model = load_lpips(args.net, weights).to(device)
    preprocess = ImagePreprocessor(args.resolution)
    if args.train_data_dir:
        originals = load_image_dataset(train_data_dir=args.train_data_dir, max_train_samples=args.num_train)
        started = time.perf_counter()
        images = [preprocess(example["image"]) for example in originals]
        decode_per_image = (time.perf_counter() - started) / len(images)
    else:
        images, decode_per_image = list(make_images(args.num_train, args.resolution, 0)), float("nan")
    # Both methods read the same 128-px images: the search decodes these PNGs (lossless, already at the
    # resolution, so preprocessing is the identity); the loop gets them decoded for free.
    for index, image in enumerate(to_pil(torch.stack(images))):
        image.save(folder / f"{index:06d}.png")
    dataset = load_image_dataset(train_data_dir=str(folder))
    train = torch.stack([preprocess(example["image"]) for example in dataset])
    # 8-bit, as every image the search reads (a float tensor is quantised by the preprocessing)
    samples = ((make_images(args.num_samples, args.resolution, 1) + 1) * 127.5).round() / 127.5 - 1
    samples[: min(2, len(samples))] = train[: min(2, len(samples))]  # two exact copies: a known answer

    # the pair-by-pair loop, at its best: one call per training image against all samples
    def loop():
        with torch.no_grad():
            return torch.stack([model(samples.to(device), image[None].expand_as(samples).to(device)).flatten().cpu()
                                for image in train], dim=1).double()
    expected, loop_seconds = timed(loop)

    def search():
        return find_neighbours(list(samples), [str(i) for i in range(len(samples))], dataset,
                               resolution=args.resolution, k=5, net=args.net, lpips_weights=weights,
                               batch_size=args.batch_size, num_workers=args.dataloader_num_workers,
                               num_reference=0, progress=False)
    search()  # warm-up: builds the backbone once, as the loop's was built above
    report, search_seconds = timed(search)
    extractor = LpipsFeatures(model).to(device)

    order = np.argsort(expected.numpy(), axis=1, kind="stable")[:, :5]
    same_neighbours = np.array_equal(order, report.result.sample_indices.numpy())
    expected_distances = np.take_along_axis(expected.numpy(), order, axis=1)
    error = np.abs(report.result.sample_distances.numpy() - expected_distances)
    copies = expected_distances < 1e-4  # the two exact copies: compare absolutely (both ~0)
    relative = error[~copies] / expected_distances[~copies]

    # the three costs of a dataset pass
    with torch.no_grad():
        batch = train[: args.batch_size].to(device)
        extractor(batch)
        _, feature_seconds = timed(lambda: extractor(batch), repeat=3)
        features = extractor(batch)
    per_image_features = feature_seconds / len(batch)
    queries = torch.randn(args.num_queries, features.shape[1], device=device)
    _, matmul_seconds = timed(lambda: queries @ features.T, repeat=5)
    matmul_flops = 2 * queries.shape[0] * features.shape[1] * features.shape[0]
    matmul_per_image = matmul_seconds / len(batch)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        extractor(batch[:1])
    backbone_flops = counter.get_total_flops()
    gpu_seconds_per_image = (backbone_flops + 2 * args.num_queries * features.shape[1]) / (args.gpu_tflops * 1e12)
    # Without --train_data_dir nothing was decoded, so no GPU rate can be projected: decoding bounds it.
    decoded = not math.isnan(decode_per_image)
    gpu_images_per_s = min(1 / gpu_seconds_per_image, args.decode_workers / decode_per_image) if decoded else None
    results = {
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "lpips": getattr(lpips, "__version__", "?"), "net": args.net, "resolution": args.resolution,
        "num_train": len(train), "num_samples": len(samples), "feature_dim": features.shape[1],
        "loop_images_per_s": len(train) / loop_seconds, "search_images_per_s": len(train) / search_seconds,
        "speedup": loop_seconds / search_seconds, "same_neighbours": bool(same_neighbours),
        "max_relative_distance_error": float(relative.max()),
        "max_absolute_error_exact_copies": float(error[copies].max()) if copies.any() else None,
        "decode_s_per_image": decode_per_image if decoded else None, "features_s_per_image": per_image_features,
        "matmul_gflop_per_s": matmul_flops / matmul_seconds / 1e9,
        "matmul_s_per_image_1064_queries": matmul_per_image,
        "feature_gflop_per_image": backbone_flops / 1e9,
        "assumed_gpu_tflops": args.gpu_tflops, "assumed_decode_workers_per_gpu": args.decode_workers,
        "projected_gpu_images_per_s": gpu_images_per_s,
        "projected_lsun_minutes_1_gpu": LSUN_BEDROOMS / gpu_images_per_s / 60 if decoded else None,
        "projected_lsun_minutes_8_gpus": LSUN_BEDROOMS / gpu_images_per_s / 60 / 8 if decoded else None,
        # one process, decoding in series with the features (no --dataloader_num_workers)
        "projected_lsun_hours_this_device": LSUN_BEDROOMS * (per_image_features + matmul_per_image
                                                             + np.nan_to_num(decode_per_image)) / 3600,
    }
    print(f"{args.net} at {args.resolution} px, {len(samples)} samples x {len(train)} training images, {device}, "
          f"{torch.get_num_threads()} threads, feature dim {features.shape[1]:,}")
    print("| method | training images / s | same neighbours | max rel. distance error |\n|---|---|---|---|")
    print(f"| lpips.LPIPS loop (one call per training image, all samples batched) | {results['loop_images_per_s']:.1f} | "
          f"reference | - |")
    print(f"| exact feature search | {results['search_images_per_s']:.1f} | {same_neighbours} | {relative.max():.1e} |")
    print(f"(exact copies: distance error {results['max_absolute_error_exact_copies']:.1e} absolute)")
    print(f"speed-up: {results['speedup']:.0f}x")
    print(f"per image: decode+preprocess {decode_per_image * 1e3:.2f} ms (one core), backbone features "
          f"{per_image_features * 1e3:.2f} ms, matrix product vs 1,064 queries {matmul_per_image * 1e3:.3f} ms "
          f"({results['matmul_gflop_per_s']:.0f} GFLOP/s)")
    gpu = (f"one GPU at {args.gpu_tflops:g} TFLOP/s with {args.decode_workers} decoding cores: "
           f"{gpu_images_per_s:,.0f} img/s, {results['projected_lsun_minutes_1_gpu']:.0f} min; 8 GPUs: "
           f"{results['projected_lsun_minutes_8_gpus']:.0f} min" if decoded
           else "GPU: not projected (give --train_data_dir: decoding real photos bounds it)")
    print(f"features: {backbone_flops / 1e9:.2f} GFLOP per image; projected for {LSUN_BEDROOMS:,} images with "
          f"{args.num_queries} queries: this device {results['projected_lsun_hours_this_device']:.1f} h; {gpu}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2, allow_nan=False)  # strict JSON: unknown figures are null


if __name__ == "__main__":
    main()
