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
    "distill": "progressive distillation: a student of the model that samples in 1-8 steps (stock DDIMPipeline)",
    "convert-adm": "convert an OpenAI guided-diffusion (ADM) checkpoint, e.g. lsun_bedroom.pt, into a stock "
                   "DDPMPipeline folder",
}


def train_main(argv: list[str] | None = None, program: str = "train_unconditional.py") -> None:
    """train_unconditional.py: parse the options and train. Input the user can fix is one line,
    `<program>: error: ...`, exit status 2 (`--debug` shows the traceback); a finished run whose upload failed
    exits with status 3."""
    argv, debug = take_debug_flag(sys.argv[1:] if argv is None else list(argv))
    run_command(program, lambda args: train_and_push(args, program), argv, debug)


def train_command(argv: list[str]) -> None:
    train_and_push(argv, program="lsun-ddpm train")


def train_and_push(argv: list[str], program: str) -> Path:
    """Train as the options say (`program` names the command in --help and errors), then, with
    --push_to_hub, upload the finished run from the main process: last, so the run is complete whatever the
    upload does."""
    from accelerate import PartialState

    from .publish.upload import push_finished_run
    from .train.loop import train
    from .train.parsing import parse_training_config

    config = parse_training_config(argv, prog=program)
    output_dir = train(config)
    if config.push_to_hub and PartialState().is_main_process:
        push_finished_run(config.output_dir, config.hub_model_id, config.hub_token, config.hub_private_repo)
    return output_dir


def demo_command(argv: list[str]) -> None:
    from .demo import demo_defaults, run_demo
    from .train.parsing import parse_training_config

    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--output_dir", "--output-dir", default="demo-run")  # as the training parser takes it
    output_dir = pre_parser.parse_known_args(argv)[0].output_dir
    run_demo(parse_training_config(argv, defaults=demo_defaults(output_dir), prog="lsun-ddpm demo"))


def distill_command(argv: list[str]) -> None:
    from .distill.options import parse_distillation_options
    from .distill.run import distill

    distill(*parse_distillation_options(argv))


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


def _require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """parser.error (exit 2) for the first of these counts that was given and is below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive whole number, got {value}")


def sample_command(argv: list[str]) -> None:
    from .files import check_image_output, check_output_folder
    from .sample.commands import run_sample
    from .sample.sampling import SCHEDULERS

    parser = argparse.ArgumentParser(prog="lsun-ddpm sample", description=COMMANDS["sample"])
    _add_inference_flags(parser)
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS),
                        help="dpmsolver++ (25 steps) by default, a distilled student's own DDIM for a student; ddpm "
                             "with 1000 steps is the paper's sampler")
    parser.add_argument("--num_inference_steps", type=int,
                        help="default: 25 (dpmsolver++, unipc), 50 (ddim), 1000 (ddpm); a student's own step count")
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

    run_sample(args)


def interpolate_command(argv: list[str]) -> None:
    from .files import check_image_output
    from .pipelines.ddpm_interpolation import METHODS
    from .sample.commands import run_interpolate
    from .sample.interpolation import Pair, check_pair_images, read_pairs
    from .sample.loading import load_scheduler_config

    parser = argparse.ArgumentParser(prog="lsun-ddpm interpolate", description=COMMANDS["interpolate"])
    _add_inference_flags(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs=2, metavar=("A", "B"), help="two image files (any size)")
    source.add_argument("--seeds", nargs=2, type=int, metavar=("S1", "S2"), help="two seeds: sample, then interpolate")
    source.add_argument("--pairs", metavar="FILE",
                        help="one pair a line: two seeds or two image paths (relative to FILE); # comments")
    parser.add_argument("--t", help="noise level (a timestep in 1..T-1; default 500) or 'auto' (chosen per pair)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--method", choices=METHODS, default="slerp",
                        help="lerp (the paper's), slerp (keeps the noise level), ddim (deterministic)")
    parser.add_argument("--num_inference_steps", type=int, help="denoising steps from t (paper: t; default 50)")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema")
    parser.add_argument("--out", default="interpolation.png", help="the strip: one row per pair")
    parser.add_argument("--gif", help="also write an animated GIF")
    args = parser.parse_args(argv)
    t = args.t if args.t in (None, "auto") else _int_or_error(parser, args.t)
    if args.frames < 2:
        parser.error("--frames must be at least 2")
    _require_positive(parser, args, ("num_inference_steps",))
    check_image_output(args.out, "--out")
    if args.gif and Path(check_image_output(args.gif, "--gif")).suffix.lower() != ".gif":
        raise InputError(f"--gif {args.gif!r} must end in .gif (an animated GIF is written there)")

    pairs = read_pairs(args.pairs) if args.pairs else [Pair(*(args.seeds or args.images))]
    check_pair_images(pairs)  # every image opened now, not after the first pair has been computed
    num_train_timesteps = load_scheduler_config(args.model).get("num_train_timesteps", 1000)
    if t not in (None, "auto") and not 1 <= t < num_train_timesteps:
        parser.error(f"--t must be 'auto' or a timestep from 1 to {num_train_timesteps - 1}, got {t}")
    run_interpolate(args, pairs, t, num_train_timesteps)


def neighbours_command(argv: list[str]) -> None:
    from .files import check_image_output, check_output_folder
    from .evaluate.neighbours_report import run_neighbours_command
    from .sample.sampling import SCHEDULERS

    parser = argparse.ArgumentParser(prog="lsun-ddpm neighbours", description=COMMANDS["neighbours"])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", metavar="DIR", help="a folder of sample images (e.g. `lsun-ddpm sample --out_dir`)")
    source.add_argument("--model", metavar="MODEL", help="generate the samples from this pipeline folder or Hub repo")
    parser.add_argument("--num_samples", type=int, default=64, help="with --model")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed; also picks the reference images")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default: as `sample` chooses")
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
    from .evaluate.evaluation_report import run_evaluate_command
    from .evaluate.metrics import MIN_IMAGES
    from .sample.sampling import SCHEDULERS

    parser = argparse.ArgumentParser(prog="lsun-ddpm evaluate", description=COMMANDS["evaluate"])
    _add_inference_flags(parser)
    parser.add_argument("--num_samples", type=int, default=50_000, help="generated images (image i from (seed, i))")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default: as `sample` chooses")
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
    run_evaluate_command(args)


def _check_minimums(args: argparse.Namespace, minimums: dict[str, int], why: dict[str, str] | None = None) -> None:
    """An InputError (one line) for the first of these whole numbers that was given and is below its minimum."""
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            reason = f" ({why[name]})" if why and name in why else ""
            raise InputError(f"--{name} must be at least {minimum}{reason}, got {value}")


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


def convert_adm_command(argv: list[str]) -> None:
    from .model.adm_conversion import DOWNLOAD_URL, convert_adm
    from .model.adm_flags import EXAMPLE, add_adm_flags, flags_command_line, given_adm_flags

    parser = argparse.ArgumentParser(
        prog="lsun-ddpm convert-adm", description=COMMANDS["convert-adm"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLE.format(url=DOWNLOAD_URL.format(name="lsun_bedroom.pt")))
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
            "prepare": prepare_command, "distill": distill_command,
            "push": push_command, "push-space": push_space_command, "convert-adm": convert_adm_command}


# Commands that run a network batch after batch: on a CPU their freed activations are kept for reuse
# (`hardware.keep_freed_host_memory`; training sets it up itself).
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
