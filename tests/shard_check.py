"""Run under `accelerate launch` with 2 processes: one epoch of the training DataLoader,
prepared exactly as training prepares it, must give each image to exactly one process.

Image i of the folder is a flat grey of value i, so a batch tells which images it holds.
Prints "SHARDS-OK" from the main process when the epoch is a partition of the data set.
"""

import sys

from accelerate.utils import gather_object, set_seed

from lsun_ddpm.config import parse_training_config
from lsun_ddpm.data import ImagePreprocessor, load_image_dataset, make_dataloader, make_training_dataset
from lsun_ddpm.training import make_accelerator


def main(folder: str, seed: str) -> None:
    config = parse_training_config(["--train_data_dir", folder, "--train_batch_size", "2", "--logger", "none",
                                    "--output_dir", folder + "-out", "--max_train_steps", "1"]
                                   + (["--seed", seed] if seed != "none" else []))
    accelerator = make_accelerator(config)
    if config.seed is not None:
        set_seed(config.seed, device_specific=True)  # as training does: a different RNG on each process
    with accelerator.main_process_first():  # as training does: one process writes the datasets cache
        images = load_image_dataset(train_data_dir=folder)
    dataset = make_training_dataset(images, ImagePreprocessor(8))
    dataloader = accelerator.prepare(make_dataloader(dataset, config.train_batch_size))
    for epoch in range(2):
        dataloader.set_epoch(epoch)
        seen = [round(float((image[0, 0, 0] + 1) * 127.5)) for batch in dataloader for image in batch["pixel_values"]]
        everyone = sorted(sum(gather_object([seen]), []))
        if accelerator.is_main_process:
            assert everyone == list(range(len(dataset))), (epoch, everyone)
    if accelerator.is_main_process:
        print("SHARDS-OK", flush=True)
    accelerator.wait_for_everyone()  # no process may leave while another is still in a collective
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
