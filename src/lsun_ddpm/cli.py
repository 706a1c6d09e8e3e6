"""`lsun-ddpm <command>`: each command parses its flags and calls one module."""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "train": "train the DDPM (same flags as train_unconditional.py; see `lsun-ddpm train --help`)",
    "demo": "a few minutes of training on bundled photos; writes a sample grid and a pipeline folder",
}


def train_command(argv: list[str]) -> None:
    from .config import parse_training_config
    from .training import train

    train(parse_training_config(argv))


def demo_command(argv: list[str]) -> None:
    from PIL import Image

    from .config import parse_training_config
    from .demo import demo_defaults, side_by_side, training_images_grid, write_demo_images
    from .export import save_image
    from .training import GRID_FILE, train

    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--output_dir", default="demo-run")
    output_dir = pre_parser.parse_known_args(argv)[0].output_dir
    config = parse_training_config(argv, defaults=demo_defaults(output_dir))
    count = write_demo_images(config.train_data_dir)
    print(f"demo: training {config.model_preset} on {count} crops of scikit-image's photos in {config.train_data_dir}")
    output = train(config)
    samples = Image.open(output / GRID_FILE)
    training = training_images_grid(config.train_data_dir, config.resolution, config.eval_batch_size)
    save_image(side_by_side(training, samples), output / "demo_overview.png")
    print(f"\ndemo finished. Open {output / 'demo_overview.png'}: training images (left), samples from the "
          f"EMA weights (right), magnified.\nGrids at full size: {output / GRID_FILE}, one per "
          f"{config.save_images_steps} steps in {output / 'samples'}.\n"
          f"Load the model with stock diffusers: DDPMPipeline.from_pretrained({str(output)!r})")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: lsun-ddpm <command> [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<10} {text}")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    {"train": train_command, "demo": demo_command}[command](rest)


if __name__ == "__main__":
    main()
