"""Loading a model to sample: its U-Net (EMA or raw), its scheduler, what its run recorded; one sentence for a MODEL that is no pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffusers import DDPMScheduler, UNet2DModel

from ..errors import InputError, ModelUnavailableError
from ..layout import CHECKPOINT_PATTERN, CONFIG_FILE, DISTILLATION_FILE, MODEL_INDEX, SCHEDULER, UNET, WEIGHT_FOLDERS

MODEL_HINT = "pass a pipeline folder written by training or convert-adm, or a Hub repo id (USER/NAME)"


def looks_local(model: str) -> bool:
    """Whether `model` is written as a path rather than a Hub repo id (NAME or USER/NAME): absolute, starting
    with . or ~, or with more than one separator."""
    return os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1 or "\\" in model


def check_model_source(model: str) -> None:
    """A ModelUnavailableError that says what to pass instead, for a MODEL that is a local file or folder
    but no pipeline (a training checkpoint, say), or a path that does not exist; a Hub id is left to the Hub.

    A path is never looked up on the Hub: that would only add a connection error to the real problem.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if any((path / name).exists() for name in (MODEL_INDEX, UNET, SCHEDULER)):
            return  # a pipeline, or enough of one for the loader to name what is missing
        if CHECKPOINT_PATTERN.match(path.name) or (path / "optimizer.bin").is_file():
            raise ModelUnavailableError(
                f"{model} is a training checkpoint (the state training resumes from), not a pipeline folder: pass "
                f"its run folder, {path.parent}, whose unet/ holds the EMA weights of the last export "
                "(--weights raw: the raw ones)")
        raise ModelUnavailableError(f"{model} is a folder but no pipeline folder (it has no model_index.json): "
                                    f"{MODEL_HINT}")
    if path.exists():
        raise ModelUnavailableError(f"{model} is a file, not a pipeline folder: {MODEL_HINT}")
    if looks_local(model):
        raise ModelUnavailableError(f"{model}: no such folder; {MODEL_HINT}")


def model_file(model: str, name: str) -> Path | None:
    """The file `name` of a pipeline folder or Hub repo, or None where it has none (or, offline, no cached copy)."""
    if Path(model).is_dir():
        path = Path(model) / name
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, name))
    except Exception:  # no such file, no network, or not a repo id
        return None


def recorded_training_options(model: str) -> dict:
    """The training options a run recorded (`training_config.yaml`), from a folder or a Hub repo; {} if none.

    Only what a run says about itself is read here (its data, whether it kept
    an EMA), so unlike `run_folder.read_run_config` (which resumes runs) keys
    are not checked against this version's options, a Hub repo is read too, and
    the Space, which does not install `transformers`, can use it. A model
    without the file is taken as a plain pipeline.
    """
    import yaml

    path = model_file(model, CONFIG_FILE)
    values = yaml.safe_load(path.read_text()) if path else None
    return values if isinstance(values, dict) else {}


def student_steps(model: str) -> int | None:
    """The step count a student of `lsun-ddpm distill` was distilled for (its `distillation.json`); None for
    any other model."""
    path = model_file(model, DISTILLATION_FILE)
    return int(json.loads(path.read_text())["student_steps"]) if path else None


def has_ema_weights(run_config: dict) -> bool:
    """False for a run trained with `--no_use_ema`: its `unet/` then holds the raw (training) weights."""
    return run_config.get("use_ema", True) is not False


def weights_subfolder(weights: str, has_ema: bool = True) -> str:
    """Where the `weights` ("ema" or "raw") of a run live; without an EMA both are the raw weights in `unet/`."""
    if weights not in WEIGHT_FOLDERS:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FOLDERS)}, got {weights!r}")
    return WEIGHT_FOLDERS[weights] if has_ema else WEIGHT_FOLDERS["ema"]


def load_unet(model: str, weights: str = "ema", has_ema: bool | None = None) -> UNet2DModel:
    """The EMA (`unet/`) or raw (`unet_raw/`) U-Net of a pipeline folder or Hub repo, from safetensors only.

    A run trained without EMA (`has_ema` False; by default read from the
    run's `training_config.yaml`) has only `unet/`, its raw weights.
    """
    check_model_source(model)
    has_ema = has_ema_weights(recorded_training_options(model)) if has_ema is None else has_ema
    subfolder = weights_subfolder(weights, has_ema)
    try:
        return UNet2DModel.from_pretrained(model, subfolder=subfolder, use_safetensors=True).eval()
    except (OSError, ValueError) as error:
        hint = " (runs of this project keep the non-EMA weights in unet_raw/)" if weights == "raw" else ""
        raise ModelUnavailableError(
            f"cannot load the {weights} weights from {model!r}/{subfolder}{hint}: {error}. MODEL is a pipeline "
            "folder written by training, or a Hub repo id (which needs network access, or HF_HUB_OFFLINE=1 and a "
            "cached copy)."
        ) from None


def load_scheduler_config(model: str) -> dict:
    check_model_source(model)
    try:
        return dict(DDPMScheduler.load_config(model, subfolder=SCHEDULER))
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(f"cannot load the scheduler of {model!r}: {error}") from None


def weights_to_use(model: str, weights: str) -> tuple[bool, str]:
    """(whether the run kept an EMA, the weights that will be sampled).

    A run trained with --no_use_ema has only its raw weights, in unet/: asking
    for either kind gives those (and the user is told); "both" has nothing to
    compare and is refused.
    """
    if has_ema_weights(recorded_training_options(model)):
        return True, weights
    if weights == "both":
        raise InputError(f"{model} was trained without EMA, so there are no EMA weights to set beside the raw "
                         "ones: use --weights raw")
    print(f"note: {model} was trained without EMA (use_ema: false); its raw weights in unet/ are used")
    return False, "raw"
