"""What a resumed run takes from its checkpoint and what it takes from its own command.

A checkpoint restores the weights, Adam's state, the EMA, the lr schedule's
step and the RNG states. The lr schedule's shape is the run's saved one unless
the command gives another (`resolve_lr_schedule`); Adam's and the EMA's settings
are the command's (`use_this_runs_settings`); other batches than the
uninterrupted run's are named (`data_order_changes`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger

from ..errors import InputError
from ..layout import CONFIG_FILE, checkpoint_step
from .options import TrainingConfig, option_fields
from .parsing import typed_options
from .run_folder import checkpoint_run_config, run_differences

logger = get_logger(__name__)

# The settings that decide which images each optimizer step trains on (with the number of processes): a run
# resumed with other values goes on, but not with the batches the uninterrupted run would have had.
DATA_ORDER_FIELDS = ("train_batch_size", "gradient_accumulation_steps", "seed", "max_train_samples")
# The options that shape the learning rate over a run: a resumed run keeps its saved values unless the
# command gives them (the run's length as a whole: steps or epochs).
LR_SCHEDULE_FIELDS = ("lr_scheduler", "lr_warmup_steps", "learning_rate")
RUN_LENGTH_FIELDS = ("max_train_steps", "num_epochs")
# diffusers' schedules that decay over the run's length: a new length changes their shape.
LENGTH_DEPENDENT_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial")


def data_order_changes(checkpoint: Path, config: TrainingConfig, num_processes: int) -> list[str]:
    """How resuming `checkpoint` with `config` on `num_processes` processes changes which images later steps
    train on: the DATA_ORDER_FIELDS that differ and the process count, as phrases (empty: none)."""
    saved = checkpoint_run_config(checkpoint)
    changes = run_differences(saved, config, DATA_ORDER_FIELDS) if saved else []
    saved_processes = len(list(checkpoint.glob("random_states_*.pkl")))  # accelerate writes one per process
    if saved_processes and saved_processes != num_processes:
        changes.append(f"{saved_processes} processes (this run: {num_processes})")
    return changes


def resolve_lr_schedule(checkpoint: Path, config: TrainingConfig) -> str | None:
    """Give `config` the saved run's lr schedule and length where the command did not set them; say, in one
    line, what the resumed run does differently from this command's defaults or from the saved run (None: nothing).

    The schedule's shape is fixed when it is built (accelerate restores only its
    step), so a resumed run would otherwise silently take the defaults: a 500-step
    warm-up again, say, after a run trained with 10. Options given on the command
    line or in a --config file win and are named; a config built in code
    (`explicit_options` None) counts as given in full.
    """
    saved = checkpoint_run_config(checkpoint)
    if not saved:
        return None
    explicit = config.explicit_options
    explicit = {option.name for option in option_fields()} if explicit is None else explicit
    saved = typed_options({name: saved[name] for name in LR_SCHEDULE_FIELDS + RUN_LENGTH_FIELDS if name in saved},
                          str(checkpoint / CONFIG_FILE))
    current = config.to_dict()
    kept, changed = [], []
    for name in LR_SCHEDULE_FIELDS:
        if name in saved and saved[name] != current[name]:
            if name in explicit:
                changed.append(f"{name} {current[name]} (the run's: {saved[name]})")
            else:
                setattr(config, name, saved[name])
                kept.append(f"{name} {saved[name]} (this command's default: {current[name]})")
    if any(name in saved and saved[name] != current[name] for name in RUN_LENGTH_FIELDS):
        if not explicit & set(RUN_LENGTH_FIELDS):
            for name in RUN_LENGTH_FIELDS:
                setattr(config, name, saved.get(name, current[name]))
            kept.append(f"the run's length, {_run_length(saved)} (this command's default: {_run_length(current)})")
        elif config.lr_scheduler in LENGTH_DEPENDENT_SCHEDULES:
            changed.append(f"a length of {_run_length(current)} (the run's: {_run_length(saved)}), over which the "
                           f"{config.lr_scheduler} schedule decays")
    parts = []
    if kept:
        parts.append(f"keeps its saved {', '.join(kept)}; give an option to change it")
    if changed:
        parts.append(f"changes its lr schedule as given: {', '.join(changed)}; the learning rate follows the new "
                     "schedule from this step on")
    return f"the run resumed from {checkpoint.name} " + "; it ".join(parts) if parts else None


def _run_length(values: dict[str, Any]) -> str:
    steps = values.get("max_train_steps")
    return f"{steps} steps" if steps is not None else f"{values.get('num_epochs')} epoch(s)"


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
    changed = data_order_changes(path, config, accelerator.num_processes)
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
