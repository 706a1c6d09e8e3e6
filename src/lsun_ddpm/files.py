"""Files the user keeps, written whole or not at all; output paths checked before any work.

Everything is written to a temporary sibling first and moved into place with
`os.replace`, so an interrupted save never leaves a half-written file or
folder where a complete one stood.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from PIL import Image

from .errors import InputError

def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for piece in iter(lambda: file.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def replace_path(source: Path, destination: Path) -> None:
    """Move `source` onto `destination`, replacing a file or a whole folder.

    A folder cannot be replaced in one rename when the destination exists, so
    the old one is first renamed aside and deleted only after the new one is
    in place: at every moment a complete copy exists under some name.
    """
    if destination.is_dir() and not destination.is_symlink():
        aside = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, aside)
        os.replace(source, destination)
        shutil.rmtree(aside)
    else:
        os.replace(source, destination)


def image_format(path: str | os.PathLike) -> str | None:
    """The PIL format that `path`'s extension stands for, if PIL can write it (".jpg" → "JPEG"), else None."""
    name = Image.registered_extensions().get(Path(path).suffix.lower())
    return name if name in Image.SAVE else None


def check_image_output(path: str | os.PathLike, flag: str) -> Path:
    """`path` as a Path if an image can be written there; else an InputError naming `flag`.

    Checked before any work, so a run never samples for minutes and then
    fails on the file name.
    """
    path = Path(path)
    if image_format(path) is None:
        raise InputError(f"{flag} {str(path)!r} does not end in an image format PIL can write: "
                         "end it in .png, .jpg, .webp or another image extension")
    if path.is_dir():
        raise InputError(f"{flag} {str(path)!r} is a folder: give a file name such as {str(path / 'out.png')!r}")
    check_output_folder(path.parent, flag)
    return path


def check_output_folder(folder: str | os.PathLike, flag: str) -> Path:
    """`folder` as a Path if files can be made in it (it may not exist yet); else an InputError naming `flag`."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise InputError(f"{flag}: {str(existing)!r} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag}: cannot write into {str(existing)!r} (permission denied); choose another path")
    return folder


def save_image(image: Image.Image, path: str | os.PathLike) -> None:
    """Write `image` in the format of `path`'s extension (see `check_image_output`), atomically."""
    path = Path(path)
    image_type = image_format(path)
    if image_type is None:
        raise InputError(f"{str(path)!r} does not end in an image format PIL can write (e.g. .png)")
    with staged(path) as staging:
        image.save(staging, format=image_type)


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file under a temporary name and move it into place."""
    with staged(path) as staging:
        staging.write_text(text)


def write_bytes(content: bytes, path: str | os.PathLike) -> None:
    """Write a file's bytes under a temporary name and move them into place."""
    with staged(path) as staging:
        staging.write_bytes(content)


@contextlib.contextmanager
def staged(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` to write into (a file, or a folder the block makes); moved onto `path`
    when the block ends without an error, and deleted when it does not.

    The name carries the process id: processes writing the same file never share a temporary one. One left
    by a killed process that had the same id is deleted first. `os.replace` puts a folder in place only
    where `path` is missing or an empty folder: it never replaces one holding files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    remove_path(staging)
    try:
        yield staging
        os.replace(staging, path)
    finally:
        remove_path(staging)


def remove_path(path: Path) -> None:
    """Delete the file or folder `path`, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
