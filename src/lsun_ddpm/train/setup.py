"""Setting a run up: the accelerator, precision, data, optimizer, the run folder's checks, resuming."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, parse_flag_from_env, set_seed

from ..data.datasets import PreprocessedStream, make_dataloader, make_training_dataset
from ..data.prepared import is_prepared_dataset, load_prepared_images
from ..data.preprocessing import ImagePreprocessor
from ..data.sources import load_image_dataset
from ..hardware import compile_in_place, keep_freed_host_memory
from ..layout import CONFIG_FILE
from ..model.unet import ADMUNet2DModel, count_parameters
from . import run_folder
from .fast_defaults import default_channels_last, default_mixed_precision, default_torch_compile
from .options import TrainingConfig
from .resuming import resolve_lr_schedule

logger = get_logger(__name__)


def make_accelerator(config: TrainingConfig) -> Accelerator:
    output_dir = Path(config.output_dir)
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.logger == "none" else config.logger,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)),
        # Shuffling from a seeded generator (reproducible on resume). The seed must be the same on
        # every process, or the processes' shards of each epoch would overlap: it is --seed (0 if unset),
        # never the per-process seed that drives noise and dropout.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed or 0),
    )


def set_up_logging(accelerator: Accelerator) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)  # one line per file is noise
    if keep_freed_host_memory(accelerator.device):  # a CPU run: freed activations reused, not re-mapped each step
        logger.info("CPU run: malloc keeps freed memory for reuse (set MALLOC_TRIM_THRESHOLD_ to choose yourself)",
                    main_process_only=True)


def choose_precision(config: TrainingConfig) -> None:
    """Fill in --mixed_precision and --channels_last where the user left them unset (performance.py says how)."""
    # The device accelerate will train on. Its state is shared with the Accelerator made next, so it must be
    # made as AcceleratorState makes it: `accelerate launch --cpu` (ACCELERATE_USE_CPU) included, or the
    # processes of a multi-process CPU run would not join one process group.
    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    if config.mixed_precision is None:
        config.mixed_precision = default_mixed_precision(device)
    if config.channels_last is None:
        config.channels_last = default_channels_last(config.mixed_precision)


def compile_if_asked_or_worthwhile(accelerator: Accelerator, config: TrainingConfig, model: torch.nn.Module,
                                   steps_to_train: int) -> None:
    """torch.compile the prepared U-Net if --torch_compile says so or, unset, if this run is long enough to repay it.

    In place: the same module with the same parameter names, so checkpoints,
    the EMA and exports do not depend on it. `model` is the module accelerate
    prepared: under DDP its wrapper, so that dynamo cuts the graph at DDP's
    gradient buckets and the all-reduce still overlaps the backward pass.
    """
    if config.torch_compile is None:
        config.torch_compile = default_torch_compile(accelerator.device,
                                                     steps_to_train * config.gradient_accumulation_steps)
    if config.torch_compile:
        compile_in_place(model, config.torch_compile_mode)


def seed_this_process(config: TrainingConfig) -> None:
    """Noise, timesteps and dropout: a different stream on each process, from --seed."""
    if config.seed is not None:
        set_seed(config.seed, device_specific=True)


def prepare_training_data(accelerator: Accelerator, config: TrainingConfig):
    """The training DataLoader of this process: its shard of each epoch, in micro-batches.

    `config.resolution` must be set (training sets it from the model). A
    `--train_data_dir` written by `lsun-ddpm prepare` is read without decoding
    (`--streaming` does not apply to it). A stream is registered for checkpointing (before the lr schedule and EMA),
    so that `--resume_from_checkpoint` continues it where the run stopped.
    """
    preprocess = ImagePreprocessor(config.resolution, config.center_crop, config.random_flip, config.min_image_size)
    if is_prepared_dataset(config.train_data_dir):  # decoded and resized once by `lsun-ddpm prepare`
        train_images = load_prepared_images(config.train_data_dir, preprocess, config.seed, config.max_train_samples)
    else:
        with accelerator.main_process_first():  # one process downloads and caches, the others read
            dataset = load_image_dataset(
                config.dataset_name, config.dataset_config_name, config.train_data_dir, config.image_column,
                config.streaming, config.cache_dir, config.max_train_samples,
            )
        train_images = make_training_dataset(dataset, preprocess, config.seed, config.shuffle_buffer_size)
    dataloader = accelerator.prepare(make_dataloader(train_images, config.train_batch_size,
                                                     config.dataloader_num_workers))
    if isinstance(train_images, PreprocessedStream):
        accelerator.register_for_checkpointing(train_images)  # its position goes into each checkpoint
        seed_stream_workers_apart_from_the_global_rng(dataloader)
    return dataloader


def seed_stream_workers_apart_from_the_global_rng(dataloader) -> None:
    """accelerate dispatches a stream's batches from the main process through a DataLoader it builds without
    the generator `make_dataloader` gave; that DataLoader would draw its workers' seed from the global RNG at
    each epoch's start, and a resumed run, which starts its epoch after the checkpoint's RNG state is loaded,
    would then draw all later noise one number off."""
    base = getattr(dataloader, "base_dataloader", None)
    if base is not None and base.generator is None:
        base.generator = torch.Generator()


# Devices where torch's AdamW has a fused kernel: one kernel for every parameter instead of a loop of
# small ones (docs/performance.md, "Adam").
FUSED_ADAM_DEVICES = ("cuda", "cpu")


def make_optimizer(model: torch.nn.Module, config: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """The paper's Adam (AdamW with weight decay 0 is exactly Adam), fused where `device` has the kernel."""
    return torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
        fused=True if device.type in FUSED_ADAM_DEVICES else None,
    )


def size_override(config: TrainingConfig) -> dict:
    """`--resolution` changes the model's sample_size; its attention stays at the same levels."""
    return {} if config.resolution is None else {"sample_size": config.resolution}


def optimizer_steps_per_epoch(dataloader, accumulation: int) -> int | None:
    """Accelerate ends accumulation at the end of the data, so a last partial group is a step too."""
    try:
        return math.ceil(len(dataloader) / accumulation)
    except TypeError:  # a stream has no length
        return None


def check_run_folder(config: TrainingConfig, unet: ADMUNet2DModel) -> tuple[Path | None, bool]:
    """(the checkpoint to resume, whether the folder's earlier attempt is to be moved aside), after refusing an
    --output_dir holding another run, a checkpoint that cannot be resumed, a disk too small.

    Nothing is changed here (every process looks at the folder, which this job
    holds); a resumed run takes its saved lr schedule unless the command gives
    one. `config.resolution` must be resolved.
    """
    move_aside = run_folder.check_output_dir(config)
    checkpoint, passed_over = run_folder.checkpoint_to_resume(config)  # refused now, not after loading the data
    for skipped in passed_over:
        logger.warning("--resume_from_checkpoint latest: passing over %s", skipped, main_process_only=True)
    if config.resume_from_checkpoint and checkpoint is None:
        logger.warning("no checkpoint in %s: starting a new run", config.output_dir, main_process_only=True)
    run_folder.check_disk_space(config.output_dir, count_parameters(unet), config.use_ema)
    if checkpoint is not None:
        schedule = resolve_lr_schedule(checkpoint, config)
        if schedule:
            logger.warning(schedule, main_process_only=True)
    return checkpoint, move_aside


def move_previous_run_aside(accelerator: Accelerator, config: TrainingConfig) -> None:
    """--overwrite_output_dir, or `latest` after an attempt that stopped before its first checkpoint: move
    the folder's earlier run aside (the main process, holding the folder's lock)."""
    accelerator.wait_for_everyone()  # every process has looked at the folder before it changes
    if accelerator.is_main_process:
        aside = run_folder.move_run_aside(Path(config.output_dir), keep=[config.train_data_dir, config.cache_dir])
        if config.overwrite_output_dir:
            logger.warning("--overwrite_output_dir: moved the previous run in %s to %s", config.output_dir, aside)
        else:
            logger.warning("--resume_from_checkpoint latest: the run in %s stopped before its first checkpoint; "
                           "moved that attempt to %s and starting from step 0", config.output_dir, aside)
    accelerator.wait_for_everyone()


def start_run(accelerator: Accelerator, config: TrainingConfig, unet: ADMUNet2DModel,
              max_train_steps: int, global_step: int, checkpoint: Path | None, objective: str) -> None:
    """Record the run's config and identity (a resumed run keeps its checkpoint's), start the trackers, and
    say what is trained how."""
    effective = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    if accelerator.is_main_process:
        output_dir = Path(config.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(str(output_dir / CONFIG_FILE))
        run_id = checkpoint and (run_folder.checkpoint_run_id(checkpoint) or run_folder.read_run_id(output_dir))
        run_folder.write_run_identity(output_dir, run_id)
        if config.logger != "none":
            accelerator.init_trackers("train_unconditional", config={
                k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))
            })
    logger.info(
        "training %s (%.1fM parameters) at %d px for %d optimizer steps (from step %d)\n"
        "  effective batch %d = micro-batch %d x accumulation %d x %d process(es); precision %s; channels_last %s; "
        "torch.compile %s; gradient checkpointing %s",
        type(unet).__name__, count_parameters(unet) / 1e6, config.resolution, max_train_steps, global_step,
        effective, config.train_batch_size, config.gradient_accumulation_steps, accelerator.num_processes,
        accelerator.mixed_precision, _on_off(config.channels_last),
        f"on (mode {config.torch_compile_mode})" if config.torch_compile else "off",
        _on_off(unet.is_gradient_checkpointing), main_process_only=True,
    )
    if checkpoint is not None:
        start = f"resumed from {checkpoint}"
    elif config.pretrained_model_name_or_path:
        start = f"fine-tuning {config.pretrained_model_name_or_path}"
    else:
        start = "from a fresh initialisation"
    logger.info("  %s; %s", start, objective, main_process_only=True)


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


