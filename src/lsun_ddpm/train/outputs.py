"""What a run writes as it goes and when it ends: checkpoints, grids, the pipeline folder, the summary."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from diffusers import DDPMPipeline, DiffusionPipeline

from ..data.report import ImageReport, summarise_image_reports
from ..files import replace_path, save_image
from ..layout import (CONFIG_FILE, GRID_FILE, IDENTITY_FILE, checkpoint_name, grid_path, list_checkpoints,
                      partial_checkpoint_name)
from ..model.unet import ADMUNet2DModel, weights_fingerprint
from ..sample.figures import image_grid
from ..sample.sampling import SamplingPlan, generate, progress_bar
from . import run_folder
from .ema import ema_weights
from .export import save_pipeline_folder
from .options import TrainingConfig
from .preemption import RunStopped
from .run_history import Segment, totals, write_segments
from .step_stats import StepStats

logger = get_logger(__name__)


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


def export_pipeline(accelerator: Accelerator, unet: ADMUNet2DModel, ema, scheduler, output_dir: Path,
                    pipeline_class: type[DiffusionPipeline] = DDPMPipeline) -> None:
    """Write the stock pipeline folder: EMA weights in `unet/`, raw weights in `unet_raw/`."""
    if accelerator.is_main_process:
        save_pipeline_folder(unet, scheduler, output_dir, ema=ema, pipeline_class=pipeline_class)
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
    totals over its `segments`)."""
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


def _or_unknown(value) -> str:
    return "unknown" if value is None else f"{value:,}"
