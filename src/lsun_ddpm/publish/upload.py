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
from pathlib import Path
from typing import Any, Iterator

import yaml

from ..errors import HubUploadError, RunNotPushedError
from ..files import staged
from ..layout import (CARD_FILE, CARD_MODEL_ID_PLACEHOLDER, CONFIG_FILE, CONVERSION_FILE, DISTILLATION_FILE,
                      EVALUATION_FILE, GRID_FILE, INTERPOLATION_FIGURE, MODEL_INDEX, NEIGHBOURS_FIGURE, RAW_UNET, SCHEDULER, SUMMARY_FILE, UNET,
                      is_conversion)
from .. import pipelines
from .card import build_model_card, read_json, read_yaml

logger = logging.getLogger(__name__)


# Named, not imported: importing it would import torch and diffusers, which publishing a folder does not need.
PIPELINE_FILE = Path(pipelines.__file__).with_name("ddpm_interpolation.py")
# Copied when the run has them (a folder `convert-adm` wrote has CONVERSION_FILE); those of
# PATH_BEARING_FILES with their local paths made publishable (`publishable_paths`).
RUN_FILES = (MODEL_INDEX, CONFIG_FILE, SUMMARY_FILE, EVALUATION_FILE, GRID_FILE, INTERPOLATION_FIGURE,
             NEIGHBOURS_FIGURE, CONVERSION_FILE, DISTILLATION_FILE)
PATH_BEARING_FILES = (CONFIG_FILE, EVALUATION_FILE, DISTILLATION_FILE)
COMPONENT_FOLDERS = (UNET, SCHEDULER)
# What a push of a run may upload: on the repo, those the new upload lacks are deleted (`--no_raw` after a push
# with raw weights, a run without evaluation.json); anything else there (a user's own files) is left alone.
PUBLISHED_PATTERNS = [f"{folder}/*" for folder in (*COMPONENT_FOLDERS, RAW_UNET)] + [
    *RUN_FILES, PIPELINE_FILE.name, CARD_FILE]


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
    record = read_json(source) if is_json else read_yaml(source)
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
    """A small interpolation strip (slerp, t chosen per pair; a distilled student's own t and steps) from the
    run's EMA weights."""
    from ..files import save_image
    from ..sample.interpolation import (Pair, choose_interpolation_steps, interpolate_pairs,
                                        load_interpolation_pipeline, strip)

    pipeline = load_interpolation_pipeline(str(run_dir))
    pipeline.set_progress_bar_config(disable=True)
    chosen = choose_interpolation_steps(str(run_dir), None, None, pipeline.scheduler.config.num_train_timesteps,
                                        default_t="auto", default_steps=25)
    results = interpolate_pairs(pipeline, [Pair(a, b) for a, b in seed_pairs], t=chosen.t, num_frames=6,
                                method="slerp", num_inference_steps=chosen.steps, endpoint_steps=chosen.endpoint_steps)
    save_image(strip(results), path)


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


def push_finished_run(run_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False
                      ) -> None:
    """`--push_to_hub` after training: upload the run folder; if that fails, say that the run itself is
    complete and how to push it later (RunNotPushedError, exit status 3)."""
    try:
        push_run(run_dir, repo_id, token, private)
    except HubUploadError as error:
        raise RunNotPushedError(
            f"training finished and the run is saved in {run_dir}, but it is not on the Hub: push it "
            f"later with `lsun-ddpm push {run_dir} --hub_model_id {repo_id}` ({error})"
        ) from None


def without_token(error: Exception, token: str | None) -> str:
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
            f"{without_token(error, token)}). "
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
