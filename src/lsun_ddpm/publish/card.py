"""The model card of a run or a distilled student, from what it wrote (config, summary, evaluation, figures)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..layout import (CONFIG_FILE, DISTILLATION_FILE, EVALUATION_FILE, GRID_FILE, LEARNED_VARIANCE, NEIGHBOURS_FIGURE,
                      NEIGHBOURS_RECORD, RAW_UNET, SCHEDULER, SCHEDULER_CONFIG, SUMMARY_FILE, UNET, UNET_CONFIG)

CARD_TEMPLATE = Path(__file__).with_name("model_card_template.md")
STUDENT_CARD_TEMPLATE = Path(__file__).with_name("student_card_template.md")


TAGS = ["diffusers", "unconditional-image-generation", "ddpm", "diffusion", "pytorch"]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def count_parameters_on_disk(unet_folder: Path) -> int:
    """Parameters of the saved U-Net, read from the safetensors header (no model is built)."""
    from safetensors import safe_open

    total = 0
    for file in unet_folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():
                shape = weights.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


# evaluation.json key → the metric's name on the card (`lsun-ddpm evaluate` writes them all).
EVALUATION_METRICS = {"fid": "FID", "kid": "KID", "precision": "Precision", "recall": "Recall"}


def _evaluation_rows(evaluation: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for key, label in EVALUATION_METRICS.items():
        if evaluation.get(key) is None:
            continue
        spread = evaluation.get(f"{key}_std")
        rows.append({"name": label, "value": f"{evaluation[key]:.4g}" + (f" ± {spread:.2g}" if spread is not None else "")})
    return rows


def _eval_results(evaluation: dict[str, Any], data: TrainingData) -> list[EvalResult] | None:
    """The card's `model-index`: one result per metric evaluation.json holds (a null one is left out).

    The data set is the one the evaluation compared with (its `reference`), else the training data.
    """
    reference = (evaluation.get("reference") or {}).get("data")
    data = training_data(reference) if reference else data
    results = [
        EvalResult(task_type="unconditional-image-generation", dataset_type=data.dataset or "local-image-folder",
                   dataset_name=data.name, dataset_split="train", metric_type=key, metric_name=label,
                   metric_value=float(evaluation[key]))
        for key, label in EVALUATION_METRICS.items() if evaluation.get(key) is not None
    ]
    return results or None


@dataclass(frozen=True)
class TrainingData:
    """What a run was trained on, as its card and the Space describe it (from its training_config.yaml)."""

    dataset: str | None  # the Hub dataset id; None for a local folder or when the run did not record it
    local: bool
    subset: int | None = None  # --max_train_samples

    @property
    def is_lsun(self) -> bool:
        return self.dataset is not None and "lsun" in self.dataset.lower()

    @property
    def name(self) -> str:
        """The data set's name: its Hub id, "a local image folder", or "unrecorded data"."""
        return self.dataset or ("a local image folder" if self.local else "unrecorded data")

    @property
    def description(self) -> str:
        """Markdown: the name (linked when on the Hub) and the subset used."""
        link = f"[{self.dataset}](https://huggingface.co/datasets/{self.dataset})" if self.dataset else self.name
        return link + (f", first {self.subset:,} images" if self.subset else "")

    @property
    def subject(self) -> str:
        """What the model generates, in plain words: "LSUN bedrooms", or "images from <name>"."""
        if self.is_lsun and "bedroom" in self.dataset.lower():
            return "LSUN bedrooms"
        return f"images from {self.name}"

    @property
    def tags(self) -> list[str]:
        """Hub tags of the data: LSUN's only when the data is LSUN."""
        if not self.is_lsun:
            return []
        return ["lsun"] + (["bedroom"] if "bedroom" in self.dataset.lower() else [])


def training_data(config: dict[str, Any]) -> TrainingData:
    """The data of a run from its training options (a local folder wins over a dataset name, as in training)."""
    local = bool(config.get("train_data_dir"))
    return TrainingData(None if local else config.get("dataset_name"), local, config.get("max_train_samples"))


def build_model_card(run_dir: str | os.PathLike, repo_id: str, license: str = "apache-2.0",
                     include_raw: bool = True, has_interpolation: bool = False) -> ModelCard:
    """The model card of a run, from what the run wrote (config, summary, evaluation, figures); a distilled
    student's (`build_student_card`) for a folder `distill` wrote."""
    run_dir = Path(run_dir)
    if (run_dir / DISTILLATION_FILE).is_file():
        return build_student_card(run_dir, repo_id, license)
    config = read_yaml(run_dir / CONFIG_FILE)
    summary = read_json(run_dir / SUMMARY_FILE)
    evaluation = read_json(run_dir / EVALUATION_FILE)
    unet_config = read_json(run_dir / UNET / UNET_CONFIG)
    scheduler_config = read_json(run_dir / SCHEDULER / SCHEDULER_CONFIG)
    data = training_data(config)
    use_ema = config.get("use_ema", True) is not False
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license=license,
        tags=TAGS + data.tags,
        datasets=[data.dataset] if data.dataset else None,
        model_name=repo_id.split("/")[-1],
        eval_results=_eval_results(evaluation, data),
    )
    steps = summary.get("optimizer_steps")
    values = {
        "subject": data.subject,
        "is_lsun": data.is_lsun,
        "local_data": data.local,
        "use_ema": use_ema,
        "sampled_weights": "EMA weights" if use_ema else "raw weights (trained without EMA)",
        "attention": _attention_resolutions(unet_config),
        "head_channels": unet_config.get("attention_head_dim", "?"),
        "title": repo_id.split("/")[-1],
        "repo_id": repo_id,
        "resolution": unet_config.get("sample_size", config.get("resolution", "?")),
        "num_train_timesteps": scheduler_config.get("num_train_timesteps", 1000),
        "parameters": f"{count_parameters_on_disk(run_dir / UNET) / 1e6:.1f} M",
        "dropout": unet_config.get("dropout", "?"),
        "learn_sigma": scheduler_config.get("variance_type") == LEARNED_VARIANCE,
        "vlb_weight": config.get("vlb_weight", 0.001),
        "pretrained_from": config.get("pretrained_model_name_or_path"),
        "has_grid": (run_dir / GRID_FILE).is_file(),
        "grid_caption": "the last grid written during training",
        "has_interpolation": has_interpolation,
        "interpolation_caption": "slerp frames (`t=\"auto\"`)",
        "data_description": data.description,
        "random_flip": config.get("random_flip", False),
        "optimizer_steps": f"{steps:,}" if steps is not None else "unknown",
        "optimizer_steps_int": steps or 0,
        "effective_batch": _effective_batch(config, summary),
        "learning_rate": config.get("learning_rate", "?"),
        "lr_scheduler": config.get("lr_scheduler", "?"),
        "lr_warmup_steps": config.get("lr_warmup_steps", "?"),
        "max_grad_norm": config.get("max_grad_norm", "?"),
        "ema_max_decay": config.get("ema_max_decay", "?"),
        "ema_decay_now": f"{summary['ema_decay']:.5f}" if summary.get("ema_decay") else None,
        "precision": summary.get("mixed_precision", config.get("mixed_precision") or "fp32"),
        "hardware": summary.get("hardware") or summary.get("device", "unknown"),
        "wall_time": _wall_time(summary),
        "final_loss": f"{summary['final_loss']:.4f}" if summary.get("final_loss") is not None else "unknown",
        "has_raw": use_ema and include_raw and (run_dir / RAW_UNET).is_dir(),
        "evaluation": _evaluation_rows(evaluation),
        "evaluation_note": evaluation.get("note", ""),
        "has_neighbours": (run_dir / NEIGHBOURS_FIGURE).is_file(),
        "neighbours_note": read_json(run_dir / NEIGHBOURS_RECORD).get("note", ""),
    }
    return ModelCard.from_template(card_data, template_str=CARD_TEMPLATE.read_text(), **values)


def build_student_card(run_dir: Path, repo_id: str, license: str = "apache-2.0") -> ModelCard:
    """A distilled student's card: what it is, how to sample it (its own step count), its teacher (source and
    weights' SHA-256), its stages and what they cost, and its evaluation when `evaluate` has run."""
    record = read_json(run_dir / DISTILLATION_FILE)
    config = read_yaml(run_dir / CONFIG_FILE)
    evaluation = read_json(run_dir / EVALUATION_FILE)
    unet_config = read_json(run_dir / UNET / UNET_CONFIG)
    data = training_data(config)
    teacher = str(record.get("teacher", "unknown"))
    teacher_is_local = Path(teacher).expanduser().exists() or teacher.startswith((".", "/", "~"))
    card_data = ModelCardData(
        library_name="diffusers", pipeline_tag="unconditional-image-generation", license=license,
        tags=TAGS + ["distillation", "progressive-distillation"] + data.tags,
        datasets=[data.dataset] if data.dataset else None, model_name=repo_id.split("/")[-1],
        base_model=None if teacher_is_local else teacher, eval_results=_eval_results(evaluation, data),
    )
    stages = [{**stage, "images": f"{stage['images']:,}" if stage.get("images") is not None else "unknown",
               "wall_time": _duration(stage.get("wall_time_seconds")), "hardware": stage.get("hardware") or "unknown"}
              for stage in record.get("stages", [])]
    values = {
        "title": repo_id.split("/")[-1], "repo_id": repo_id, "subject": data.subject,
        "resolution": unet_config.get("sample_size", "?"), "student_steps": record.get("student_steps", "?"),
        "teacher": f"a local folder, {Path(teacher).name}" if teacher_is_local else teacher,
        "teacher_sha": record.get("teacher_weights_sha256", "unknown"),
        "parameters": f"{count_parameters_on_disk(run_dir / UNET) / 1e6:.1f} M", "stages": stages,
        "data_description": data.description, "has_grid": (run_dir / GRID_FILE).is_file(),
        "evaluation": _evaluation_rows(evaluation), "evaluation_note": evaluation.get("note", ""),
    }
    return ModelCard.from_template(card_data, template_str=STUDENT_CARD_TEMPLATE.read_text(), **values)


def _attention_resolutions(unet_config: dict[str, Any]) -> str:
    """"32, 16 and 8 px": the resolutions of the levels with attention blocks, and the middle block."""
    size = unet_config.get("sample_size", 0)
    sizes = [f"{size // 2**i}" for i, block in enumerate(unet_config.get("down_block_types", [])) if "Attn" in block]
    if not sizes:
        return "the middle block only"
    listed = ", ".join(sizes[:-1]) + (" and " if len(sizes) > 1 else "") + sizes[-1]
    return f"{listed} px and in the middle block"


def _effective_batch(config: dict[str, Any], summary: dict[str, Any]) -> str:
    micro, accumulation = config.get("train_batch_size"), config.get("gradient_accumulation_steps")
    processes = summary.get("num_processes", 1)
    total = summary.get("effective_batch_size")
    return f"{total} (micro-batch {micro} × accumulation {accumulation} × {processes} process(es))"


def _wall_time(summary: dict[str, Any]) -> str:
    """The whole run's training time, and in how many jobs when it was resumed."""
    segments = len(summary.get("segments") or [])
    resumed = (f", over {segments} jobs (the run was resumed {segments - 1} time{'s' if segments > 2 else ''})"
               if segments > 1 else "")
    return _duration(summary.get("wall_time_seconds")) + resumed


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min {rest % 60} s"
