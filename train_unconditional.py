#!/usr/bin/env python
"""Train the paper's DDPM on LSUN bedrooms (or any images) with 🤗 accelerate.

    accelerate launch train_unconditional.py --config configs/lsun_bedroom_128.yaml
    accelerate launch train_unconditional.py --train_data_dir my_images/ --model_preset small32 --resolution 32

Every option is a field of `lsun_ddpm.train.options.TrainingConfig` (see `--help`);
the loop itself, a readable recipe, is `lsun_ddpm.train.loop.train`.
"""

from lsun_ddpm.cli import train_main

if __name__ == "__main__":
    train_main()
