"""`lsun-ddpm evaluate`: both feature passes for a model, the metrics, and evaluation.json with its note.

`evaluation.json` holds the fields the model card reads (`fid`, `kid`,
`precision`, `recall`, `note`; `lsun-ddpm push` publishes them as the card's
`model-index`) and everything else that the numbers depend on.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

from accelerate import Accelerator

from ..errors import InputError
from ..files import check_output_folder
from ..hardware import fast_precision_available
from ..layout import EVALUATION_FILE
from ..sample.loading import load_scheduler_config, load_unet, weights_to_use
from ..sample.sampling import SamplingPlan, check_inference_steps, choose_sampler
from .inception_features import InceptionFeatures, load_inception
from .metrics import KID_SUBSETS, MIN_IMAGES, PRC_NEIGHBOURS, check_libraries, compute_metrics
from .neighbours_report import data_options, finite_or_none, model_resolution, write_json
from .reference import (PREPROCESSING, ReferenceStats, default_cache_file, differences, reference_features,
                        reference_identity, sample_features)

CUSTOMARY_SAMPLES = 50_000
WEIGHT_NAMES = {"ema": "EMA", "raw": "raw (non-EMA)"}


def run_evaluate_command(args) -> None:
    """`lsun-ddpm evaluate` after its flags were checked: reference, samples, metrics, evaluation.json.

    Under `accelerate launch` both passes are shared between the processes;
    the main process computes the metrics and writes the files.
    """
    has_ema, weights = check_evaluation_inputs(args)
    accelerator = Accelerator()
    with accelerator.main_process_first():  # a download goes once into torch.hub's cache, then is reused
        extractor = load_inception(args.inception_weights).to(accelerator.device)
    unet = load_unet(args.model, weights, has_ema).to(accelerator.device)  # before the reference pass: fails fast
    started = time.perf_counter()
    reference, reference_file, computed = obtain_reference(args, extractor, model_resolution(args.model), accelerator)
    reference_seconds = time.perf_counter() - started
    plan = SamplingPlan(args.scheduler, args.num_inference_steps, args.batch_size, args.bf16, args.torch_compile,
                        args.torch_compile_mode)
    started = time.perf_counter()
    samples = sample_features(unet, load_scheduler_config(args.model), plan, args.num_samples, args.seed, extractor,
                              accelerator, args.samples_dir)
    sample_seconds = time.perf_counter() - started
    if accelerator.is_main_process:
        # on the accelerator: precision/recall's n × n distances are the costly part at 50k
        metrics = compute_metrics(reference.features.to(accelerator.device), samples.to(accelerator.device),
                                  seed=args.seed)
        settings = {
            "model": args.model, "weights": weights, "scheduler": plan.scheduler, "num_inference_steps": plan.steps,
            "num_samples": args.num_samples, "seed": args.seed,
            "precision_of_sampling": "bf16" if plan.bf16 and fast_precision_available(unet.device) else "fp32",
        }
        timing = {"num_processes": accelerator.num_processes, "reference_computed": computed,
                  "reference_seconds": round(reference_seconds, 2), "sample_seconds": round(sample_seconds, 2)}
        summary = evaluation_summary(metrics, settings, reference, reference_file, extractor, timing)
        path = Path(args.run_dir) / EVALUATION_FILE
        write_json(summary, path)
        print(summary["note"])
        print(f"FID {metrics['fid']:.4g}, KID {kid_text(metrics)}, "
              f"precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f}; wrote {path}"
              + (f" (reference statistics: {reference_file})" if computed else ""))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # ends the process group: a worker exiting with it alive may abort in gloo's threads


def check_evaluation_inputs(args) -> tuple[bool, str]:
    """Refuse, before any work, what the evaluation could not use; fill in --run_dir; return (whether the run kept
    an EMA, the weights that will be sampled)."""
    if args.inception_weights and not Path(args.inception_weights).is_file():
        raise InputError(f"--inception_weights {args.inception_weights!r} is not a file")
    if args.reference_stats:
        check_reference_stats_path(args.reference_stats)
    if args.run_dir is None:
        args.run_dir = args.model if Path(args.model).is_dir() else "."
    check_output_folder(args.run_dir, "--run_dir")
    if args.samples_dir:
        check_output_folder(args.samples_dir, "--samples_dir")
    check_libraries()
    args.scheduler, args.num_inference_steps = choose_sampler(args.model, args.scheduler, args.num_inference_steps)
    # fails fast on a model that is not there, and on more steps than it has timesteps
    check_inference_steps(SamplingPlan(args.scheduler, args.num_inference_steps), load_scheduler_config(args.model))
    return weights_to_use(args.model, args.weights)


def check_reference_stats_path(path: str) -> None:
    if Path(path).is_dir():
        raise InputError(f"--reference_stats {path!r} is a folder: give a file name such as reference.npz")
    if not Path(path).exists():
        if Path(path).suffix != ".npz":
            raise InputError(f"--reference_stats {path!r} must end in .npz (numpy's format; it is written there)")
        check_output_folder(Path(path).parent, "--reference_stats")


def obtain_reference(args, extractor: InceptionFeatures, resolution: int, accelerator
                     ) -> tuple[ReferenceStats, Path, bool]:
    """(the reference statistics, their file, whether they were computed now rather than read).

    `--reference_stats FILE` that exists is used as it is, after checking
    that its features come from this network at this resolution (and from
    the data flags, when any are given); otherwise the statistics are read
    from, or computed into, FILE or the cache file of this set-up.
    """
    from ..data.sources import load_image_dataset

    explicit = Path(args.reference_stats) if args.reference_stats else None
    if explicit is not None and explicit.is_file() and not (args.dataset_name or args.train_data_dir):
        stored = ReferenceStats.load(explicit)
        check_reference(stored, explicit, resolution, extractor)
        return stored, explicit, False
    data = {**data_options(args), "streaming": False}
    with accelerator.main_process_first():
        dataset = load_image_dataset(**data)
    if len(dataset) < MIN_IMAGES:  # now, not after the samples are made
        raise InputError(f"the training data holds {len(dataset)} images; precision/recall's k = {PRC_NEIGHBOURS} "
                         f"nearest neighbours need at least {MIN_IMAGES}")
    identity = reference_identity(data, len(dataset), resolution, args.num_reference, extractor.info,
                                  extractor.convention)
    path = explicit or default_cache_file(identity)
    if path.is_file():
        stored = ReferenceStats.load(path)
        different = differences(stored.identity, identity)
        if not different:
            return stored, path, False
        if explicit is not None:
            raise InputError(f"--reference_stats {str(path)!r} holds the statistics of another set-up "
                             f"({different}); give a new file, or the options it was made with")
    reference = reference_features(dataset, extractor, resolution, identity, args.batch_size, accelerator,
                                   args.dataloader_num_workers)
    if accelerator.is_main_process:
        reference.save(path)
    accelerator.wait_for_everyone()
    return reference, path, True


def check_reference(stored: ReferenceStats, path: Path, resolution: int, extractor: InceptionFeatures) -> None:
    """An InputError unless `stored` was computed at `resolution` with this extractor's network."""
    wanted = {"resolution": resolution,
              "features": {"weights_sha256": extractor.info.weights_sha256, "input": extractor.convention}}
    different = differences({key: stored.identity.get(key) for key in wanted}, wanted)
    if different:
        raise InputError(f"--reference_stats {str(path)!r} does not fit this evaluation ({different}): "
                         "give the data flags to compute new statistics")


def evaluation_summary(metrics: dict, settings: dict, reference: ReferenceStats, reference_file: Path,
                       extractor: InceptionFeatures, timing: dict) -> dict:
    """evaluation.json: the numbers (null where undefined), the note, and what they were computed from."""
    identity = reference.identity
    summary = {
        **{key: finite_or_none(metrics[key]) for key in ("fid", "kid", "kid_std", "precision", "recall")},
        "note": evaluation_note(metrics, settings, identity, extractor, len(reference.features), reference.num_skipped),
        **settings,
        "reference": {"file": str(reference_file), "num_images": len(reference.features),
                      "num_unreadable_skipped": reference.num_skipped, "data": identity.get("data"),
                      "dataset_size": identity.get("dataset_size"), "resolution": identity.get("resolution"),
                      "preprocessing": identity.get("preprocessing")},
        "feature_extractor": {"description": extractor.info.description, "source": extractor.info.source,
                              "weights_sha256": extractor.info.weights_sha256, "standard": extractor.info.standard,
                              "resize": "299 x 299, TensorFlow-1 bilinear (torch-fidelity)"},
        "kid_subsets": KID_SUBSETS, "kid_subset_size": metrics["kid_subset_size"],
        "precision_recall_k": PRC_NEIGHBOURS,
        "timing": timing,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return summary


def evaluation_note(metrics: dict, settings: dict, identity: dict, extractor: InceptionFeatures,
                    num_reference: int, num_skipped: int = 0) -> str:
    """What was measured, in sentences for the model card: sampler, samples, reference set (`num_reference`
    images read, `num_skipped` unreadable ones left out), feature extractor."""
    size = identity["dataset_size"]
    if identity["num_reference"] < size:
        chosen = f"{num_reference:,} random images of the {size:,}"
    else:
        chosen = f"the {num_reference:,} readable images of the {size:,}" if num_skipped else f"all {size:,} images"
    text = (f"Measured with `lsun-ddpm evaluate`: {settings['num_samples']:,} samples from the {WEIGHT_NAMES[settings['weights']]} "
            f"weights ({settings['scheduler']}, {settings['num_inference_steps']} steps, seed {settings['seed']}, "
            f"{settings['precision_of_sampling']}) against {chosen} of the training data ({data_name(identity)}) "
            f"at {identity['resolution']} px ({identity.get('preprocessing', PREPROCESSING)}). Images resized to 299 px "
            f"(TensorFlow-1 bilinear) for the feature network: {extractor.info.description}. "
            f"{kid_method(metrics)}; precision and recall: k = {PRC_NEIGHBOURS} nearest neighbours.")
    if settings["num_samples"] < CUSTOMARY_SAMPLES:
        text += (f" FID is biased upwards with fewer samples than the customary {CUSTOMARY_SAMPLES:,}: compare it only "
                 f"with FIDs of {settings['num_samples']:,} samples.")
    return text + (" Published LSUN-bedroom FIDs are measured at 256 px against other reference sets, so they are "
                   "no yardstick for these numbers.")


def kid_text(metrics: dict) -> str:
    """KID as printed: "0.0123 ± 0.0004", or without a spread when it has none (see `kernel_distance`)."""
    if metrics["kid_std"] is None:
        return f"{metrics['kid']:.4g} (one subset: no spread)"
    return f"{metrics['kid']:.4g} ± {metrics['kid_std']:.2g}"


def kid_method(metrics: dict) -> str:
    """How KID was computed, in words for the note."""
    size = metrics["kid_subset_size"]
    if metrics["kid_std"] is None:
        return (f"KID: from one subset ({size:,} samples against {size:,} reference images, all there are), so its "
                "spread is undefined and none is given; more samples give one")
    return f"KID: mean ± standard deviation over {KID_SUBSETS} subsets of {size:,}"


def data_name(identity: dict) -> str:
    """The reference data in words: the Hub dataset's id or the local folder's name (and the subset)."""
    data = identity.get("data") or {}
    name = data.get("dataset_name") if not data.get("train_data_dir") else f"local folder {Path(data['train_data_dir']).name}"
    limit = data.get("max_train_samples")
    return (name or "unrecorded data") + (f", first {limit:,} images" if limit else "")
