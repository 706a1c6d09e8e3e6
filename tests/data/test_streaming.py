"""A streamed dataset resumes where training stopped, with the same crops and flips."""

import shutil

import pytest
import torch

from lsun_ddpm.data.datasets import make_dataloader, make_training_dataset
from lsun_ddpm.data.preprocessing import ImagePreprocessor
from lsun_ddpm.data.sources import load_image_dataset

from conftest import assert_bitwise_equal, exported_weights, run_training

# Random crops and flips on, and a shuffle buffer smaller than the 32 images: the order, the crops and the
# flips all depend on where in the stream an image comes.
PREPROCESS = ImagePreprocessor(16, center_crop=False, random_flip=True)
BUFFER = 8


def shuffled_stream(image_folder):
    images = load_image_dataset(train_data_dir=str(image_folder), streaming=True)
    return make_training_dataset(images, PREPROCESS, seed=3, shuffle_buffer_size=BUFFER)


def test_a_stream_restored_from_its_state_yields_the_items_after_the_trained_batches(image_folder):
    stream = shuffled_stream(image_folder)
    stream.set_epoch(1)
    expected = list(make_dataloader(stream, batch_size=4))  # the uninterrupted epoch
    assert len(expected) == 8

    interrupted = shuffled_stream(image_folder)
    interrupted.set_epoch(1)
    batches = iter(make_dataloader(interrupted, batch_size=4))
    for _ in range(3):
        interrupted.record(next(batches))  # trained on
    next(batches)  # read ahead, as accelerate's DataLoader does, but never trained on
    state = interrupted.state_dict()

    resumed = shuffled_stream(image_folder)
    resumed.load_state_dict(state)
    torch.manual_seed(12345)  # the global RNG must play no part in the crops and flips
    rest = list(make_dataloader(resumed, batch_size=4))
    assert len(rest) == 5
    for want, got in zip(expected[3:], rest):
        assert torch.equal(want["stream_position"], got["stream_position"])
        assert torch.equal(want["pixels"], got["pixels"])


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_streamed_run_killed_after_a_checkpoint_resumes_bit_exactly(tmp_path, image_folder, workers):
    """4 optimizer steps of 2 micro-batches of 4 are 32 images, one pass; checkpoint-3 falls inside the
    first pass. The run is SIGKILLed while saving checkpoint-6, then resumed with `latest` (from
    checkpoint-3): it must end with the uninterrupted run's weights and EMA, bit for bit. (A DataLoader
    worker shuffles the stream in another order than the main process, so each has its own reference run.)"""
    args = ["--train_data_dir", str(image_folder), "--streaming", "--shuffle_buffer_size", str(BUFFER),
            "--center_crop", "false", "--random_flip", "true", "--gradient_accumulation_steps", "2",
            "--max_train_steps", "8", "--checkpointing_steps", "3", "--save_images_steps", "100",
            "--save_model_steps", "100", "--logger", "none", "--dataloader_num_workers", workers]
    run_training(tmp_path, tmp_path / "whole", args)
    output_dir = tmp_path / "killed"
    killed = run_training(tmp_path, output_dir, args, probes=["--kill_while_saving", "6"], check=False)
    assert killed.returncode != 0 and [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-3"]
    resumed = run_training(tmp_path, output_dir, args + ["--resume_from_checkpoint", "latest"])
    assert "restarts" not in resumed.stderr + resumed.stdout
    assert_bitwise_equal(exported_weights(tmp_path / "whole"), exported_weights(output_dir))


@pytest.mark.slow
def test_two_processes_resume_a_stream_bit_exactly(tmp_path, image_folder):
    """accelerate reads a stream on the main process and hands each process a slice of every batch, so the
    position a checkpoint holds must be that of the last slice, which the main process never trained on."""
    args = ["--train_data_dir", str(image_folder), "--streaming", "--shuffle_buffer_size", str(BUFFER),
            "--center_crop", "false", "--random_flip", "true", "--gradient_accumulation_steps", "1",
            "--max_train_steps", "6", "--checkpointing_steps", "3", "--save_images_steps", "100",
            "--save_model_steps", "100", "--logger", "none"]
    run_training(tmp_path, tmp_path / "whole", args, num_processes=2)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", resumed / "checkpoint-3")
    run_training(tmp_path, resumed, args + ["--resume_from_checkpoint", "latest"], num_processes=2)
    assert_bitwise_equal(exported_weights(tmp_path / "whole"), exported_weights(resumed))
