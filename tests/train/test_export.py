"""Folders a user keeps are replaced whole or not at all."""

import pytest
import torch

from lsun_ddpm.model.diffusion import make_noise_scheduler
from lsun_ddpm.train.ema import make_ema
from lsun_ddpm.files import replace_path
from lsun_ddpm.train.export import save_pipeline_folder
from lsun_ddpm.layout import checkpoint_step, list_checkpoints
from lsun_ddpm.model.unet import ADMUNet2DModel


def test_replace_path_swaps_a_whole_folder(tmp_path):
    old, new = tmp_path / "unet", tmp_path / "staging"
    old.mkdir(), new.mkdir()
    (old / "stale.bin").write_text("old")
    (new / "fresh.bin").write_text("new")
    replace_path(new, old)
    assert [p.name for p in old.iterdir()] == ["fresh.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]  # nothing left aside


def test_pipeline_export_replaces_components_and_keeps_other_files(tmp_path):
    model = ADMUNet2DModel.from_preset("tiny16")
    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    save_pipeline_folder(model, make_noise_scheduler(), run, ema=make_ema(model))
    first = (run / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    with torch.no_grad():
        model.conv_out.bias.fill_(1.0)
    save_pipeline_folder(model, make_noise_scheduler(), run)
    assert (run / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != first
    assert (run / "notes.txt").read_text() == "mine" and (run / "checkpoint-5").is_dir()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_failed_export_leaves_the_previous_folder_intact(tmp_path, monkeypatch):
    model = ADMUNet2DModel.from_preset("tiny16")
    run = tmp_path / "run"
    save_pipeline_folder(model, make_noise_scheduler(), run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("diffusers.DDPMScheduler.save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pipeline_folder(model, make_noise_scheduler(), run)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_checkpoints_sort_by_step_not_by_name(tmp_path):
    for step in (9, 100, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / ".checkpoint-200.partial").mkdir()  # an interrupted save is not a checkpoint
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [9, 20, 100]


def test_export_writes_ema_to_unet_and_training_weights_to_unet_raw(tmp_path):
    from safetensors.torch import load_file

    model = ADMUNet2DModel.from_preset("tiny16")
    ema = make_ema(model)
    with torch.no_grad():
        model.conv_out.bias.fill_(1.0)  # training weights move away from the EMA
    training = {k: v.clone() for k, v in model.state_dict().items()}
    save_pipeline_folder(model, make_noise_scheduler(), tmp_path, ema=ema)
    raw = load_file(tmp_path / "unet_raw" / "diffusion_pytorch_model.safetensors")
    exported_ema = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert torch.all(raw["conv_out.bias"] == 1) and torch.all(exported_ema["conv_out.bias"] == 0)
    assert all(torch.equal(v, training[k]) for k, v in model.state_dict().items())  # restored bit-identically
