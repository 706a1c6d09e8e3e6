"""Publishing a run: the model card, the folder that is uploaded, and the push itself.

`prepare_upload` writes exactly the folder that `push_run` uploads, so
`lsun-ddpm push --dry_run DIR` shows what would be published. Nothing in the
run folder is changed by either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .diffusion import LEARNED_VARIANCE
from .errors import HubUploadError, InputError
from .export import staged
from .layout import (CARD_FILE, CARD_MODEL_ID_PLACEHOLDER, CONFIG_FILE, CONVERSION_FILE, EVALUATION_FILE, GRID_FILE,
                     INTERPOLATION_FIGURE, MODEL_INDEX, NEIGHBOURS_FIGURE, NEIGHBOURS_RECORD, RAW_UNET, SCHEDULER,
                     SCHEDULER_CONFIG, SUMMARY_FILE, UNET, UNET_CONFIG, is_conversion)
from .pipelines import ddpm_interpolation

logger = logging.getLogger(__name__)

CARD_TEMPLATE = Path(__file__).with_name("model_card_template.md")
PIPELINE_FILE = Path(ddpm_interpolation.__file__)
# Copied when the run has them (a folder `convert-adm` wrote has CONVERSION_FILE); those of
# PATH_BEARING_FILES with their local paths made publishable (`publishable_paths`).
RUN_FILES = (MODEL_INDEX, CONFIG_FILE, SUMMARY_FILE, EVALUATION_FILE, GRID_FILE, INTERPOLATION_FIGURE,
             NEIGHBOURS_FIGURE, CONVERSION_FILE)
PATH_BEARING_FILES = (CONFIG_FILE, EVALUATION_FILE)
COMPONENT_FOLDERS = (UNET, SCHEDULER)
# What a push of a run may upload: on the repo, those the new upload lacks are deleted (`--no_raw` after a push
# with raw weights, a run without evaluation.json); anything else there (a user's own files) is left alone.
PUBLISHED_PATTERNS = [f"{folder}/*" for folder in (*COMPONENT_FOLDERS, RAW_UNET)] + [
    *RUN_FILES, PIPELINE_FILE.name, CARD_FILE]
# What a push of the Space may upload (see `prepare_space_upload`), likewise.
SPACE_PATTERNS = ["app.py", "requirements.txt", "README.md", "lsun_ddpm/*"]
TAGS = ["diffusers", "unconditional-image-generation", "ddpm", "diffusion", "pytorch"]


def check_repo_id(repo_id: str, flag: str) -> str:
    """`repo_id` if the Hub would accept it as `NAME` or `USER/NAME`; else an InputError naming `flag`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise InputError(f"{flag} {repo_id!r} is not a valid Hub repo id: {error}") from None
    return repo_id


# ---------------------------------------------------------------- reading a run


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_yaml(path: Path) -> dict[str, Any]:
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


# ---------------------------------------------------------------- the card


def build_model_card(run_dir: str | os.PathLike, repo_id: str, license: str = "apache-2.0",
                     include_raw: bool = True, has_interpolation: bool = False) -> ModelCard:
    """The model card of a run, from what the run wrote (config, summary, evaluation, figures)."""
    run_dir = Path(run_dir)
    config = _read_yaml(run_dir / CONFIG_FILE)
    summary = _read_json(run_dir / SUMMARY_FILE)
    evaluation = _read_json(run_dir / EVALUATION_FILE)
    unet_config = _read_json(run_dir / UNET / UNET_CONFIG)
    scheduler_config = _read_json(run_dir / SCHEDULER / SCHEDULER_CONFIG)
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
        "neighbours_note": _read_json(run_dir / NEIGHBOURS_RECORD).get("note", ""),
    }
    return ModelCard.from_template(card_data, template_str=CARD_TEMPLATE.read_text(), **values)


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


# ---------------------------------------------------------------- the upload folder


def prepare_upload(run_dir: str | os.PathLike, destination: str | os.PathLike, repo_id: str,
                   include_raw: bool = True, figures: bool = True, license: str = "apache-2.0") -> Path:
    """Write into `destination` (new or empty) exactly the files that are published for the run in `run_dir`.

    The pipeline folder (EMA weights, safetensors), the raw weights if asked,
    the run's config, summary and figures, an interpolation strip made now if
    the run has none, the interpolation pipeline file, and the model card.
    A folder `convert-adm` wrote keeps its own card (MIT, the source checkpoint)
    and its adm_conversion.json; `license` and `figures` are for cards built here.
    """
    run_dir = check_run_folder(run_dir)
    converted = is_conversion(run_dir)
    with new_folder(destination) as staging:
        for name in COMPONENT_FOLDERS + ((RAW_UNET,) if include_raw else ()):
            if (run_dir / name).is_dir():
                shutil.copytree(run_dir / name, staging / name)
        for name in RUN_FILES:
            if (run_dir / name).is_file() and name in PATH_BEARING_FILES:
                copy_without_local_paths(run_dir / name, staging / name, run_dir)
            elif (run_dir / name).is_file():
                shutil.copy2(run_dir / name, staging / name)
        shutil.copy2(PIPELINE_FILE, staging / PIPELINE_FILE.name)
        if converted:  # its own card, loading it from the repo
            card = (run_dir / CARD_FILE).read_text().replace(CARD_MODEL_ID_PLACEHOLDER, repo_id)
            (staging / CARD_FILE).write_text(card)
        else:
            if figures and not (staging / INTERPOLATION_FIGURE).is_file():
                make_interpolation_figure(run_dir, staging / INTERPOLATION_FIGURE)
            card = build_model_card(run_dir, repo_id, license, include_raw, (staging / INTERPOLATION_FIGURE).is_file())
            card.save(staging / CARD_FILE)
    return Path(destination)


def copy_without_local_paths(source: Path, destination: Path, run_dir: Path) -> None:
    """Copy a run's YAML or JSON record with its local paths made publishable (see `publishable_paths`);
    byte for byte when it holds none."""
    is_json = source.suffix == ".json"
    record = _read_json(source) if is_json else _read_yaml(source)
    publishable = publishable_paths(record, run_dir)
    if publishable == record:
        shutil.copy2(source, destination)
    elif is_json:
        destination.write_text(json.dumps(publishable, indent=2) + "\n")
    else:
        destination.write_text(yaml.safe_dump(publishable, sort_keys=False))


def publishable_paths(value: Any, run_dir: Path) -> Any:
    """`value` (a run's config or evaluation record) with every local path in it made safe to publish:
    relative to the run folder when inside it, else only its last component. A user's home folder and
    folder names stay on their machine; Hub ids and other text are kept.

    A text is a local path when it is absolute, or names something that exists
    here (relative to the working folder).
    """
    if isinstance(value, dict):
        return {key: publishable_paths(item, run_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [publishable_paths(item, run_dir) for item in value]
    if not isinstance(value, str) or not _is_local_path(value):
        return value
    path, root = Path(value).resolve(), run_dir.resolve()
    if path == root or root in path.parents:
        return path.relative_to(root).as_posix() or "."
    return path.name


def _is_local_path(text: str) -> bool:
    try:
        return bool(text) and (os.path.isabs(text) or Path(text).exists())
    except (OSError, ValueError):  # a name too long, a NUL byte: not a path of this machine
        return False


def check_run_folder(run_dir: str | os.PathLike) -> Path:
    """`run_dir` as a Path if it is a pipeline folder (training's or `convert-adm`'s); else FileNotFoundError."""
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_INDEX).is_file():
        raise FileNotFoundError(f"{run_dir} is not a pipeline folder (no model_index.json): train first")
    return run_dir


@contextlib.contextmanager
def new_folder(destination: str | os.PathLike) -> Iterator[Path]:
    """A folder to write `destination` in, put in place only when the block ends without an error
    (`export.staged`): an interrupted dry run leaves no half-written folder that a rerun would refuse."""
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise FileExistsError(f"{destination} is not empty: give a new folder")
    with staged(destination) as staging:
        staging.mkdir()
        yield staging


def make_interpolation_figure(run_dir: Path, path: Path, seed_pairs=((0, 1), (2, 3))) -> None:
    """A small interpolation strip (slerp, t chosen per pair) from the run's EMA weights."""
    from .export import save_image
    from .interpolation import Pair, interpolate_pairs, load_interpolation_pipeline, strip

    pipeline = load_interpolation_pipeline(str(run_dir))
    pipeline.set_progress_bar_config(disable=True)
    results = interpolate_pairs(pipeline, [Pair(a, b) for a, b in seed_pairs], t="auto", num_frames=6,
                                method="slerp", num_inference_steps=25)
    save_image(strip(results), path)


# ---------------------------------------------------------------- the push


def push_run(run_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
             revision: str | None = None, commit_message: str = "Upload DDPM pipeline", include_raw: bool = True,
             figures: bool = True, license: str = "apache-2.0") -> str:
    """Create (if needed) the model repo and upload the run's publishable folder; return the commit URL.

    Authentication is huggingface_hub's: `token`, else HF_TOKEN, else the login
    cache. Errors never show the token and leave the run folder as it was. A
    bare NAME is the token's user's repo, and the card names it USER/NAME.
    Files of an earlier push that this one does not upload are deleted from the repo.
    """
    check_run_folder(run_dir)  # before any request
    (repo_id,) = full_repo_ids([repo_id], "model", token)
    with tempfile.TemporaryDirectory(prefix="lsun-ddpm-upload-") as staging:
        folder = prepare_upload(run_dir, Path(staging) / "upload", repo_id, include_raw, figures, license)
        return upload_folder_to_hub(folder, repo_id, "model", token, private, revision, commit_message,
                                    delete_patterns=PUBLISHED_PATTERNS)


def _without_token(error: Exception, token: str | None) -> str:
    """The error's message with the token masked: messages are printed and logged.

    Without an explicit `token` the client used HF_TOKEN or the login cache, so
    that one is masked: a proxy or server error can echo the request's headers.
    """
    from huggingface_hub import get_token

    token = token or get_token()
    return str(error).replace(token, "***") if token else str(error)


@contextlib.contextmanager
def _reported_as_upload_error(repo_id: str, repo_type: str, token: str | None) -> Iterator[None]:
    """Any error of the Hub requests in the block, as a HubUploadError that says what to do (token masked)."""
    try:
        yield
    except Exception as error:
        raise HubUploadError(
            f"could not upload to the Hub {repo_type} repo {repo_id!r} ({type(error).__name__}: "
            f"{_without_token(error, token)}). "
            "Nothing local was changed; check the network and your token (`hf auth login`, HF_TOKEN or "
            "--hub_token), then push again."
        ) from None


def full_repo_ids(repo_ids: list[str], repo_type: str = "model", token: str | None = None) -> list[str]:
    """The ids as USER/NAME: a bare NAME is the repo `create_repo` makes under the token's user (`whoami`).

    What the card's usage code and the Space's MODEL_ID must name. Asks the Hub only when an id is bare.
    """
    from huggingface_hub import HfApi

    if all("/" in repo_id for repo_id in repo_ids):
        return list(repo_ids)
    with _reported_as_upload_error(repo_ids[0], repo_type, token):
        user = HfApi(token=token).whoami()["name"]
    return [repo_id if "/" in repo_id else f"{user}/{repo_id}" for repo_id in repo_ids]


def upload_folder_to_hub(folder: Path, repo_id: str, repo_type: str = "model", token: str | None = None,
                         private: bool = False, revision: str | None = None, commit_message: str = "Upload",
                         space_sdk: str | None = None, delete_patterns: list[str] | None = None) -> str:
    """Create (if needed) the repo and the branch `revision`, and upload `folder` in one commit; the commit URL.

    `delete_patterns`: files on the repo matching them that `folder` lacks are deleted in the same commit
    (huggingface_hub's `upload_folder`; it always keeps .gitattributes).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with _reported_as_upload_error(repo_id, repo_type, token):
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type, space_sdk=space_sdk)
        if revision:
            api.create_branch(repo.repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), repo_type=repo_type,
                                   revision=revision, commit_message=commit_message,
                                   delete_patterns=delete_patterns)
    logger.info("uploaded %s to %s", folder, commit.commit_url)
    return commit.commit_url


# ---------------------------------------------------------------- the Space


def prepare_space_upload(destination: str | os.PathLike, model_id: str) -> Path:
    """Write the Space as it is published: app.py, requirements.txt, README.md (its `models`
    set to `model_id`) and a copy of the `lsun_ddpm` package that app.py imports."""
    import lsun_ddpm
    from huggingface_hub import SpaceCard

    from . import space

    space_dir = Path(space.__file__).parent
    with new_folder(destination) as staging:
        for name in ("app.py", "requirements.txt"):
            shutil.copy2(space_dir / name, staging / name)
        card = SpaceCard.load(space_dir / "README.md")
        card.data.models = [model_id]
        card.save(staging / "README.md")
        package = staging / "lsun_ddpm"
        _copy_sources(Path(lsun_ddpm.__file__).parent, package, extra=("model_card_template.md",))
        _copy_sources(PIPELINE_FILE.parent, package / "pipelines")
    return Path(destination)


def _copy_sources(source: Path, destination: Path, extra: tuple[str, ...] = ()) -> None:
    destination.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        if file.suffix == ".py" or file.name in extra:
            shutil.copy2(file, destination / file.name)


def push_space(space_id: str, model_id: str, token: str | None = None, private: bool = False,
               commit_message: str = "Upload Space") -> str:
    """Create (if needed) the Gradio Space, upload it, and set its MODEL_ID variable; return the commit URL.

    Bare names are the token's user's (`full_repo_ids`): MODEL_ID is always USER/NAME.
    """
    from huggingface_hub import HfApi

    space_id, model_id = full_repo_ids([space_id, model_id], "space", token)
    with tempfile.TemporaryDirectory(prefix="lsun-ddpm-space-") as staging:
        folder = prepare_space_upload(Path(staging) / "space", model_id)
        url = upload_folder_to_hub(folder, space_id, "space", token, private, None, commit_message,
                                   space_sdk="gradio", delete_patterns=SPACE_PATTERNS)
    try:
        HfApi(token=token).add_space_variable(space_id, "MODEL_ID", model_id)
    except Exception as error:
        raise HubUploadError(f"the Space was uploaded, but setting its MODEL_ID variable failed "
                             f"({_without_token(error, token)}); "
                             f"set MODEL_ID={model_id} in the Space's settings") from None
    return url
