"""The training script with probes that a test cannot place from outside: as a process of its own, under
`accelerate launch`, or (`main_in_process`, the probes that neither kill nor signal) in the test's process.

    probed_training.py [--distill] [--kill_while_saving STEP] [--kill_before_results] [--save_replicas] [--nan_loss_at_steps S,S...]
                       [--signal_at_step STEP SIGNAL [--signal_rank R]] [--unreadable_data_at_step STEP]
                       TRAINING OPTIONS...

--distill                 run `lsun-ddpm distill` (the options after the probes are its own) instead of
                          training; a probe's STEP is then counted within each stage.
--kill_while_saving STEP  SIGKILL this process while it saves checkpoint STEP: the model, optimizer and
                          RNG states are written, the EMA and lr schedule (saved after them) and the
                          rename are not.
--kill_before_results     SIGKILL this process when, its last checkpoint saved, it starts on the run's
                          results (the final samples, the pipeline, the summary).
--save_replicas           each process also writes its final weights (raw, then EMA) to
                          replica-<process index>.safetensors in the output folder, so that a test
                          compares the replicas itself.
--nan_loss_at_steps S,S   the micro-batches of these optimizer steps (counted from 1, resumed steps
                          included) get NaN noise on every process: a non-finite loss and gradient.
--signal_at_step STEP SIGNAL
                          send SIGNAL (e.g. SIGTERM) to this process at the first micro-batch of
                          optimizer step STEP, in the middle of its accumulation group.
--signal_rank R           only the process with index R sends itself the signal (default: every one).
--signal_in_folder NAME   only a run whose output folder is named NAME (a distillation's stage) sends it.
--unreadable_data_at_step STEP
                          raise the error of 100 unreadable images in a row at the first micro-batch of
                          optimizer step STEP, as bad data found in the middle of the data set would.
"""

import argparse
import math
import os
import signal
import sys

import accelerate.accelerator
from safetensors.torch import save_file

from lsun_ddpm import cli
from lsun_ddpm.train import loop


def kill_while_saving(step: int) -> None:
    save_custom_state = accelerate.accelerator.save_custom_state

    def save_or_die(obj, path, *args, **kwargs):
        if f"checkpoint-{step}" in os.path.basename(os.path.normpath(path)):
            os.kill(os.getpid(), signal.SIGKILL)
        return save_custom_state(obj, path, *args, **kwargs)

    accelerate.accelerator.save_custom_state = save_or_die


def kill_before_results() -> None:
    save_sample_grid = loop.save_sample_grid

    def save_or_die(accelerator, unet, ema, scheduler, config, step):
        if step == config.max_train_steps:
            os.kill(os.getpid(), signal.SIGKILL)
        return save_sample_grid(accelerator, unet, ema, scheduler, config, step)

    loop.save_sample_grid = save_or_die


def save_replicas() -> None:
    finish_run = loop.finish_run

    def save_then_finish(accelerator, config, unet, ema, *args, **kwargs):
        tensors = {f"raw.{name}": value.detach().contiguous() for name, value in unet.state_dict().items()}
        if ema is not None:
            tensors |= {f"ema.{i}": value.detach().contiguous() for i, value in enumerate(ema.shadow_params)}
        save_file(tensors, os.path.join(config.output_dir, f"replica-{accelerator.process_index}.safetensors"))
        return finish_run(accelerator, config, unet, ema, *args, **kwargs)

    loop.finish_run = save_then_finish


def on_each_micro_batch(probe) -> None:
    """Call `probe(accelerator, step, first_of_step, noise) -> noise` before each micro-batch of the loop."""
    resume, train_micro_batch = loop.resume, loop.train_micro_batch
    position = {"start": 0, "micro_batches": 0}

    def resume_and_remember(accelerator, config, checkpoint, ema):
        position["start"] = resume(accelerator, config, checkpoint, ema)
        position["micro_batches"] = 0  # a distillation resumes (or starts) each stage in turn
        return position["start"]

    def probed_micro_batch(accelerator, model, objective, clean_images, noise, *args, **kwargs):
        position["micro_batches"] += 1
        accumulation = accelerator.gradient_accumulation_steps
        step = position["start"] + math.ceil(position["micro_batches"] / accumulation)
        first_of_step = position["micro_batches"] % accumulation == 1 % accumulation
        noise = probe(accelerator, step, first_of_step, noise)
        return train_micro_batch(accelerator, model, objective, clean_images, noise, *args, **kwargs)

    loop.resume = resume_and_remember
    loop.train_micro_batch = probed_micro_batch


def nan_loss_at_steps(steps: set[int]):
    def poison(accelerator, step, first_of_step, noise):
        return noise * float("nan") if step in steps else noise

    return poison


def signal_at_step(step: int, signal_name: str, rank: int | None, folder_name: str | None):
    def send(accelerator, current_step, first_of_step, noise):
        in_folder = folder_name in (None, os.path.basename(accelerator.project_dir))
        if current_step == step and first_of_step and rank in (None, accelerator.process_index) and in_folder:
            os.kill(os.getpid(), signal.Signals[signal_name])
        return noise

    return send


def unreadable_data_at_step(step: int):
    from lsun_ddpm.errors import DatasetUnavailableError

    def refuse(accelerator, current_step, first_of_step, noise):
        if current_step == step and first_of_step:
            raise DatasetUnavailableError(f"100 unreadable images in a row (probe, at step {step})")
        return noise

    return refuse


# What the probes replace; `main_in_process` puts them back.
PROBED_FUNCTIONS = [(loop, "resume"), (loop, "train_micro_batch"), (loop, "finish_run"), (loop, "save_sample_grid"),
                    (accelerate.accelerator, "save_custom_state")]
# The probes that neither kill nor signal their process, so a test may run them in its own.
IN_PROCESS_PROBES = ("--nan_loss_at_steps", "--unreadable_data_at_step", "--save_replicas")


def main_in_process(argv: list[str]) -> None:
    """`main` in a process that goes on afterwards: the functions the probes replaced are restored."""
    saved = [(owner, name, getattr(owner, name)) for owner, name in PROBED_FUNCTIONS]
    try:
        main(argv)
    finally:
        for owner, name, function in saved:
            setattr(owner, name, function)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--distill", action="store_true")
    parser.add_argument("--kill_while_saving", type=int)
    parser.add_argument("--kill_before_results", action="store_true")
    parser.add_argument("--save_replicas", action="store_true")
    parser.add_argument("--nan_loss_at_steps", type=lambda text: {int(step) for step in text.split(",")})
    parser.add_argument("--signal_at_step", nargs=2, metavar=("STEP", "SIGNAL"))
    parser.add_argument("--signal_rank", type=int)
    parser.add_argument("--signal_in_folder")
    parser.add_argument("--unreadable_data_at_step", type=int)
    probes, training_argv = parser.parse_known_args(argv)
    if probes.nan_loss_at_steps:
        on_each_micro_batch(nan_loss_at_steps(probes.nan_loss_at_steps))
    if probes.signal_at_step:
        step, signal_name = probes.signal_at_step
        on_each_micro_batch(signal_at_step(int(step), signal_name, probes.signal_rank, probes.signal_in_folder))
    if probes.unreadable_data_at_step is not None:
        on_each_micro_batch(unreadable_data_at_step(probes.unreadable_data_at_step))
    if probes.kill_while_saving is not None:
        kill_while_saving(probes.kill_while_saving)
    if probes.kill_before_results:
        kill_before_results()
    if probes.save_replicas:
        save_replicas()
    if probes.distill:
        cli.main(training_argv)
    else:
        cli.train_main(training_argv)


if __name__ == "__main__":
    main(sys.argv[1:])
