"""The training script with probes that a test cannot place from outside; run it under `accelerate launch`.

    probed_training.py [--kill_while_saving STEP] [--save_replicas] TRAINING OPTIONS...

--kill_while_saving STEP  SIGKILL this process while it saves checkpoint STEP: the model, optimizer and
                          RNG states are written, the EMA and lr schedule (saved after them) and the
                          rename are not.
--save_replicas           each process also writes its final weights (raw, then EMA) to
                          replica-<process index>.safetensors in the output folder, so that a test
                          compares the replicas itself.
"""

import argparse
import os
import signal
import sys

import accelerate.accelerator
from safetensors.torch import save_file

from lsun_ddpm import training


def kill_while_saving(step: int) -> None:
    save_custom_state = accelerate.accelerator.save_custom_state

    def save_or_die(obj, path, *args, **kwargs):
        if f"checkpoint-{step}" in os.path.basename(os.path.normpath(path)):
            os.kill(os.getpid(), signal.SIGKILL)
        return save_custom_state(obj, path, *args, **kwargs)

    accelerate.accelerator.save_custom_state = save_or_die


def save_replicas() -> None:
    finish_run = training.finish_run

    def save_then_finish(accelerator, config, unet, ema, *args, **kwargs):
        tensors = {f"raw.{name}": value.detach().contiguous() for name, value in unet.state_dict().items()}
        if ema is not None:
            tensors |= {f"ema.{i}": value.detach().contiguous() for i, value in enumerate(ema.shadow_params)}
        save_file(tensors, os.path.join(config.output_dir, f"replica-{accelerator.process_index}.safetensors"))
        return finish_run(accelerator, config, unet, ema, *args, **kwargs)

    training.finish_run = save_then_finish


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill_while_saving", type=int)
    parser.add_argument("--save_replicas", action="store_true")
    probes, training_argv = parser.parse_known_args(argv)
    if probes.kill_while_saving is not None:
        kill_while_saving(probes.kill_while_saving)
    if probes.save_replicas:
        save_replicas()
    training.main(training_argv)


if __name__ == "__main__":
    main(sys.argv[1:])
