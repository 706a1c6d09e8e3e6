"""The ADM U-Net presets, ADM's initialisation, and exports that load with stock diffusers."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from conftest import REPO_ROOT
from lsun_ddpm.model.diffusion import make_noise_scheduler
from lsun_ddpm.train.ema import make_ema
from lsun_ddpm.train.export import save_pipeline_folder
from lsun_ddpm.model.unet import ADMUNet2DModel, PRESETS, build_model


@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    return ADMUNet2DModel.from_preset("paper128")


def attention_input_sizes(model, size):
    """Spatial sizes at which each attention layer runs, for a `size`-px input."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].shape[-1])))
             for m in model.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size), torch.tensor([10]))
    for hook in hooks:
        hook.remove()
    return seen


def test_paper_preset_attention_at_32_16_8_and_in_the_middle(paper_model):
    seen = attention_input_sizes(paper_model, 128)
    mid = {id(a) for a in paper_model.mid_block.attentions}
    assert {size for m, size in seen if id(m) not in mid} == {32, 16, 8}
    assert {size for m, size in seen if id(m) in mid} == {4}
    for attention, _ in seen:
        assert attention.heads == attention.inner_dim // 64  # 64 channels per head
        assert attention.group_norm is not None  # normalised, the middle block's included


def test_paper_preset_resblocks_use_scale_shift_norm_dropout_and_resample(paper_model):
    resnets = [m for m in paper_model.modules() if isinstance(m, ResnetBlock2D)]
    assert resnets and all(r.time_embedding_norm == "scale_shift" for r in resnets)
    assert all(r.dropout.p == 0.1 for r in resnets)
    # ADM's resblock_updown: every resolution change happens inside a residual block.
    assert sum(r.down for r in resnets) == 5 and sum(r.up for r in resnets) == 5
    assert not any(type(m).__name__ in ("Downsample2D", "Upsample2D") and m.use_conv
                   for m in paper_model.modules())
    assert paper_model.config.block_out_channels == (128, 128, 256, 256, 512, 512)


def test_adm_zero_init_makes_the_initial_prediction_zero(paper_model):
    resnets = [m for m in paper_model.modules() if isinstance(m, ResnetBlock2D)]
    assert all(torch.count_nonzero(r.conv2.weight) == 0 for r in resnets)
    attentions = [m for m in paper_model.modules() if isinstance(m, Attention)]
    assert all(torch.count_nonzero(a.to_out[0].weight) == 0 for a in attentions)
    assert torch.count_nonzero(paper_model.conv_out.weight) == 0
    out = ADMUNet2DModel.from_preset("tiny16")(torch.randn(2, 3, 16, 16), torch.tensor([3, 700])).sample
    assert out.shape == (2, 3, 16, 16) and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("name", ["small32", "tiny16"])  # paper128 is covered above
def test_small_presets_build_and_keep_the_input_shape(name):
    model = ADMUNet2DModel.from_preset(name)
    size = model.config.sample_size
    model.conv_out.weight.data.normal_()  # so the output is not trivially zero
    out = model(torch.randn(1, 3, size, size), torch.tensor([5])).sample
    assert out.shape == (1, 3, size, size)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="tiny16"):
        ADMUNet2DModel.from_preset("huge")


def test_any_unet2d_config_file_or_folder_can_replace_the_preset(tmp_path):
    UNet2DModel.from_config(PRESETS["tiny16"] | {"block_out_channels": (16, 32)}).save_config(tmp_path / "cfg")
    model = build_model("paper128", str(tmp_path / "cfg"))
    assert isinstance(model, ADMUNet2DModel) and list(model.config.block_out_channels) == [16, 32]
    model = build_model("paper128", str(tmp_path / "cfg" / "config.json"))
    assert list(model.config.block_out_channels) == [16, 32]


def test_to_unet2d_shares_weights_and_gives_identical_outputs():
    torch.manual_seed(0)
    model = ADMUNet2DModel.from_preset("tiny16")
    for p in model.parameters():
        p.data.normal_(std=0.05)
    stock = model.to_unet2d()
    assert type(stock) is UNet2DModel
    ours, theirs = model.state_dict(), stock.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(theirs[name].data_ptr() == tensor.data_ptr() for name, tensor in ours.items())  # same storage
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 999])
    model.eval(), stock.eval()
    torch.testing.assert_close(stock(x, t).sample, model(x, t).sample, rtol=0, atol=0)
    with torch.no_grad():
        model.conv_out.bias.add_(1.0)  # a change to one is a change to the other
    torch.testing.assert_close(stock(x, t).sample, model(x, t).sample, rtol=0, atol=0)


# docs/model.md and README.md state these sizes
PROMISED_MILLIONS_OF_PARAMETERS = {"paper128": "134.3", "small32": "3.2", "tiny16": "0.8"}


@pytest.mark.parametrize("name", sorted(PROMISED_MILLIONS_OF_PARAMETERS))
def test_presets_have_the_documented_number_of_parameters(name, paper_model):
    model = paper_model if name == "paper128" else ADMUNet2DModel.from_preset(name)
    millions = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}"
    assert millions == PROMISED_MILLIONS_OF_PARAMETERS[name]
    for document in ("docs/model.md",):
        row = next(line for line in (REPO_ROOT / document).read_text().splitlines()
                   if line.startswith("|") and name in line.split("|")[1])  # the table row of this preset
        assert f"| {millions} M |" in row, (document, row)


@pytest.mark.parametrize("with_ema", [True, False])
def test_every_exported_unet_config_names_the_stock_class(tmp_path, with_ema):
    model = ADMUNet2DModel.from_preset("tiny16")
    save_pipeline_folder(model, make_noise_scheduler(), tmp_path, ema=make_ema(model) if with_ema else None)
    folders = ["unet", "unet_raw"] if with_ema else ["unet"]
    assert sorted(p.parent.name for p in tmp_path.glob("unet*/config.json")) == folders
    for folder in folders:
        assert json.loads((tmp_path / folder / "config.json").read_text())["_class_name"] == "UNet2DModel"


@pytest.mark.slow
def test_saved_pipeline_loads_with_stock_diffusers_without_lsun_ddpm(tmp_path):
    torch.manual_seed(0)
    model = ADMUNet2DModel.from_preset("tiny16")
    for p in model.parameters():
        p.data.normal_(std=0.05)
    model.eval()
    ema = make_ema(model)  # a fresh EMA equals the weights, so both folders must reproduce `model`
    save_pipeline_folder(model, make_noise_scheduler(), tmp_path / "run", ema=ema)
    index = json.loads((tmp_path / "run" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert (tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    x, t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([42])
    expected = model(x, t).sample
    torch.save({"x": x, "t": t, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["lsun_ddpm"] = None  # make the package unimportable, as on a user's machine
        import torch
        from diffusers import DDPMPipeline, UNet2DModel
        run = {str(tmp_path / "run")!r}
        pipeline = DDPMPipeline.from_pretrained(run, use_safetensors=True)
        unet = UNet2DModel.from_pretrained(run + "/unet", use_safetensors=True)
        raw = UNet2DModel.from_pretrained(run + "/unet_raw", use_safetensors=True)
        assert type(pipeline.unet) is UNet2DModel, type(pipeline.unet)
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(unet(io["x"], io["t"]).sample, io["expected"])
            torch.testing.assert_close(raw(io["x"], io["t"]).sample, io["expected"])
        images = pipeline(batch_size=2, num_inference_steps=3, output_type="np").images
        assert images.shape == (2, 16, 16, 3), images.shape
        print("stock-load-ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stock-load-ok" in result.stdout


def test_gradient_checkpointing_recomputes_the_blocks_in_backward(monkeypatch):
    """What --gradient_checkpointing saves memory by: with it, residual blocks run again during
    backward (their activations were not kept); without it, backward runs none of them."""
    calls = []
    forward = ResnetBlock2D.forward
    monkeypatch.setattr(ResnetBlock2D, "forward", lambda self, *args, **kwargs: calls.append(1) or
                        forward(self, *args, **kwargs))  # torch's recomputation bypasses forward hooks

    def forwards_during_backward(checkpointing: bool) -> int:
        model = build_model("tiny16").train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        loss = model(torch.randn(2, 3, 16, 16), torch.tensor([10, 900])).sample.pow(2).mean()
        before = len(calls)
        loss.backward()
        return len(calls) - before

    assert forwards_during_backward(checkpointing=False) == 0
    assert forwards_during_backward(checkpointing=True) > 0
