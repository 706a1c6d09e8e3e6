"""Hub repo ids, checked before anything is written or trained."""

from __future__ import annotations

from .errors import InputError

def check_repo_id(repo_id: str, flag: str) -> str:
    """`repo_id` if the Hub would accept it as `NAME` or `USER/NAME`; else an InputError naming `flag`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise InputError(f"{flag} {repo_id!r} is not a valid Hub repo id: {error}") from None
    return repo_id
