"""Shared fixtures: generated images (no LSUN image is ever committed) and a runner
for the real training script under `accelerate launch`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

from fake_hub import without_offline_variables
from forked_process import run_forked
from in_process import LAUNCHED_ON_CPU, fresh_process_state, run_in_process

# The `fake_hub` fixture (a fake Hugging Face Hub on 127.0.0.1) for every test module.
pytest_plugins = ["fake_hub"]


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without xdist the suite runs in one process
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (the README's test command): most of the suite's time is subprocesses importing torch
    and training on one thread, so one worker per core, up to 4 (beyond that, each worker's copies of
    torch and its subprocesses' would add memory faster than they save time)."""
    return max(1, min(4, usable_cores()))


if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # This worker's in-process tensor work shares the cores with the other workers': without this,
    # each worker would spin as many torch threads as there are cores.
    torch.set_num_threads(max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `compiles` go first, in collection order. They compile the same graphs of the tiny U-Net
    (a training step, a no-grad sampling step), and pytest-xdist hands each worker a contiguous run of the
    collection: so they run one after another on one worker, and TorchInductor's on-disk cache compiles each
    graph once, instead of two workers compiling the same kernels at the same time."""
    compiling = [item for item in items if item.get_closest_marker("compiles")]
    items[:] = compiling + [item for item in items if not item.get_closest_marker("compiles")]


REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "train_unconditional.py"
PROBED_SCRIPT = Path(__file__).with_name("probed_training.py")


def make_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A flat colour with a contrasting square: easy for a tiny model to learn."""
    colour = rng.integers(0, 256, 3)
    array = np.empty((height, width, 3), np.uint8)
    array[:] = colour
    side = min(width, height) // 2
    x, y = rng.integers(0, width - side + 1), rng.integers(0, height - side + 1)
    array[y:y + side, x:x + side] = 255 - colour
    return Image.fromarray(array).convert(mode)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """32 images of mixed sizes and formats, some in nested folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")]
    for index in range(32):
        extension, pil_format = formats[index % 3]
        folder = root / ("nested/deeper" if index % 4 == 0 else "flat")
        folder.mkdir(parents=True, exist_ok=True)
        image = make_image(rng, int(rng.integers(20, 48)), int(rng.integers(20, 48)))
        image.save(folder / f"{index:02d}.{extension}", format=pil_format)
    return root


@pytest.fixture(autouse=True)
def isolated_hf_home(tmp_path, monkeypatch):
    """Each test caches 🤗 files in its own folder and never reaches the network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # huggingface_hub caches its agent registry in the HF_HOME it saw at import: not the user's.
    monkeypatch.setattr(huggingface_hub.constants, "AGENT_HARNESSES_PATH",
                        str(tmp_path / "hf_home" / ".agent_harnesses.json"), raising=False)


@pytest.fixture(autouse=True)
def fresh_process():
    """What the package counts per process starts from nothing in each test, as in a fresh process."""
    fresh_process_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate's state is a process-wide singleton: a test's `Accelerator()` that took the user's
    ACCELERATE_MIXED_PRECISION would make a later test's `Accelerator(mixed_precision="no")` raise."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        ACCELERATE_USE_CPU="true",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


# fp32 unless a test asks otherwise: the unset default is bf16 on a CPU with AVX-512-BF16 or AMX
# (lsun_ddpm.train.fast_defaults), where a 0.8 M-parameter model gains nothing from it.
TINY_RUN = [
    "--model_preset", "tiny16",
    "--mixed_precision", "no",
    "--train_batch_size", "4",
    "--learning_rate", "2e-3",
    "--lr_warmup_steps", "4",
    "--eval_batch_size", "4",
    "--ddpm_num_inference_steps", "10",
    "--seed", "0",
    "--dataloader_num_workers", "0",
]


def run_training(tmp_path: Path, output_dir: Path, args: list[str], num_processes: int = 1,
                 check: bool = True, extra_env: dict[str, str] | None = None,
                 probes: list[str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The training script on the CPU with TINY_RUN's options, offline; with `probes`, tests/probed_training.py.

    `accelerate launch`, as a user runs it (`accelerate_launch`), for several processes or
    with `extra_env` (e.g. a fake Hub, whose address huggingface_hub reads at import). One process whose
    probes kill or signal it runs as a process of its own (forked, `forked_process`), without a launcher, so
    that its exit status is its own. Otherwise the script's main runs in this process (`train_in_process`).
    """
    argv = [*TINY_RUN, "--output_dir", str(output_dir), *args]
    script = [str(TRAIN_SCRIPT)] if probes is None else [str(PROBED_SCRIPT), *probes]
    env = offline_env(tmp_path)
    if num_processes > 1 or extra_env is not None:
        if extra_env is not None:  # then the run must not be offline
            env = without_offline_variables(env) | extra_env
        result = run_forked(accelerate_launch(num_processes) + script + argv, env, tmp_path, timeout)
    elif probes_run_in_process(probes or []):
        result = train_in_process(tmp_path, *argv, probes=probes or [])
    else:
        result = run_forked([*script, *argv], env, tmp_path, timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def train_in_process(tmp_path: Path, *argv: str, probes: list[str] = ()) -> subprocess.CompletedProcess:
    """train_unconditional.py's main(argv) in this process, configured as one launched process (`in_process`);
    with `probes` (ones that may run here), tests/probed_training.py's."""
    from probed_training import main_in_process

    from lsun_ddpm.cli import train_main

    if probes:
        return run_in_process(main_in_process, [*probes, *argv], offline_env(tmp_path, **LAUNCHED_ON_CPU), tmp_path)
    return run_in_process(train_main, list(argv), offline_env(tmp_path, **LAUNCHED_ON_CPU), tmp_path)


def probes_run_in_process(probes: list[str]) -> bool:
    from probed_training import IN_PROCESS_PROBES

    return all(option in IN_PROCESS_PROBES for option in probes if option.startswith("--"))


def accelerate_launch(num_processes: int = 1) -> list[str]:
    """`accelerate launch` on the CPU with one thread per process: python's arguments, before the script's.

    Two processes need `--multi_gpu` (with ACCELERATE_USE_CPU=true, gloo):
    `--cpu --num_processes 2` would silently start a single process.
    """
    launch = ["-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--num_machines", "1"]
    if num_processes > 1:
        return launch + ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", "0"]
    return launch + ["--cpu", "--num_processes", "1"]


def run_script_directly(tmp_path: Path, *args: str, own_process: bool = False) -> subprocess.CompletedProcess:
    """The training script without `accelerate launch` (whose own report of a failed child is a traceback):
    its main in this process (`train_in_process`), or with `own_process` as `python train_unconditional.py`
    (forked, `forked_process`)."""
    if not own_process:
        return train_in_process(tmp_path, *args)
    return run_forked([str(TRAIN_SCRIPT), *args], offline_env(tmp_path), tmp_path, timeout=300)


def read_summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "training_summary.json").read_text())


def exported_weights(output_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {folder: load_file(output_dir / folder / "diffusion_pytorch_model.safetensors")
            for folder in ("unet", "unet_raw")}


def assert_bitwise_equal(expected: dict, actual: dict) -> None:
    for folder, tensors in expected.items():
        assert actual[folder].keys() == tensors.keys(), folder
        different = [k for k in tensors if not torch.equal(tensors[k], actual[folder][k])]
        assert not different, f"{folder}: {len(different)} tensors differ, e.g. {different[:3]}"


def read_scalars(output_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one TensorBoard scalar written by the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(output_dir / "logs" / "train_unconditional"))
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(tag)}


class SingleImageOracle(torch.nn.Module):
    """The exact ε-predictor for a data set of one image x*:
    ε(x_t, t) = (x_t − √ᾱ_t x*) / √(1 − ᾱ_t). Every correct sampler must return x*."""

    def __init__(self, target: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.target = target
        self.alphas_cumprod = alphas_cumprod.double()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device and dtype
        self.config = SimpleNamespace(in_channels=target.shape[1], sample_size=target.shape[-1])

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, x, t):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        t = torch.as_tensor(t).long().reshape(-1).expand(x.shape[0])
        alpha_bar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x.double() - alpha_bar.sqrt() * self.target.double()) / (1 - alpha_bar).sqrt()
        return UNet2DOutput(sample=eps.to(x.dtype))


def random_tiny_unet(seed: int = 0):
    """The tiny16 preset with small random weights everywhere (not ADM's zero init), so its output varies."""
    from lsun_ddpm.model.unet import ADMUNet2DModel

    torch.manual_seed(seed)
    model = ADMUNet2DModel.from_preset("tiny16")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.05)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_pipeline_folder(tmp_path_factory) -> Path:
    """A pipeline folder like training writes: EMA weights in unet/, different raw weights in unet_raw/."""
    from lsun_ddpm.model.diffusion import make_noise_scheduler
    from lsun_ddpm.train.ema import make_ema
    from lsun_ddpm.train.export import save_pipeline_folder

    folder = tmp_path_factory.mktemp("pipeline")
    model = random_tiny_unet()
    ema = make_ema(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)  # raw weights move away from the EMA
    save_pipeline_folder(model, make_noise_scheduler(), folder, ema=ema)
    return folder


def run_cli(tmp_path: Path, *args: str, check: bool = True, own_process: bool = False) -> subprocess.CompletedProcess:
    """`lsun-ddpm ARGS` offline: its main in this process (`in_process`), or with `own_process` as
    `python -m lsun_ddpm.cli ARGS`, forked (`forked_process`): what depends on HF_HUB_OFFLINE, which
    huggingface_hub reads at import."""
    if own_process:
        result = run_forked(["-m", "lsun_ddpm.cli", *args], offline_env(tmp_path), tmp_path)
    else:
        from lsun_ddpm.cli import main

        result = run_in_process(main, list(args), offline_env(tmp_path), tmp_path)
    if check and result.returncode != 0:
        raise AssertionError(f"lsun-ddpm {args[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def run_cli_launched(tmp_path: Path, num_processes: int, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    """`accelerate launch -m lsun_ddpm.cli ARGS` on the CPU, `num_processes` processes (`accelerate_launch`),
    offline, with `extra_env`; one process runs in this process, configured as a launched one (`in_process`)."""
    env = offline_env(tmp_path, **extra_env)
    if num_processes == 1:
        from lsun_ddpm.cli import main

        result = run_in_process(main, list(args), env | LAUNCHED_ON_CPU, tmp_path)
    else:
        result = run_forked([*accelerate_launch(num_processes), "-m", "lsun_ddpm.cli", *args], env, tmp_path,
                                  timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"launched lsun-ddpm {args[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def no_ema_pipeline_folder(tmp_path_factory) -> Path:
    """A folder like a `--no_use_ema` run writes: the raw weights in unet/, no unet_raw/, and a config saying so."""
    import yaml

    from lsun_ddpm.model.diffusion import make_noise_scheduler
    from lsun_ddpm.train.export import save_pipeline_folder

    folder = tmp_path_factory.mktemp("no_ema")
    save_pipeline_folder(random_tiny_unet(seed=1), make_noise_scheduler(), folder)
    (folder / "training_config.yaml").write_text(yaml.safe_dump(
        {"train_data_dir": "photos", "dataset_name": None, "use_ema": False, "resolution": 16}))
    return folder


def dark_pixels(image: Image.Image) -> int:
    return int((np.asarray(image.convert("L")) < 128).sum())


def rendered_ink(text: str) -> int:
    """Dark pixels of `text` drawn alone with PIL's default font, far from any edge."""
    from PIL import ImageDraw, ImageFont

    canvas = Image.new("RGB", (20 * len(text) + 40, 60), "white")
    ImageDraw.Draw(canvas).text((20, 20), text, fill="black", font=ImageFont.load_default())
    return dark_pixels(canvas)
