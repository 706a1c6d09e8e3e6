"""The training loop: accumulate, clip, step, EMA, log, checkpoint, sample, export.

`train(config)` reads top to bottom as the paper's recipe; the bookkeeping it
needs (resuming, logging, writing folders) lives in the helpers below it.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import (DataLoaderConfiguration, ProjectConfiguration, gather_object, parse_flag_from_env,
                               set_seed)
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from . import diffusion, run_folder
from .config import TrainingConfig, check_training_inputs
from .data import (ImagePreprocessor, ImageReport, PreprocessedStream, load_image_dataset, make_dataloader,
                   make_training_dataset, summarise_image_reports, to_model_input)
from .ema import ema_weights, make_ema
from .errors import InputError, RunNotPushedError, run_command, take_debug_flag
from .export import replace_path, save_image, save_pipeline_folder
from .layout import (CONFIG_FILE, GRID_FILE, IDENTITY_FILE, checkpoint_name, checkpoint_step, grid_path, list_checkpoints,
                     partial_checkpoint_name)
from .models import ADMUNet2DModel, build_model, count_parameters, weights_fingerprint
from .performance import (compile_in_place, default_channels_last, default_mixed_precision, default_torch_compile,
                          keep_freed_host_memory)
from .preemption import NonFiniteSteps, RunStopped, StopRequest, is_finite, stop_reason
from .prepare import is_prepared_dataset, load_prepared_images
from .run_history import RunHistory, Segment, read_segments, totals, write_segments
from .run_lock import RunFolderClaim
from .sampling import SamplingPlan, generate, image_grid, progress_bar

logger = get_logger(__name__)


def train(config: TrainingConfig) -> Path:
    """Train the paper's DDPM as `config` says; return the output folder.

    One job per run folder: the job holds the folder's lock from before it
    reads the folder until it ends, and a job refused for its input leaves
    the folder as it found it (run_lock.py).
    """
    check_training_inputs(config)  # refuse what cannot work before any work is done or any file written
    choose_precision(config)  # bf16 (+ channels_last) where the device is fast at it, unless the user chose
    accelerator = make_accelerator(config)
    set_up_logging(accelerator)
    with RunFolderClaim(accelerator, config.output_dir, restored_files=(CONFIG_FILE, IDENTITY_FILE)):
        train_in_claimed_folder(accelerator, config)
    return Path(config.output_dir)


def train_in_claimed_folder(accelerator: Accelerator, config: TrainingConfig) -> None:
    """The paper's recipe, in a run folder this job holds."""
    output_dir = Path(config.output_dir)
    # Every process builds the same initial weights; noise and dropout then differ per process.
    if config.seed is not None:
        set_seed(config.seed)
    model = build_model(config.model_preset, config.model_config_name_or_path, config.learn_sigma,
                        config.pretrained_model_name_or_path, **_size_override(config))
    config.resolution = model.config.sample_size
    checkpoint, move_aside = check_run_folder(config, model)  # one run per folder; before any work
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format  # weights and batches
    if config.channels_last:
        model = model.to(memory_format=memory_format)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()  # diffusers' blocks then recompute their activations in backward
    seed_this_process(config)
    noise_scheduler = diffusion.make_noise_scheduler(
        config.ddpm_num_steps, config.ddpm_beta_schedule, config.prediction_type,
        variance_type=diffusion.LEARNED_VARIANCE if config.learn_sigma else "fixed_small",
    )
    objective = diffusion.Objective(noise_scheduler, config.vlb_weight)  # simple loss, or hybrid with a learned Σ
    dataloader = prepare_training_data(accelerator, config)

    optimizer = make_optimizer(model, config, accelerator.device)  # Adam, as in the paper
    model, optimizer = accelerator.prepare(model, optimizer)

    steps_per_epoch = _optimizer_steps_per_epoch(dataloader, config.gradient_accumulation_steps)
    max_train_steps = config.max_train_steps or config.num_epochs * steps_per_epoch
    # Not prepared: accelerate would step it once per process per optimizer step.
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=max_train_steps
    )
    accelerator.register_for_checkpointing(lr_scheduler)
    unet = accelerator.unwrap_model(model)
    ema = make_ema(unet, config.ema_max_decay, config.ema_min_decay, config.ema_use_warmup,
                   config.ema_inv_gamma, config.ema_power) if config.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    global_step = resume(accelerator, config, checkpoint, ema)
    if global_step:  # a checkpoint brings back its own lr, Adam and EMA settings: this run's replace them
        use_this_runs_settings(config, optimizer, lr_scheduler, ema)
    if global_step >= max_train_steps and run_folder.finished_step(output_dir) == global_step:
        logger.info("the run in %s has already trained %d steps: nothing to do", output_dir, global_step,
                    main_process_only=True)
        return  # its summary, config and logs stay as they were
    batches = micro_batches(accelerator, dataloader, global_step, steps_per_epoch, config)
    batches = itertools.chain([next(batches)], batches)  # data that gives no batch is refused before any file
    compile_if_asked_or_worthwhile(accelerator, config, model, max_train_steps - global_step)
    if move_aside:
        move_previous_run_aside(accelerator, config)
    start_run(accelerator, config, unet, max_train_steps, global_step, checkpoint)
    stats = StepStats(accelerator.device)
    nonfinite = NonFiniteSteps(limit=config.max_nonfinite_steps, last_good_step=global_step)
    history = RunHistory(read_segments(checkpoint), global_step, accelerator.num_processes,
                         config.train_batch_size * accelerator.num_processes)  # whole-run totals across resumes
    image_report = ImageReport()  # images skipped or upscaled, wherever they were decoded
    progress = tqdm(total=max_train_steps, initial=global_step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not accelerator.is_local_main_process)
    step_started = time.perf_counter()

    # SIGTERM/SIGINT: finish the optimizer step, save, exit. The bar closes before any error is printed.
    with StopRequest() as stop_request, progress:
        # Not entered by a run resumed from its last checkpoint that was stopped before writing its results.
        while global_step < max_train_steps:
            batch = next(batches)
            image_report.add_batch(batch)
            clean_images = to_model_input(batch["pixels"], memory_format)  # fp32 under mixed precision too
            noise = torch.randn_like(clean_images)
            timesteps = diffusion.sample_timesteps(clean_images.shape[0], config.ddpm_num_steps, clean_images.device)
            losses, grad_norm = train_micro_batch(accelerator, model, objective, clean_images, noise, timesteps,
                                                  config.max_grad_norm)
            stats.add(losses, diffusion.timestep_quarter(timesteps, config.ddpm_num_steps))
            if not accelerator.sync_gradients:
                continue  # still accumulating: no optimizer step yet

            # One all-reduce per optimizer step: every process learns the same losses and stop votes.
            step = stats.finish_step(accelerator, config.ddpm_num_steps, grad_norm, stop_request.votes())
            apply_or_skip_step(accelerator, optimizer, lr_scheduler, ema, unet, step.finite)
            global_step += 1  # a skipped step still consumes its micro-batches (see apply_or_skip_step)
            nonfinite.record(step.finite, global_step)

            now = time.perf_counter()
            images = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
            metrics = step.metrics | {"train/lr": lr_scheduler.get_last_lr()[0],
                                      "train/images_per_second": images / (now - step_started),
                                      "train/nonfinite_steps": history.earlier_nonfinite_steps + nonfinite.total}
            if ema is not None:
                metrics["train/ema_decay"] = ema.cur_decay_value
            accelerator.log(metrics, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}",
                                 img_s=f"{metrics['train/images_per_second']:.1f}", refresh=False)

            is_last = global_step >= max_train_steps
            stop = None if is_last else stop_reason(global_step, step.stop_votes, nonfinite)
            if global_step % config.checkpointing_steps == 0 or is_last or stop is not None:
                save_checkpoint(accelerator, output_dir, global_step, config.checkpoints_total_limit,
                                history.until(global_step, stats.micro_batches, nonfinite.total))
            if stop is not None:
                progress.close()
                end_run_early(accelerator, stop)
            if is_last:
                break  # the last step's samples and pipeline are the run's results, written below
            if global_step % config.save_images_steps == 0:
                save_sample_grid(accelerator, unet, ema, noise_scheduler, config, global_step)
            if global_step % config.save_model_steps == 0:
                export_pipeline(accelerator, unet, ema, noise_scheduler, output_dir)
            step_started = time.perf_counter()

    progress.close()
    # After the last checkpoint: a run stopped in here is finished by resuming it.
    save_sample_grid(accelerator, unet, ema, noise_scheduler, config, global_step)
    export_pipeline(accelerator, unet, ema, noise_scheduler, output_dir)
    segments = history.until(global_step, stats.micro_batches, nonfinite.total)
    finish_run(accelerator, config, unet, ema, optimizer, global_step, segments, stats, image_report)


def main(argv: list[str] | None = None, program: str = "train_unconditional.py") -> None:
    """Parse the options and train. Input the user can fix is one line, `<program>: error: ...`, exit
    status 2 (`--debug` shows the traceback); a finished run whose upload failed exits with status 3."""
    argv, debug = take_debug_flag(sys.argv[1:] if argv is None else list(argv))
    run_command(program, lambda args: train_from_command_line(args, program), argv, debug)


def train_from_command_line(argv: list[str], program: str) -> Path:
    """`train(parse_training_config(argv))`, with `program` as the name --help and errors show."""
    from .config import parse_training_config

    return train(parse_training_config(argv, prog=program))


# ---------------------------------------------------------------- set-up


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


# Devices where torch's AdamW has a fused kernel (one kernel for every parameter instead of a loop
# of small ones): 0.06 s against 0.16 s per step for paper128's 134 M parameters on a 2-core CPU.
FUSED_ADAM_DEVICES = ("cuda", "cpu")


def make_optimizer(model: torch.nn.Module, config: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """The paper's Adam (AdamW with weight decay 0 is exactly Adam), fused where `device` has the kernel."""
    return torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
        fused=True if device.type in FUSED_ADAM_DEVICES else None,
    )


def _size_override(config: TrainingConfig) -> dict:
    """`--resolution` changes the model's sample_size; its attention stays at the same levels."""
    return {} if config.resolution is None else {"sample_size": config.resolution}


def _optimizer_steps_per_epoch(dataloader, accumulation: int) -> int | None:
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
        schedule = run_folder.resolve_lr_schedule(checkpoint, config)
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
              max_train_steps: int, global_step: int, checkpoint: Path | None) -> None:
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
    objective = (f"learned Σ, hybrid loss L_simple + {config.vlb_weight:g}·L_vlb" if config.learn_sigma
                 else "fixed Σ, simple loss")
    logger.info("  %s; %s", start, objective, main_process_only=True)


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


# ---------------------------------------------------------------- one micro-batch


def train_micro_batch(accelerator: Accelerator, model, objective: diffusion.Objective, clean_images: torch.Tensor,
                      noise: torch.Tensor, timesteps: torch.Tensor, max_grad_norm: float):
    """The objective on one micro-batch: forward and backward; at the end of an accumulation group, clip.

    `model` is prepared by `accelerator`: it scales the loss by the accumulation
    and syncs gradients across processes only at the end of a group. Returns the
    per-image loss terms ("loss", and with a learned Σ "loss_simple" and
    "loss_vlb") and the gradient norm before clipping (None while still
    accumulating), all on the device: no host sync per micro-batch. The caller
    then steps, or skips a non-finite step (`apply_or_skip_step`).
    """
    noisy_images = objective.scheduler.add_noise(clean_images, noise, timesteps)  # x_t = √ᾱ x₀ + √(1-ᾱ) ε
    grad_norm = None
    with accelerator.accumulate(model):
        model_output = model(noisy_images, timesteps).sample
        losses = objective.losses(model_output, clean_images, noisy_images, noise, timesteps)  # ‖ε − ε_θ‖² (+ λ L_vlb)
        accelerator.backward(losses["loss"].mean())
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    return {name: values.detach() for name, values in losses.items()}, grad_norm


def apply_or_skip_step(accelerator: Accelerator, optimizer, lr_scheduler, ema, unet, finite: bool) -> None:
    """At the end of an accumulation group: step Adam, the lr schedule and the EMA, or, when the loss or the
    gradient norm was not finite, none of them (Adam's moments and step count included); then drop the gradients.

    A skipped step still consumes its micro-batches and counts as an optimizer
    step of the run (checkpoint names, `--max_train_steps`): the data position
    stays a function of the step, so resuming stays exact, and a batch that
    produced a NaN is not fed again.
    """
    if finite:
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow steps change nothing
            lr_scheduler.step()
        if ema is not None:
            ema.step(unet.parameters())
    elif accelerator.scaler is not None:
        accelerator.scaler.update()  # fp16: lower the loss scale, as the GradScaler does for an overflow
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- the data stream


def micro_batches(accelerator: Accelerator, dataloader, global_step: int, steps_per_epoch: int | None,
                  config: TrainingConfig) -> Iterator[dict]:
    """Micro-batches forever, epoch after epoch, starting where `global_step` left off.

    On resume the batches already trained on are skipped by the sampler
    (`skip_first_batches`), without decoding them. A stream instead resumes
    from the position its checkpointed state holds (`streamed_micro_batches`).
    """
    stream = preprocessed_stream(dataloader)
    if stream is not None:
        yield from streamed_micro_batches(dataloader, stream)
        return
    epoch, skip = 0, 0
    if global_step:
        epoch, steps_into_epoch = divmod(global_step, steps_per_epoch)
        skip = steps_into_epoch * config.gradient_accumulation_steps
    while True:
        dataloader.set_epoch(epoch)  # the sampler's shuffle
        if hasattr(dataloader.dataset, "set_epoch"):  # the random crops and flips (accelerate may not tell it)
            dataloader.dataset.set_epoch(epoch)
        yield from accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        epoch, skip = epoch + 1, 0


def preprocessed_stream(dataloader) -> PreprocessedStream | None:
    """The stream a prepared DataLoader reads, also when accelerate wrapped it to shard it; None for map-style data."""
    dataset = dataloader.dataset
    dataset = getattr(dataset, "dataset", dataset)  # accelerate's IterableDatasetShard
    return dataset if isinstance(dataset, PreprocessedStream) else None


def streamed_micro_batches(dataloader, stream: PreprocessedStream) -> Iterator[dict]:
    """A stream's micro-batches from its current epoch and position on (a resumed run: the checkpoint's).

    Each batch is recorded as trained on when the loop takes it, so a
    checkpoint holds the position after the batches actually trained on, not
    after the one accelerate has read ahead.
    """
    epoch = stream.epoch
    while True:
        dataloader.set_epoch(epoch)
        stream.set_epoch(epoch)  # the shuffle, the crops and flips (accelerate may not tell it)
        for batch in dataloader:
            stream.record(batch)
            yield batch
        epoch += 1


# ---------------------------------------------------------------- statistics


@dataclass
class StepOutcome:
    """What every process knows after the all-reduce that ends an optimizer step."""

    metrics: dict[str, float]
    finite: bool  # the loss (all processes) and the gradient norm are finite
    stop_votes: list[float]  # per stop signal, how many processes received it


# The objective's terms logged beside the loss when it has them (the hybrid loss of a learned Σ).
LOSS_TERMS = ("loss_simple", "loss_vlb")


@dataclass
class StepStats:
    """Losses of the micro-batches of one optimizer step: overall, per quarter of t, and per term."""

    device: torch.device
    last_loss: float = float("nan")
    micro_batches: int = 0  # this process, this run
    terms: tuple[str, ...] = ()  # which of LOSS_TERMS the objective reports
    sums: torch.Tensor = field(init=False)
    counts: torch.Tensor = field(init=False)
    term_sums: torch.Tensor = field(init=False)

    def __post_init__(self):
        self._reset()

    def _reset(self):
        self.sums = torch.zeros(4, device=self.device, dtype=torch.float64)
        self.counts = torch.zeros(4, device=self.device, dtype=torch.float64)
        self.term_sums = torch.zeros(len(LOSS_TERMS), device=self.device, dtype=torch.float64)

    def add(self, losses: dict[str, torch.Tensor], quarters: torch.Tensor) -> None:
        """One micro-batch's per-image terms ("loss" and any of LOSS_TERMS) and the quarter of t of each image."""
        self.micro_batches += 1
        loss = losses["loss"].double()
        self.sums.index_add_(0, quarters, loss)
        self.counts.index_add_(0, quarters, torch.ones_like(loss))
        self.terms = tuple(name for name in LOSS_TERMS if name in losses)
        for index, name in enumerate(LOSS_TERMS):
            if name in losses:
                self.term_sums[index] += losses[name].double().sum()

    def finish_step(self, accelerator: Accelerator, num_train_timesteps: int, grad_norm: torch.Tensor,
                    stop_votes: list[float]) -> StepOutcome:
        """Means over all processes' samples of this step, whether the step is finite, and the summed stop
        votes: one all-reduce and one copy to the host per optimizer step. Then start the next step.

        A NaN on any process makes the summed losses NaN on all of them, and the
        gradient norm is the same everywhere (DDP averaged the gradients), so
        every process takes the same decision.
        """
        votes = torch.tensor(stop_votes, device=self.device, dtype=torch.float64)
        totals = accelerator.reduce(torch.cat([self.sums, self.counts, self.term_sums, votes]), reduction="sum")
        norm = torch.as_tensor(grad_norm, device=self.device).double().reshape(1)
        values = torch.cat([totals, norm]).tolist()
        sums, counts, term_sums = values[:4], values[4:8], values[8:8 + len(LOSS_TERMS)]
        vote_totals, grad_norm_value = values[8 + len(LOSS_TERMS):-1], values[-1]
        self.last_loss = sum(sums) / sum(counts)
        metrics = {"train/loss": self.last_loss, "train/grad_norm": grad_norm_value}
        for name, total in zip(LOSS_TERMS, term_sums):
            if name in self.terms:
                metrics[f"train/{name}"] = total / sum(counts)
        for quarter in range(4):
            if counts[quarter] > 0:
                low, high = diffusion.quarter_bounds(quarter, num_train_timesteps)
                metrics[f"train/loss_t{low}-{high}"] = sums[quarter] / counts[quarter]
        self._reset()
        return StepOutcome(metrics, is_finite(self.last_loss, grad_norm_value), vote_totals)


# ---------------------------------------------------------------- checkpoints and outputs


def resume(accelerator: Accelerator, config: TrainingConfig, path: Path | None, ema) -> int:
    """Load the checkpoint `path` (None: a new run); return its optimizer step."""
    if path is None:
        return 0
    try:
        accelerator.load_state(str(path))
    except RuntimeError as error:
        if "size mismatch" not in str(error):
            raise
        # A checkpoint without a config copy (an older run) of another model: one sentence, not 130 lines.
        raise InputError(f"--resume_from_checkpoint {path}: its weights have other shapes than this model's "
                         f"({config.model_preset}); resume it with the model it was trained with") from None
    if ema is not None:
        ema.to(accelerator.device)
    step = checkpoint_step(path)
    # accelerate restores its micro-batch counter, which counts in the checkpoint's accumulation: under
    # another --gradient_accumulation_steps the first group would end early. A checkpoint is taken at the
    # end of a group, so this run's groups start from a whole number of them.
    accelerator.step = step * config.gradient_accumulation_steps
    changed = run_folder.data_order_changes(path, config, accelerator.num_processes)
    if changed:
        logger.warning("%s was trained with %s: training goes on, but from here on its batches are not the ones "
                       "the run would have trained on without the change", path.name, ", ".join(changed),
                       main_process_only=True)
    return step


def use_this_runs_settings(config: TrainingConfig, optimizer, lr_scheduler, ema) -> None:
    """Give the resumed optimizer, lr schedule and EMA this run's settings.

    `accelerator.load_state` restores them with their state: Adam's lr, betas,
    ε and weight decay, the schedule's base lr, the EMA's decay settings. A
    resumed run takes the values of its config instead (lowering
    --learning_rate after a run diverged, say), from its next optimizer step
    on; the schedule's shape (warm-up, length) is this run's already.
    """
    for group in optimizer.param_groups:
        group.update(initial_lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                     eps=config.adam_epsilon, weight_decay=config.adam_weight_decay)
    lr_scheduler.base_lrs = [config.learning_rate] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, lr_scheduler.lr_lambdas):  # the lr of the next step
        group["lr"] = config.learning_rate * factor(lr_scheduler.last_epoch)
    if ema is not None:
        ema.decay, ema.min_decay = config.ema_max_decay, config.ema_min_decay
        ema.use_ema_warmup, ema.inv_gamma, ema.power = config.ema_use_warmup, config.ema_inv_gamma, config.ema_power


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int | None,
                    segments: list[Segment]) -> None:
    """`accelerator.save_state` (model, optimizer, lr schedule, EMA, RNG states) to `checkpoint-<step>`, with
    copies of the run's config and identity and the run's `segments` so far, written under a temporary name
    and renamed when complete."""
    final = output_dir / checkpoint_name(step)
    staging = output_dir / partial_checkpoint_name(step)
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))  # every process writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name in (CONFIG_FILE, IDENTITY_FILE):  # the run it belongs to, for a later resume by path
            if (output_dir / name).is_file():
                shutil.copy2(output_dir / name, staging / name)
        write_segments(segments, staging)
        replace_path(staging, final)
        logger.info("saved %s", final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def save_sample_grid(accelerator: Accelerator, unet, ema, scheduler, config: TrainingConfig, step: int) -> None:
    """Sample `eval_batch_size` images from the EMA weights with --eval_scheduler; write and log the grid."""
    if accelerator.is_main_process:
        # No bf16/channels_last switch here: training owns the model's format.
        plan = SamplingPlan(config.eval_scheduler, config.ddpm_num_inference_steps, config.eval_batch_size, bf16=False)
        logger.info("step %d: sampling a grid of %d images from the %s weights (%s, %d steps)", step,
                    config.eval_batch_size, "EMA" if ema is not None else "raw", plan.scheduler, plan.steps)
        with ema_weights(ema, unet):
            images = generate(unet, dict(scheduler.config), config.eval_batch_size, config.seed or 0, plan,
                              progress=progress_bar(f"grid at step {step}", leave=False))
        grid = image_grid(images)
        save_image(grid, grid_path(config.output_dir, step))
        save_image(grid, Path(config.output_dir) / GRID_FILE)
        log_grid(accelerator, config.logger, grid, step)
    accelerator.wait_for_everyone()


def log_grid(accelerator: Accelerator, logger_name: str, grid, step: int) -> None:
    """The sample grid into the run's tracker, as diffusers' script logs its samples (main process)."""
    if logger_name == "tensorboard":
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("samples/ema", np.asarray(grid), step, dataformats="HWC")
    elif logger_name == "wandb":
        import wandb

        accelerator.get_tracker("wandb").log({"samples/ema": wandb.Image(grid)}, step=step)


def export_pipeline(accelerator: Accelerator, unet: ADMUNet2DModel, ema, scheduler, output_dir: Path) -> None:
    """Write the stock `DDPMPipeline` folder: EMA weights in `unet/`, raw weights in `unet_raw/`."""
    if accelerator.is_main_process:
        save_pipeline_folder(unet, scheduler, output_dir, ema=ema)
    accelerator.wait_for_everyone()


def describe_hardware(accelerator: Accelerator) -> str:
    """E.g. "8 x NVIDIA H100 80GB HBM3" or "1 x CPU (2 threads)", for the model card."""
    if accelerator.device.type == "cuda":
        name = torch.cuda.get_device_name(accelerator.device)
    else:
        name = f"{accelerator.device.type.upper()} ({torch.get_num_threads()} threads)"
    return f"{accelerator.num_processes} x {name}"


def end_run_early(accelerator: Accelerator, stop: RunStopped) -> None:
    """Every process saved the stop step's checkpoint: say why and how to resume, flush the logs, exit."""
    logger.warning(stop.message, main_process_only=False)  # every process says where it stopped
    accelerator.end_training()
    raise stop


def finish_run(accelerator: Accelerator, config: TrainingConfig, unet, ema, optimizer, global_step: int,
               segments: list[Segment], stats: StepStats, image_report: ImageReport) -> None:
    """Check that all processes hold the same weights, report skipped images, write the run summary (whole-run
    totals over its `segments`), push if asked."""
    fingerprint = weights_fingerprint(list(unet.parameters()) + (ema.shadow_params if ema else []))
    fingerprints = gather_object([fingerprint])
    image_counts, image_lines = summarise_image_reports(gather_object([image_report.collect()]))
    for line in image_lines:
        logger.warning(line, main_process_only=True)
    in_sync = len(set(fingerprints)) == 1
    if not in_sync:
        logger.error("the processes ended with different weights: %s", fingerprints, main_process_only=True)
    run_totals = totals(segments)
    logger.info("the run trained %d optimizer steps in %d segment(s): %s images, %s micro-batches per process, "
                "%s non-finite steps skipped, %s s of training", global_step, len(segments),
                *(_or_unknown(run_totals[name]) for name in ("images", "micro_batches_per_process",
                                                             "nonfinite_steps", "wall_time_seconds")),
                main_process_only=True)
    if accelerator.is_main_process:
        adam_state = next(iter(optimizer.optimizer.state.values()), {})
        summary = {
            "optimizer_steps": global_step,
            "adam_step": int(adam_state.get("step", 0)),
            "ema_optimization_step": ema.optimization_step if ema else None,
            "ema_decay": ema.cur_decay_value if ema else None,
            "images": run_totals["images"],
            "micro_batches_per_process": run_totals["micro_batches_per_process"],
            "num_processes": accelerator.num_processes,
            "effective_batch_size": config.train_batch_size * config.gradient_accumulation_steps
            * accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "channels_last": config.channels_last,
            "torch_compile": config.torch_compile,
            "device": str(accelerator.device),
            "hardware": describe_hardware(accelerator),
            "final_loss": stats.last_loss,
            "nonfinite_steps": run_totals["nonfinite_steps"],
            "wall_time_seconds": run_totals["wall_time_seconds"],
            "weights_sha256_per_process": fingerprints,
            "replicas_in_sync": in_sync,
            **image_counts,
            "segments": [asdict(segment) for segment in segments],  # the run's start and each resume
        }
        run_folder.write_summary(config.output_dir, summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if config.push_to_hub and accelerator.is_main_process:  # last: the run is complete whatever the upload does
        push_finished_run(config)


def _or_unknown(value) -> str:
    return "unknown" if value is None else f"{value:,}"


def push_finished_run(config: TrainingConfig) -> None:
    """Upload the run folder; if that fails, say that the run itself is complete and how to push it later."""
    from .hub import HubUploadError, push_run

    try:
        push_run(config.output_dir, config.hub_model_id, config.hub_token, config.hub_private_repo)
    except HubUploadError as error:
        raise RunNotPushedError(
            f"training finished and the run is saved in {config.output_dir}, but it is not on the Hub: push it "
            f"later with `lsun-ddpm push {config.output_dir} --hub_model_id {config.hub_model_id}` ({error})"
        ) from None
