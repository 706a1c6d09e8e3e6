"""The Space: its folder as published (app.py, requirements, card, a copy of this package) and its upload."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import HubUploadError
from .upload import PIPELINE_FILE, full_repo_ids, new_folder, upload_folder_to_hub, without_token

# What a push of the Space may upload (see `prepare_space_upload`), likewise.
SPACE_PATTERNS = ["app.py", "requirements.txt", "README.md", "lsun_ddpm/*"]


def prepare_space_upload(destination: str | os.PathLike, model_id: str) -> Path:
    """Write the Space as it is published: app.py, requirements.txt, README.md (its `models`
    set to `model_id`) and a copy of the `lsun_ddpm` package that app.py imports."""
    import lsun_ddpm
    from huggingface_hub import SpaceCard

    from .. import space

    space_dir = Path(space.__file__).parent
    with new_folder(destination) as staging:
        for name in ("app.py", "requirements.txt"):
            shutil.copy2(space_dir / name, staging / name)
        card = SpaceCard.load(space_dir / "README.md")
        card.data.models = [model_id]
        card.save(staging / "README.md")
        package = staging / "lsun_ddpm"
        _copy_sources(Path(lsun_ddpm.__file__).parent, package)
        _copy_sources(PIPELINE_FILE.parent, package / "pipelines")
    return Path(destination)


def _copy_sources(source: Path, destination: Path) -> None:
    """The package's modules and templates below `source`, sub-packages included, into `destination`."""
    for file in sorted(source.rglob("*")):
        if file.suffix in (".py", ".md") and "__pycache__" not in file.parts:
            target = destination / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)


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
                             f"({without_token(error, token)}); "
                             f"set MODEL_ID={model_id} in the Space's settings") from None
    return url
