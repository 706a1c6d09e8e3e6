"""Run under `accelerate launch` with 2 processes: two epochs of the training data, made by the very
functions training uses (`prepare_training_data`, `micro_batches`), must give each image to exactly one
process per epoch.

    shard_check.py FOLDER SEED [SEED...]     (a SEED of "none" runs without --seed)

Image i of the folder is a flat grey of value i, so a batch tells which images it holds.
Prints "SHARDS-OK <seed>" from the main process for each seed whose epochs are each a partition of the data set.
"""

import itertools
import sys

from accelerate import Accelerator
from accelerate.utils import gather_object

from lsun_ddpm.train.parsing import parse_training_config
from lsun_ddpm.train.setup import make_accelerator, prepare_training_data, seed_this_process
from lsun_ddpm.train.batches import micro_batches


def main(folder: str, seed: str) -> Accelerator:
    config = parse_training_config(["--train_data_dir", folder, "--train_batch_size", "2", "--resolution", "8",
                                    "--gradient_accumulation_steps", "1", "--logger", "none",
                                    "--output_dir", folder + "-out", "--max_train_steps", "1"]
                                   + (["--seed", seed] if seed != "none" else []))
    accelerator = make_accelerator(config)
    seed_this_process(config)  # as training does: a different global RNG on each process
    dataloader = prepare_training_data(accelerator, config)
    batches = micro_batches(accelerator, dataloader, 0, len(dataloader), config)
    for epoch in range(2):
        epoch_batches = itertools.islice(batches, len(dataloader))
        seen = [int(image[0, 0, 0]) for b in epoch_batches for image in b["pixels"]]
        everyone = sorted(sum(gather_object([seen]), []))
        if accelerator.is_main_process:
            assert everyone == list(range(len(dataloader.dataset))), (epoch, everyone)
    batches.close()
    if accelerator.is_main_process:
        print(f"SHARDS-OK {seed}", flush=True)
    accelerator.wait_for_everyone()  # no process may leave while another is still in a collective
    return accelerator


if __name__ == "__main__":
    for each_seed in sys.argv[2:]:  # one launch for all seeds: starting two processes costs more than the check
        accelerator = main(sys.argv[1], each_seed)
    # As training ends: a process that exits with its process group alive may abort in gloo's threads.
    accelerator.end_training()
