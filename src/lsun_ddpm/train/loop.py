"""The training loop: accumulate, clip, step, EMA, log, checkpoint, sample, export.

`train(config)` reads top to bottom as the paper's recipe; the bookkeeping it
needs (resuming, logging, writing folders) lives in the helpers below it.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..data.preprocessing import to_model_input
from ..data.report import ImageReport
from ..layout import CONFIG_FILE, IDENTITY_FILE
from ..model import diffusion
from . import run_folder
from .batches import micro_batches
from .ema import make_ema
from .options import TrainingConfig
from .outputs import end_run_early, export_pipeline, finish_run, save_checkpoint, save_sample_grid
from .parsing import check_training_inputs
from .preemption import NonFiniteSteps, StopRequest, stop_reason
from .recipe import Recipe, paper_recipe
from .run_history import RunHistory, read_segments
from .resuming import resume, use_this_runs_settings
from .run_lock import RunFolderClaim
from .setup import (check_run_folder, choose_precision, compile_if_asked_or_worthwhile, make_accelerator,
                    make_optimizer, move_previous_run_aside, optimizer_steps_per_epoch, prepare_training_data,
                    seed_this_process, set_up_logging, start_run)
from .step_stats import StepStats

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
        train_in_claimed_folder(accelerator, config, paper_recipe(config))
        accelerator.end_training()  # flush the trackers, end the process group
    return Path(config.output_dir)


def train_in_claimed_folder(accelerator: Accelerator, config: TrainingConfig, recipe: Recipe) -> None:
    """One run of `recipe` (the paper's, or a distillation stage's), in a run folder this job holds."""
    output_dir = Path(config.output_dir)
    # Every process builds the same initial weights; noise and dropout then differ per process.
    if config.seed is not None:
        set_seed(config.seed)
    # from_pretrained (fine-tuning, a distillation's student) returns a model in eval mode, its dropout off
    model = recipe.make_model().train()
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
    objective = recipe.make_objective(noise_scheduler)  # the paper's: simple loss, or hybrid with a learned Σ
    sampling_scheduler = recipe.sampling_scheduler(noise_scheduler)  # what the grids and the export sample with
    dataloader = prepare_training_data(accelerator, config)

    optimizer = make_optimizer(model, config, accelerator.device)  # Adam, as in the paper
    model, optimizer = accelerator.prepare(model, optimizer)

    steps_per_epoch = optimizer_steps_per_epoch(dataloader, config.gradient_accumulation_steps)
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
    start_run(accelerator, config, unet, max_train_steps, global_step, checkpoint, recipe.description)
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
            timesteps = objective.sample_timesteps(clean_images.shape[0], clean_images.device)
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
                save_sample_grid(accelerator, unet, ema, sampling_scheduler, config, global_step)
            if global_step % config.save_model_steps == 0:
                export_pipeline(accelerator, unet, ema, sampling_scheduler, output_dir, recipe.pipeline_class)
            step_started = time.perf_counter()

    progress.close()
    # After the last checkpoint: a run stopped in here is finished by resuming it.
    save_sample_grid(accelerator, unet, ema, sampling_scheduler, config, global_step)
    export_pipeline(accelerator, unet, ema, sampling_scheduler, output_dir, recipe.pipeline_class)
    segments = history.until(global_step, stats.micro_batches, nonfinite.total)
    finish_run(accelerator, config, unet, ema, optimizer, global_step, segments, stats, image_report)


def train_micro_batch(accelerator: Accelerator, model, objective, clean_images: torch.Tensor,
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
