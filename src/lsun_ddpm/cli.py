"""`lsun-ddpm <command>`: each command parses its flags and calls one module."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import DEBUG_FLAG, INPUT_ERROR_STATUS, InputError, did_you_mean, run_command, take_debug_flag

COMMANDS = {
    "train": "train the DDPM (same flags as train_unconditional.py; see `lsun-ddpm train --help`)",
    "demo": "a few minutes of training on bundled photos, then the paper's figures from it and a pipeline folder",
    "sample": "sample an image grid from a pipeline folder or Hub repo (fast DPM-Solver++ by default)",
    "interpolate": "interpolation strips between pairs of images or seeds (the paper's Fig. 2b)",
    "neighbours": "each sample's nearest training images under LPIPS, exact over the whole dataset (Fig. 4)",
    "evaluate": "FID, KID and precision/recall of a model's samples against its training data (evaluation.json)",
    "prepare": "decode and resize the training images once into a dataset that training reads without decoding",
    "push": "publish a run folder as a Hub model repo, with its model card (or --dry_run DIR)",
    "push-space": "publish the Gradio Space for a published model (or --dry_run DIR)",
    "convert-adm": "convert an OpenAI guided-diffusion (ADM) checkpoint, e.g. lsun_bedroom.pt, into a stock "
                   "DDPMPipeline folder",
}


def train_command(argv: list[str]) -> None:
    from .train.loop import train_from_command_line

    train_from_command_line(argv, program="lsun-ddpm train")


def demo_command(argv: list[str]) -> None:
    from .train.parsing import check_training_inputs, parse_training_config, read_model_config
    from .demo import demo_defaults, overview, paper_figures, write_demo_images
    from .files import save_image
    from .layout import DEMO_OVERVIEW
    from .evaluate.lpips_features import MIN_RESOLUTION
    from .train.loop import train

    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--output_dir", "--output-dir", default="demo-run")  # as the training parser takes it
    output_dir = pre_parser.parse_known_args(argv)[0].output_dir
    config = parse_training_config(argv, defaults=demo_defaults(output_dir), prog="lsun-ddpm demo")
    check_training_inputs(config)  # before the demo's photos are written into the output folder
    # Fig. 4 compares the samples under LPIPS (AlexNet): a resolution it cannot take would fail after training.
    size = config.resolution or read_model_config(config)["sample_size"]
    if min(size if isinstance(size, (list, tuple)) else [size]) < MIN_RESOLUTION["alex"]:
        raise InputError(f"--resolution {size}: the demo's Fig. 4 compares images under LPIPS (AlexNet), which "
                         f"takes {MIN_RESOLUTION['alex']} px or more; give a larger --resolution")
    if config.train_data_dir == demo_defaults(output_dir)["train_data_dir"]:
        count = write_demo_images(config.train_data_dir)
        print(f"demo: training {config.model_preset} on {count} crops of scikit-image's photos in "
              f"{config.train_data_dir}")
    else:  # the user's own images: read, never written into
        print(f"demo: training {config.model_preset} on the images in {config.train_data_dir}")
    output = train(config)
    save_image(overview(paper_figures(output, config)), output / DEMO_OVERVIEW)
    raw_vs_ema = " raw vs EMA weights (Fig. 1)," if config.use_ema else ""  # a run without EMA has no Fig. 1
    print(f"\ndemo finished. Open {output / DEMO_OVERVIEW}: the paper's figures from this run: samples beside "
          f"the training images (Fig. 2a),{raw_vs_ema} an interpolation (Fig. 2b) and each "
          f"sample's nearest training images (Fig. 4; full figure in {output / 'neighbours.png'}).\n"
          f"Load the model with stock diffusers: DDPMPipeline.from_pretrained({str(output)!r})")


def _add_inference_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a pipeline folder written by training, or a Hub repo id")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_bf16", dest="bf16", action="store_false",
                        help="run in fp32 (default: bf16 autocast + channels_last where the hardware is fast at it)")


def _add_compile_flags(parser: argparse.ArgumentParser) -> None:
    from .hardware import COMPILE_MODES

    parser.add_argument("--torch_compile", action="store_true",
                        help="torch.compile the U-Net first: minutes of compiling; on a CPU the compiled step "
                             "was measured no faster (docs/performance.md)")
    parser.add_argument("--torch_compile_mode", choices=COMPILE_MODES, default="default")


def _share_note(state) -> str:
    """What the main process's progress bar counts under a multi-process launch."""
    return f" (process 0's share of {state.num_processes})" if state.num_processes > 1 else ""


def _require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """parser.error (exit 2) for the first of these counts that was given and is below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive whole number, got {value}")


def _weights_to_use(model: str, weights: str) -> tuple[bool, str]:
    """(whether the run kept an EMA, the weights that will be sampled).

    A run trained with --no_use_ema has only its raw weights, in unet/: asking
    for either kind gives those (and the user is told); "both" has nothing to
    compare and is refused.
    """
    from .sample.loading import has_ema_weights, recorded_training_options

    if has_ema_weights(recorded_training_options(model)):
        return True, weights
    if weights == "both":
        raise InputError(f"{model} was trained without EMA, so there are no EMA weights to set beside the raw "
                         "ones: use --weights raw")
    print(f"note: {model} was trained without EMA (use_ema: false); its raw weights in unet/ are used")
    return False, "raw"


def sample_command(argv: list[str]) -> None:
    from accelerate.utils import gather_object

    from .files import check_image_output, check_output_folder, save_image
    from .hardware import is_compiled
    from .sample.sampling import (DEFAULT_SCHEDULER, SCHEDULERS, SamplingPlan, check_inference_steps, generate,
                              launched_process, progress_bar, this_process_share)
    from .sample.figures import image_grid, labelled_side_by_side
    from .sample.loading import load_scheduler_config, load_unet

    parser = argparse.ArgumentParser(prog="lsun-ddpm sample", description=COMMANDS["sample"])
    _add_inference_flags(parser)
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=DEFAULT_SCHEDULER,
                        help="dpmsolver++ (25 steps) by default; ddpm with 1000 steps is the paper's sampler")
    parser.add_argument("--num_inference_steps", type=int, help="default: 25 (dpmsolver++, unipc), 50 (ddim), 1000 (ddpm)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--weights", choices=("ema", "raw", "both"), default="ema",
                        help="both: the same seeds from the raw and the EMA weights side by side (the paper's Fig. 1); "
                             "a run trained without EMA has only raw weights")
    parser.add_argument("--out", default="samples.png", help="the grid (8x8 for 64 images)")
    parser.add_argument("--out_dir", help="also write one PNG per image here")
    _add_compile_flags(parser)
    args = parser.parse_args(argv)
    _require_positive(parser, args, ("num_images", "batch_size", "num_inference_steps"))
    _check_minimums(args, {"seed": 0})
    check_image_output(args.out, "--out")
    if args.out_dir:
        check_output_folder(args.out_dir, "--out_dir")

    plan = SamplingPlan(args.scheduler, args.num_inference_steps, args.batch_size, args.bf16, args.torch_compile,
                        args.torch_compile_mode)
    config = load_scheduler_config(args.model)  # fails fast on a model that is not there
    check_inference_steps(plan, config)
    has_ema, chosen = _weights_to_use(args.model, args.weights)
    # Under `accelerate launch` each process samples its share of the images, on its own device; image i
    # depends only on (seed, i), so the result is the one a single process gives.
    state = launched_process()
    share = this_process_share(args.num_images)
    panels = []
    for weights in (("raw", "ema") if chosen == "both" else (chosen,)):
        unet = load_unet(args.model, weights, has_ema).to(state.device)
        images = generate(unet, config, len(share), args.seed, plan,
                          progress_bar(f"sample ({weights}){_share_note(state)}", state.is_main_process),
                          first_index=share.start)
        if args.out_dir:
            folder = Path(args.out_dir) / weights if args.weights == "both" else Path(args.out_dir)
            for index, image in zip(share, images):
                save_image(image, folder / f"{index:05d}.png")
        panels.append((weights, gather_object(images)))  # every process's share, in index order
    if not state.is_main_process:
        return
    grids = [image_grid(images) for _, images in panels]
    grid = grids[0] if len(grids) == 1 else labelled_side_by_side([("raw", grids[0]), ("EMA", grids[1])])
    save_image(grid, args.out)
    processes = f", {state.num_processes} processes" if state.num_processes > 1 else ""
    print(f"wrote {args.out} ({args.num_images} images, {chosen} weights, {plan.scheduler}, {plan.steps} steps, "
          f"seed {args.seed}{', compiled U-Net' if is_compiled(unet) else ''}{processes})")


def interpolate_command(argv: list[str]) -> None:
    from .files import check_image_output, save_image
    from .sample.interpolation import (Pair, check_pair_images, interpolate_pairs, load_interpolation_pipeline, read_pairs,
                                   save_gif, strip)
    from accelerate.utils import gather_object

    from .pipelines.ddpm_interpolation import METHODS
    from .sample.sampling import launched_process, this_process_share
    from .sample.loading import load_scheduler_config

    parser = argparse.ArgumentParser(prog="lsun-ddpm interpolate", description=COMMANDS["interpolate"])
    _add_inference_flags(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs=2, metavar=("A", "B"), help="two image files (any size)")
    source.add_argument("--seeds", nargs=2, type=int, metavar=("S1", "S2"), help="two seeds: sample, then interpolate")
    source.add_argument("--pairs", metavar="FILE",
                        help="one pair a line: two seeds or two image paths (relative to FILE); # comments")
    parser.add_argument("--t", default="500", help="noise level (a timestep in 1..T-1) or 'auto' (chosen per pair)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--method", choices=METHODS, default="slerp",
                        help="lerp (the paper's), slerp (keeps the noise level), ddim (deterministic)")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="denoising steps from t (paper: t)")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema")
    parser.add_argument("--out", default="interpolation.png", help="the strip: one row per pair")
    parser.add_argument("--gif", help="also write an animated GIF")
    args = parser.parse_args(argv)
    t = args.t if args.t == "auto" else _int_or_error(parser, args.t)
    if args.frames < 2:
        parser.error("--frames must be at least 2")
    _require_positive(parser, args, ("num_inference_steps",))
    check_image_output(args.out, "--out")
    if args.gif and Path(check_image_output(args.gif, "--gif")).suffix.lower() != ".gif":
        raise InputError(f"--gif {args.gif!r} must end in .gif (an animated GIF is written there)")

    if args.pairs:
        pairs = read_pairs(args.pairs)
    elif args.seeds:
        pairs = [Pair(*args.seeds)]
    else:
        pairs = [Pair(*args.images)]
    check_pair_images(pairs)  # every image opened now, not after the first pair has been computed
    num_train_timesteps = load_scheduler_config(args.model).get("num_train_timesteps", 1000)
    if t != "auto" and not 1 <= t < num_train_timesteps:
        parser.error(f"--t must be 'auto' or a timestep from 1 to {num_train_timesteps - 1}, got {t}")
    has_ema, _ = _weights_to_use(args.model, args.weights)
    state = launched_process()  # under `accelerate launch`, each process interpolates its share of the pairs
    share = this_process_share(len(pairs))
    pipeline = load_interpolation_pipeline(args.model, args.weights, state.device, has_ema=has_ema)
    results = interpolate_pairs(
        pipeline, pairs[share.start:share.stop], t, args.frames, args.method, args.num_inference_steps, args.seed,
        args.bf16, on_pair=lambda i, level: print(f"pair {i + 1}/{len(pairs)}: t = {level}", flush=True),
        first_index=share.start,
    )
    results = gather_object(results)  # every process's pairs, in order
    if not state.is_main_process:
        return
    save_image(strip(results), args.out)
    if args.gif:
        save_gif(results, args.gif)
    print(f"wrote {args.out}" + (f" and {args.gif}" if args.gif else ""))


def neighbours_command(argv: list[str]) -> None:
    from .files import check_image_output, check_output_folder
    from .evaluate.neighbours_report import run_neighbours_command
    from .sample.sampling import DEFAULT_SCHEDULER, SCHEDULERS

    parser = argparse.ArgumentParser(prog="lsun-ddpm neighbours", description=COMMANDS["neighbours"])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", metavar="DIR", help="a folder of sample images (e.g. `lsun-ddpm sample --out_dir`)")
    source.add_argument("--model", metavar="MODEL", help="generate the samples from this pipeline folder or Hub repo")
    parser.add_argument("--num_samples", type=int, default=64, help="with --model")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed; also picks the reference images")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=DEFAULT_SCHEDULER)
    parser.add_argument("--num_inference_steps", type=int, help="default: the scheduler's (see `sample`)")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema")
    parser.add_argument("--no_bf16", dest="bf16", action="store_false", help="sample in fp32")
    _add_data_flags(parser, streaming=True)
    parser.add_argument("--resolution", type=int, help="default: the model's, else 128")
    parser.add_argument("--k", type=int, default=5, help="neighbours per sample")
    parser.add_argument("--net", choices=("alex", "vgg", "squeeze"), default="alex", help="LPIPS backbone")
    parser.add_argument("--lpips_weights", metavar="PATH",
                        help="torchvision ImageNet state dict of the backbone (e.g. alexnet-owt-7be5be79.pth), offline")
    parser.add_argument("--random_backbone", action="store_true",
                        help="a randomly initialised backbone (tests, offline demos; labelled as such)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per feature batch (and cache file)")
    parser.add_argument("--dataloader_num_workers", type=int, default=0,
                        help="processes decoding images (per accelerate process; not for --streaming)")
    parser.add_argument("--feature_cache", metavar="DIR", help="keep training-image features here; resumes a pass")
    parser.add_argument("--num_reference", type=int, default=1000,
                        help="training images whose nearest other training image calibrates the verdict")
    parser.add_argument("--out", metavar="FIG.png", help="the figure (default: neighbours.png, or in --run_dir)")
    parser.add_argument("--csv", metavar="FILE", help="sample,rank,neighbour,distance")
    parser.add_argument("--run_dir", metavar="DIR",
                        help="write neighbours.png and neighbours.json into this run folder (the card shows them)")
    args = parser.parse_args(argv)
    _require_positive(parser, args, ("num_samples", "k", "batch_size", "num_inference_steps"))
    _check_minimums(args, {"seed": 0})  # it seeds numpy's generators, which take no negative seed
    if args.num_reference < 0 or args.dataloader_num_workers < 0 or (args.resolution is not None and args.resolution < 8):
        parser.error("--num_reference and --dataloader_num_workers must be >= 0, --resolution >= 8")
    if args.out:
        check_image_output(args.out, "--out")
    if args.csv:
        check_output_folder(Path(args.csv).parent, "--csv")
    if args.run_dir:
        check_output_folder(args.run_dir, "--run_dir")
    run_neighbours_command(args)


def _add_data_flags(parser: argparse.ArgumentParser, streaming: bool) -> None:
    """The training data flags, as training takes them; none given: the run folder's `training_config.yaml`."""
    data = parser.add_argument_group("training data, as training takes it (default: a run folder's own)")
    data.add_argument("--dataset_name")
    data.add_argument("--dataset_config_name")
    data.add_argument("--image_column", default="image")
    data.add_argument("--train_data_dir")
    data.add_argument("--max_train_samples", type=int)
    if streaming:
        data.add_argument("--streaming", action="store_true")
    else:
        parser.set_defaults(streaming=False)
    data.add_argument("--cache_dir")


def evaluate_command(argv: list[str]) -> None:
    from .evaluate.metrics import MIN_IMAGES, check_libraries
    from .evaluate.evaluation_report import run_evaluate_command
    from .files import check_output_folder
    from .sample.sampling import DEFAULT_SCHEDULER, SCHEDULERS, SamplingPlan, check_inference_steps
    from .sample.loading import load_scheduler_config

    parser = argparse.ArgumentParser(prog="lsun-ddpm evaluate", description=COMMANDS["evaluate"])
    _add_inference_flags(parser)
    parser.add_argument("--num_samples", type=int, default=50_000, help="generated images (image i from (seed, i))")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=DEFAULT_SCHEDULER)
    parser.add_argument("--num_inference_steps", type=int, help="default: the scheduler's (see `sample`)")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema")
    parser.add_argument("--batch_size", type=int, default=64, help="images per sampling and feature batch")
    _add_data_flags(parser, streaming=False)
    parser.add_argument("--num_reference", type=int, default=50_000,
                        help="training images in the reference set (a fixed random subset; all when fewer)")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="processes decoding training images")
    parser.add_argument("--reference_stats", metavar="FILE.npz",
                        help="reference statistics to reuse, or to write (default: a cache file per set-up)")
    parser.add_argument("--inception_weights", metavar="PATH",
                        help="the FID Inception's weights offline: torch-fidelity's state dict or a TorchScript")
    parser.add_argument("--samples_dir", metavar="DIR", help="also write every sample here as a PNG")
    parser.add_argument("--run_dir", metavar="DIR", help="where evaluation.json goes (default: MODEL's folder)")
    _add_compile_flags(parser)
    args = parser.parse_args(argv)
    _check_minimums(args, {"num_samples": MIN_IMAGES, "num_reference": MIN_IMAGES, "batch_size": 1,
                           "num_inference_steps": 1, "max_train_samples": 1, "dataloader_num_workers": 0, "seed": 0},
                    why={"num_samples": "precision/recall's 3 nearest neighbours need 4 images",
                         "num_reference": "precision/recall's 3 nearest neighbours need 4 images"})
    if args.inception_weights and not Path(args.inception_weights).is_file():
        raise InputError(f"--inception_weights {args.inception_weights!r} is not a file")
    if args.reference_stats:
        _check_reference_stats_path(args.reference_stats)
    if args.run_dir is None:
        args.run_dir = args.model if Path(args.model).is_dir() else "."
    check_output_folder(args.run_dir, "--run_dir")
    if args.samples_dir:
        check_output_folder(args.samples_dir, "--samples_dir")
    check_libraries()
    # fails fast on a model that is not there, and on more steps than it has timesteps
    check_inference_steps(SamplingPlan(args.scheduler, args.num_inference_steps), load_scheduler_config(args.model))
    has_ema, weights = _weights_to_use(args.model, args.weights)
    run_evaluate_command(args, has_ema, weights)


def _check_minimums(args: argparse.Namespace, minimums: dict[str, int], why: dict[str, str] | None = None) -> None:
    """An InputError (one line) for the first of these whole numbers that was given and is below its minimum."""
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            reason = f" ({why[name]})" if why and name in why else ""
            raise InputError(f"--{name} must be at least {minimum}{reason}, got {value}")


def _check_reference_stats_path(path: str) -> None:
    from .files import check_output_folder

    if Path(path).is_dir():
        raise InputError(f"--reference_stats {path!r} is a folder: give a file name such as reference.npz")
    if not Path(path).exists():
        if Path(path).suffix != ".npz":
            raise InputError(f"--reference_stats {path!r} must end in .npz (numpy's format; it is written there)")
        check_output_folder(Path(path).parent, "--reference_stats")


def prepare_command(argv: list[str]) -> None:
    from .data.preprocessing import ImagePreprocessor
    from .data.prepare import DEFAULT_SHARD_SIZE, SourceOptions, prepare_dataset

    parser = argparse.ArgumentParser(prog="lsun-ddpm prepare", description=COMMANDS["prepare"])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset_name", help="a Hub dataset (e.g. pcuenq/lsun-bedrooms)")
    source.add_argument("--train_data_dir", help="a folder of images (any depth) or an LSUN LMDB export")
    parser.add_argument("--dataset_config_name")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--cache_dir", help="where 🤗 datasets caches downloads")
    parser.add_argument("--max_train_samples", type=int, help="the first N images only")
    parser.add_argument("--resolution", type=int, default=128, help="training must use the same")
    parser.add_argument("--center_crop", dest="center_crop", action="store_true", default=True,
                        help="centre crop (default; training must use the same)")
    parser.add_argument("--no_center_crop", dest="center_crop", action="store_false",
                        help="keep the whole resized image; training draws a random crop each epoch")
    parser.add_argument("--min_image_size", type=int, default=0, help="skip (and count) smaller images")
    parser.add_argument("--output_dir", required=True,
                        help="the prepared dataset (train with --train_data_dir DIR); a rerun finishes an interrupted one")
    parser.add_argument("--num_proc", type=int, default=1, help="processes decoding images")
    parser.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE,
                        help="images of the source per Arrow file (the unit of resuming)")
    args = parser.parse_args(argv)
    _require_positive(parser, args, ("resolution", "num_proc", "shard_size", "max_train_samples"))
    if args.min_image_size < 0:
        parser.error(f"--min_image_size must be 0 or more, got {args.min_image_size}")
    prepare_dataset(
        SourceOptions(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.image_column,
                      args.cache_dir, args.max_train_samples),
        ImagePreprocessor(args.resolution, args.center_crop, random_flip=False, min_image_size=args.min_image_size),
        args.output_dir, args.num_proc, args.shard_size,
    )


def push_command(argv: list[str]) -> None:
    from .repo_ids import check_repo_id
    from .publish.upload import prepare_upload, push_run

    parser = argparse.ArgumentParser(prog="lsun-ddpm push", description=COMMANDS["push"])
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run folder written by training")
    parser.add_argument("--hub_model_id", required=True,
                        help="USER/NAME of the model repo (a bare NAME: the token's user's)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="a branch to push to (created if missing)")
    parser.add_argument("--commit_message", default="Upload DDPM pipeline")
    parser.add_argument("--hub_token", help="default: HF_TOKEN, then the `hf auth login` cache")
    parser.add_argument("--license", default="apache-2.0",
                        help="the card's licence (a convert-adm folder keeps its own card, MIT)")
    parser.add_argument("--no_raw", dest="include_raw", action="store_false", help="leave out unet_raw/")
    parser.add_argument("--no_figures", dest="figures", action="store_false",
                        help="do not make an interpolation strip when the run has none")
    parser.add_argument("--dry_run", metavar="DIR", help="write the folder that would be uploaded to DIR; upload nothing")
    args = parser.parse_args(argv)
    check_repo_id(args.hub_model_id, "--hub_model_id")  # before anything is written: the id goes into the card
    if args.dry_run:
        prepare_upload(args.output_dir, args.dry_run, args.hub_model_id, args.include_raw, args.figures, args.license)
        print(f"wrote the folder that would be uploaded to {args.hub_model_id} into {args.dry_run}")
        return
    url = push_run(args.output_dir, args.hub_model_id, args.hub_token, args.private, args.revision,
                   args.commit_message, args.include_raw, args.figures, args.license)
    print(f"pushed {args.output_dir} to the Hub: {url}")  # the URL names the repo, USER/ included


def push_space_command(argv: list[str]) -> None:
    from .repo_ids import check_repo_id
    from .publish.space_upload import prepare_space_upload, push_space

    parser = argparse.ArgumentParser(prog="lsun-ddpm push-space", description=COMMANDS["push-space"])
    parser.add_argument("--space_id", required=True, help="USER/NAME of the Space")
    parser.add_argument("--model_id", required=True, help="the model repo the Space serves (its MODEL_ID)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--hub_token", help="default: HF_TOKEN, then the `hf auth login` cache")
    parser.add_argument("--dry_run", metavar="DIR", help="write the folder that would be uploaded to DIR; upload nothing")
    args = parser.parse_args(argv)
    check_repo_id(args.space_id, "--space_id")
    check_repo_id(args.model_id, "--model_id")
    if args.dry_run:
        prepare_space_upload(args.dry_run, args.model_id)
        print(f"wrote the Space that would be uploaded to {args.space_id} into {args.dry_run}")
        return
    url = push_space(args.space_id, args.model_id, args.hub_token, args.private)
    print(f"pushed the Space: {url}")  # the URL names it, USER/ included


CONVERT_ADM_EPILOG = """\
example (guided-diffusion's LSUN bedroom model, FID 1.90 at 256 px):
  curl -LO {url}
  lsun-ddpm convert-adm lsun_bedroom.pt adm-lsun-bedroom-256 \\
    --attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 \\
    --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 \\
    --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True \\
    --use_scale_shift_norm True
  lsun-ddpm sample adm-lsun-bedroom-256

Paste guided-diffusion's MODEL_FLAGS and DIFFUSION_FLAGS as they are; what the tensors fix is checked
against them. --use_fp16 and --use_checkpoint are accepted and change nothing: the weights are written
in fp32, as the checkpoint stores them. See docs/adm.md."""


def convert_adm_command(argv: list[str]) -> None:
    from .model.adm_conversion import DOWNLOAD_URL, convert_adm
    from .model.adm_flags import add_adm_flags, flags_command_line, given_adm_flags

    parser = argparse.ArgumentParser(
        prog="lsun-ddpm convert-adm", description=COMMANDS["convert-adm"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=CONVERT_ADM_EPILOG.format(url=DOWNLOAD_URL.format(name="lsun_bedroom.pt")))
    parser.add_argument("checkpoint", metavar="CHECKPOINT.pt", help="guided-diffusion's .pt (loaded as tensors only)")
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="the pipeline folder to write: new, empty, or a previous conversion (replaced)")
    add_adm_flags(parser)
    args = parser.parse_args(argv)
    conversion = convert_adm(args.checkpoint, args.out_dir, given_adm_flags(args))
    inferred = ", ".join(conversion.inferred) or "none"
    print(f"wrote {args.out_dir}: a stock DDPMPipeline converted from {Path(args.checkpoint).name}\n"
          f"flags: {flags_command_line(conversion.flags)}\n(read from the checkpoint: {inferred})\n"
          f"Load it with DDPMPipeline.from_pretrained({args.out_dir!r}), or `lsun-ddpm sample {args.out_dir}`")


def _int_or_error(parser: argparse.ArgumentParser, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        parser.error(f"--t must be an integer timestep or 'auto', got {value!r}")


HANDLERS = {"train": train_command, "demo": demo_command, "sample": sample_command,
            "interpolate": interpolate_command, "neighbours": neighbours_command, "evaluate": evaluate_command,
            "prepare": prepare_command,
            "push": push_command, "push-space": push_space_command, "convert-adm": convert_adm_command}


# Commands that run a network batch after batch: on a CPU their freed activations are kept for reuse
# (`performance.keep_freed_host_memory`; training sets it up itself): DDIM at batch 16 is 1.2x faster.
HOST_MEMORY_KEEPING_COMMANDS = ("sample", "interpolate", "neighbours", "evaluate")


def main(argv: list[str] | None = None) -> None:
    """Run one command. Input the user can fix is reported as `lsun-ddpm <command>: error: <sentence>`
    with exit status 2 and no traceback (`--debug` or LSUN_DDPM_DEBUG=1 shows it)."""
    argv, debug = take_debug_flag(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] not in HANDLERS:
        print_usage(argv[0] if argv else None)
    if argv[0] in HOST_MEMORY_KEEPING_COMMANDS:
        from .hardware import keep_freed_host_memory
        from .sample.sampling import pick_device

        keep_freed_host_memory(pick_device())
    run_command(f"lsun-ddpm {argv[0]}", HANDLERS[argv[0]], argv[1:], debug)


def print_usage(command: str | None) -> None:
    """The list of commands; exit 0 if it was asked for, else 2 with what was wrong."""
    print(f"usage: lsun-ddpm <command> [options] [{DEBUG_FLAG}]\n\ncommands:")
    for name, text in COMMANDS.items():
        print(f"  {name:<12} {text}")
    if command in ("-h", "--help"):
        raise SystemExit(0)
    problem = "no command given" if command is None else f"unknown command {command!r}{did_you_mean(command, HANDLERS)}"
    print(f"lsun-ddpm: error: {problem}", file=sys.stderr)
    raise SystemExit(INPUT_ERROR_STATUS)


if __name__ == "__main__":
    main()
