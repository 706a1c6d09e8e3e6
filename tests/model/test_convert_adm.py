"""`lsun-ddpm convert-adm`: a guided-diffusion checkpoint becomes a stock DDPMPipeline that computes what ADM computes.

The checkpoints are tiny random state dicts with guided-diffusion's names and
shapes (tests/adm_reference.py), and ADM's forward pass is that module's own.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from adm_reference import Spec, adm_forward, random_adm_state_dict
from conftest import run_cli
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from huggingface_hub import ModelCard

from lsun_ddpm import cli
from lsun_ddpm.model.adm_flags import add_adm_flags, given_adm_flags
from lsun_ddpm.model.adm_conversion import convert_adm
from lsun_ddpm.model.adm_weights import convert_adm_state_dict, load_adm_state_dict
from lsun_ddpm.errors import InputError

# guided-diffusion's README, "LSUN models", as it is printed there.
LSUN_MODEL_FLAGS = ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 "
                    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
                    "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
                    "--use_scale_shift_norm True")
TIMESTEPS = (0, 1, 500, 999)


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: on a shared CPU, more threads only add contention (3x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flags_of(spec: Spec) -> dict:
    """The flags the tensors cannot tell: the head width and the qkv layout."""
    return {"num_head_channels": spec.head_channels, "use_new_attention_order": spec.new_attention_order}


def max_difference(state_dict: dict, spec: Spec, unet: UNet2DModel, size: int = 16) -> float:
    """The largest |ADM − converted| over a batch of images at each of TIMESTEPS."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    with torch.no_grad():
        for t in TIMESTEPS:
            timesteps = torch.tensor([t, t])
            expected = adm_forward(state_dict, spec, x, timesteps)
            worst = max(worst, (unet(x, timesteps).sample - expected).abs().max().item())
    return worst


def save_checkpoint(tmp_path: Path, spec: Spec, name: str = "tiny.pt") -> Path:
    path = tmp_path / name
    torch.save(random_adm_state_dict(spec), path)
    return path


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy-qkv", "new-qkv"])
@pytest.mark.parametrize("resblock_updown", [True, False], ids=["resblock-updown", "conv-resample"])
def test_converted_unet_computes_what_adm_computes(new_order, resblock_updown):
    spec = Spec(new_attention_order=new_order, resblock_updown=resblock_updown)  # learned Σ: 6 channels
    state_dict = random_adm_state_dict(spec)
    conversion = convert_adm_state_dict(state_dict, flags_of(spec))
    assert conversion.pipeline.unet.config.out_channels == 6
    assert max_difference(state_dict, spec, conversion.pipeline.unet) <= 1e-4


def test_two_attention_levels_two_blocks_plain_time_conditioning():
    spec = Spec(num_res_blocks=2, attention_levels=(0, 1), use_scale_shift_norm=False, learn_sigma=False)
    state_dict = random_adm_state_dict(spec)
    conversion = convert_adm_state_dict(state_dict, flags_of(spec))
    assert conversion.pipeline.unet.config.resnet_time_scale_shift == "default"
    assert max_difference(state_dict, spec, conversion.pipeline.unet) <= 1e-4


def test_the_qkv_layout_flag_matters():
    """Read in the other layout, a legacy checkpoint computes something else: the test above can tell them apart."""
    spec = Spec()  # 2 heads at the 64-channel level
    state_dict = random_adm_state_dict(spec)
    wrong = convert_adm_state_dict(state_dict, {**flags_of(spec), "use_new_attention_order": True})
    assert max_difference(state_dict, spec, wrong.pipeline.unet) > 1e-2


def test_everything_the_tensors_fix_is_read_from_them_with_no_flags():
    spec = Spec(num_res_blocks=2, head_channels=16, resblock_updown=False)  # 64 channels / 4 heads (the default)
    state_dict = random_adm_state_dict(spec)
    conversion = convert_adm_state_dict(state_dict)
    flags = conversion.flags
    assert (flags["num_channels"], flags["num_res_blocks"], flags["channel_mult"]) == (32, 2, "1,2")
    assert (flags["learn_sigma"], flags["resblock_updown"], flags["use_scale_shift_norm"]) == (True, False, True)
    assert flags["attention_resolutions"] == "32" and flags["image_size"] == 64 and flags["class_cond"] is False
    assert set(conversion.inferred) >= {"num_channels", "channel_mult", "learn_sigma", "attention_resolutions"}
    assert conversion.pipeline.unet.config.attention_head_dim == 16
    assert max_difference(state_dict, spec, conversion.pipeline.unet) <= 1e-4


@pytest.mark.parametrize("flag, value, words", [
    ("num_channels", 128, ["--num_channels 128 does not match the checkpoint",
                           "input_blocks.0.0.weight has 32 output channels"]),
    ("learn_sigma", False, ["--learn_sigma False", "out.2.weight has 6 output channels"]),
    ("num_res_blocks", 2, ["--num_res_blocks 2", "1 residual blocks per level"]),
    ("channel_mult", "1,2,2", ["--channel_mult 1,2,2", "give --channel_mult 1,2"]),
    ("attention_resolutions", "16,8", ["--attention_resolutions 16,8", "attention at 32 px"]),
    ("resblock_updown", False, ["--resblock_updown False", "residual blocks"]),
    ("use_scale_shift_norm", False, ["--use_scale_shift_norm False", "emb_layers"]),
    ("class_cond", True, ["--class_cond True", "no label_emb.weight"]),
    ("image_size", 256, ["--image_size 256", "default channel_mult at 256 px is 1,1,2,2,4,4", "--channel_mult 1,2"]),
    ("num_head_channels", 48, ["--num_head_channels 48", "does not divide"]),
])
def test_a_flag_that_does_not_fit_the_tensors_is_refused_by_name(flag, value, words):
    with pytest.raises(InputError) as error:
        convert_adm_state_dict(random_adm_state_dict(Spec()), {flag: value})
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("spec, given, words", [
    (Spec(class_cond=True), {}, ["class-conditional", "label_emb.weight", "DDPMPipeline has no class labels"]),
    (Spec(channel_mult=(1, 2), attention_levels=(0, 1)), {"num_heads": 1},
     ["--num_heads 1", "different widths", "32 at 32 channels", "64 at 64 channels", "cannot be converted"]),
    (Spec(), {"rescale_timesteps": True, "diffusion_steps": 4000}, ["--rescale_timesteps True", "4000"]),
])
def test_what_a_stock_pipeline_cannot_express_is_refused(spec, given, words):
    with pytest.raises(InputError) as error:
        convert_adm_state_dict(random_adm_state_dict(spec), given)
    for word in words:
        assert word in str(error.value)


def test_the_readme_flags_parse_as_pasted_and_convert_a_matching_checkpoint(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    add_adm_flags(parser)
    diffusion_flags = ("--timestep_respacing 250 --use_kl False --predict_xstart False --rescale_timesteps False "
                       "--rescale_learned_sigmas False --channel_mult 1,1,2,2,4,4 --num_heads 4 "
                       "--num_heads_upsample -1 --use_new_attention_order False --use_checkpoint False")
    given = given_adm_flags(parser.parse_args(["a.pt", "out", *shlex.split(LSUN_MODEL_FLAGS + " " + diffusion_flags)]))
    assert given["attention_resolutions"] == "32,16,8" and given["class_cond"] is False
    assert given["dropout"] == 0.1 and given["image_size"] == 256 and given["num_head_channels"] == 64
    assert given["use_fp16"] is True and given["resblock_updown"] is True and given["noise_schedule"] == "linear"
    assert len(given) == 23  # every model and diffusion flag of guided-diffusion

    # The same flags on a tiny checkpoint of that architecture: 64 channels, 2 levels at 32 px.
    spec = Spec(num_channels=64, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(0, 1), head_channels=64)
    tiny_flags = LSUN_MODEL_FLAGS.replace("--image_size 256", "--image_size 32").replace("--num_channels 256",
                                                                                            "--num_channels 64")
    given = given_adm_flags(parser.parse_args(["a.pt", "out", *shlex.split(tiny_flags)]))
    state_dict = random_adm_state_dict(spec)
    conversion = convert_adm_state_dict(state_dict, given)
    assert conversion.pipeline.unet.config.dropout == 0.1 and conversion.pipeline.unet.config.sample_size == 32
    assert max_difference(state_dict, spec, conversion.pipeline.unet, size=32) <= 1e-4


def test_lsun_bedrooms_full_architecture_converts_shape_for_shape():
    """lsun_bedroom.pt's architecture at full size, tensors without memory (meta): with only the two flags the
    tensors cannot tell (the head width and dropout), every other README flag is read from them."""
    spec = Spec(num_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_levels=(3, 4, 5),
                head_channels=64)
    state_dict = random_adm_state_dict(spec, meta=True)
    conversion = convert_adm_state_dict(state_dict, {"num_head_channels": 64, "dropout": 0.1})
    parser = argparse.ArgumentParser()
    add_adm_flags(parser)
    readme = given_adm_flags(parser.parse_args(shlex.split(LSUN_MODEL_FLAGS)))
    assert {name: conversion.flags[name] for name in readme if name != "use_fp16"} == \
        {name: value for name, value in readme.items() if name != "use_fp16"}
    parameters = sum(p.numel() for p in conversion.pipeline.unet.parameters())
    assert parameters == sum(t.numel() for t in state_dict.values()) == 552_814_086
    with pytest.raises(InputError, match="--num_heads 4 gives attention heads of different widths"):
        convert_adm_state_dict(state_dict)  # guided-diffusion's default: 4 heads at every level


def test_the_scheduler_is_guided_diffusions():
    state_dict = random_adm_state_dict(Spec())
    scheduler = convert_adm_state_dict(state_dict, {"num_head_channels": 32}).pipeline.scheduler
    assert (scheduler.config.beta_start, scheduler.config.beta_end, scheduler.config.beta_schedule) == (1e-4, 0.02,
                                                                                                       "linear")
    assert scheduler.config.variance_type == "learned_range" and scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.timestep_spacing == "trailing" and scheduler.config.clip_sample is True
    scaled = convert_adm_state_dict(state_dict, {"num_head_channels": 32, "diffusion_steps": 4000,
                                                 "predict_xstart": True}).pipeline.scheduler
    assert scaled.config.num_train_timesteps == 4000 and scaled.config.prediction_type == "sample"
    assert scaled.betas[0].item() == pytest.approx(1e-4 / 4) and scaled.betas[-1].item() == pytest.approx(0.02 / 4)
    cosine = convert_adm_state_dict(state_dict, {"num_head_channels": 32, "noise_schedule": "cosine"})
    assert cosine.pipeline.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    fixed = convert_adm_state_dict(random_adm_state_dict(Spec(learn_sigma=False)), {"num_head_channels": 32})
    assert fixed.pipeline.scheduler.config.variance_type == "fixed_large"  # guided-diffusion's σ² = β


@pytest.fixture(scope="module")
def bedroom_folder(tmp_path_factory) -> tuple[Path, Path, Spec]:
    """A tiny checkpoint named lsun_bedroom.pt, converted by the library call."""
    root = tmp_path_factory.mktemp("adm")
    spec = Spec()
    checkpoint = save_checkpoint(root, spec, "lsun_bedroom.pt")
    convert_adm(checkpoint, root / "converted", {**flags_of(spec), "image_size": 16})
    return checkpoint, root / "converted", spec


def test_the_folder_loads_and_samples_with_stock_diffusers(bedroom_folder):
    checkpoint, folder, spec = bedroom_folder
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
    assert list((folder / "unet").glob("*.safetensors"))
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
    assert max_difference(torch.load(checkpoint, weights_only=True), spec, unet) <= 1e-4
    pipeline = DDPMPipeline.from_pretrained(folder)
    assert isinstance(pipeline.scheduler, DDPMScheduler)
    assert pipeline.scheduler.config.variance_type == "learned_range"
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3)


def test_the_card_states_source_licence_and_published_fid(bedroom_folder):
    import hashlib

    checkpoint, folder, _ = bedroom_folder
    card = ModelCard.load(folder / "README.md")
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() in card.text
    assert card.data.license == "mit" and "MIT" in card.text
    assert "lsun_bedroom.pt" in card.text and "--num_head_channels 32" in card.text
    assert "| FID | 1.90 |" in card.text and "| Precision | 0.66 |" in card.text and "| Recall | 0.51 |" in card.text
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert results == {"fid": 1.90, "precision": 0.66, "recall": 0.51}


def test_a_card_for_an_unknown_file_says_so(tmp_path):
    checkpoint = save_checkpoint(tmp_path, Spec(), "my_model.pt")
    convert_adm(checkpoint, tmp_path / "out", flags_of(Spec()))
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "Not published / unknown" in card.text and not card.data.eval_results


class CodeInAPickle:
    """Unpickling this calls open(marker, "w"): it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_carrying_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "the-code-ran"
    checkpoint = tmp_path / "lsun_bedroom.pt"
    torch.save({**random_adm_state_dict(Spec()), "extra": CodeInAPickle(marker)}, checkpoint)
    with pytest.raises(InputError, match="holds more than tensors .* refused unread"):
        load_adm_state_dict(checkpoint)
    with pytest.raises(SystemExit):
        cli.main(["convert-adm", str(checkpoint), str(tmp_path / "out")])
    assert not marker.exists() and not (tmp_path / "out").exists()
    torch.load(checkpoint, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def test_a_nested_state_dict_is_taken_only_when_it_is_plain_tensors(tmp_path):
    state_dict = random_adm_state_dict(Spec())
    torch.save({"state_dict": state_dict, "step": 7}, tmp_path / "nested.pt")
    assert load_adm_state_dict(tmp_path / "nested.pt").keys() == state_dict.keys()
    torch.save({"model": {**state_dict, "note": "not a tensor"}}, tmp_path / "mixed.pt")
    with pytest.raises(InputError, match="not a plain state dict: 'note' holds a str"):
        load_adm_state_dict(tmp_path / "mixed.pt")


def test_out_dir_is_never_half_written_and_only_a_previous_conversion_is_replaced(tmp_path, monkeypatch):
    spec = Spec()
    checkpoint = save_checkpoint(tmp_path, spec)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="OUT_DIR .*busy.* is not empty and was not written by convert-adm"):
        convert_adm(checkpoint, tmp_path / "busy", flags_of(spec))
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["mine.txt"]

    convert_adm(checkpoint, tmp_path / "out", flags_of(spec))
    before = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "out").rglob("*"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelCard, "save", interrupted)  # dies after the weights, before the card
    with pytest.raises(KeyboardInterrupt):
        convert_adm(checkpoint, tmp_path / "out", {**flags_of(spec), "dropout": 0.3})
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "out").rglob("*")) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert UNet2DModel.load_config(tmp_path / "out", subfolder="unet")["dropout"] == 0.0
    monkeypatch.undo()
    convert_adm(checkpoint, tmp_path / "out", {**flags_of(spec), "dropout": 0.3})  # a previous conversion: replaced
    assert UNet2DModel.load_config(tmp_path / "out", subfolder="unet")["dropout"] == 0.3


def test_a_previous_conversion_holding_other_files_is_refused_and_kept(tmp_path):
    spec = Spec()
    checkpoint = save_checkpoint(tmp_path, spec)
    convert_adm(checkpoint, tmp_path / "out", flags_of(spec))
    (tmp_path / "out" / "evaluation.json").write_text('{"fid": 9.5}')  # what `lsun-ddpm evaluate` adds
    (tmp_path / "out" / "notes").mkdir()
    (tmp_path / "out" / "notes" / "mine.txt").write_text("keep")
    before = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in (tmp_path / "out").rglob("*")
              if p.is_file()}
    with pytest.raises(InputError, match="holds a previous conversion and also evaluation.json, notes"):
        convert_adm(checkpoint, tmp_path / "out", {**flags_of(spec), "dropout": 0.3})
    assert {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in (tmp_path / "out").rglob("*")
            if p.is_file()} == before


def test_converting_into_the_working_directory_keeps_it(tmp_path, monkeypatch):
    spec = Spec()
    checkpoint = save_checkpoint(tmp_path, spec)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    inode = here.stat().st_ino
    convert_adm(checkpoint, ".", flags_of(spec))
    convert_adm(checkpoint, ".", {**flags_of(spec), "dropout": 0.3})  # and again: a previous conversion
    assert Path.cwd() == here and here.stat().st_ino == inode  # the shell's folder, not a new one
    assert sorted(p.name for p in here.iterdir()) == ["README.md", "adm_conversion.json", "model_index.json",
                                                      "scheduler", "unet"]
    assert UNet2DModel.load_config(".", subfolder="unet")["dropout"] == 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "tiny.pt"]  # no staging folder left


def test_the_command_end_to_end_then_sample(tmp_path):
    spec = replace(Spec(), head_channels=16)  # no flags needed: 64 channels / guided-diffusion's 4 heads
    save_checkpoint(tmp_path, spec)
    result = run_cli(tmp_path, "convert-adm", "tiny.pt", "out", "--use_fp16", "True", "--dropout", "0.1")
    assert "wrote out: a stock DDPMPipeline converted from tiny.pt" in result.stdout
    assert "--use_fp16 True" in result.stdout and "read from the checkpoint: num_channels" in result.stdout
    record = json.loads((tmp_path / "out" / "adm_conversion.json").read_text())
    assert record["source"] == "tiny.pt" and record["flags"]["dropout"] == 0.1
    cli.main(["sample", str(tmp_path / "out"), "--num_images", "1", "--num_inference_steps", "2", "--no_bf16",
              "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").is_file()


def test_help_says_fp16_changes_nothing(capsys):
    with pytest.raises(SystemExit):
        cli.main(["convert-adm", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--use_fp16 True|False" in out and "written as the checkpoint stores them (fp32)" in out
