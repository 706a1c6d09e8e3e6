"""Uploading a run's pipeline folder to the Hugging Face Hub."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

# What stays local: resumable state, logs and staging folders.
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "logs/**", ".*", ".*/**"]


class HubUploadError(RuntimeError):
    """The upload failed; the local folder is untouched."""


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload DDPM pipeline",
) -> str:
    """Create (if needed) the model repo `repo_id` and upload `folder` to it.

    Authentication is huggingface_hub's: `token`, else HF_TOKEN, else the login
    cache. The token never appears in messages. Returns the commit URL.
    """
    from huggingface_hub import create_repo, upload_folder

    try:
        repo = create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        commit = upload_folder(
            repo_id=repo.repo_id,
            folder_path=str(folder),
            token=token,
            commit_message=commit_message,
            ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        )
    except Exception as error:
        message = str(error).replace(token, "***") if token else str(error)
        raise HubUploadError(
            f"could not upload {folder} to the Hub repo {repo_id!r} ({type(error).__name__}: {message}). "
            "The local folder is unchanged; check the network and `hf auth login` (or HF_TOKEN) and push again."
        ) from None
    logger.info("uploaded %s to %s", folder, commit.commit_url)
    return commit.commit_url
