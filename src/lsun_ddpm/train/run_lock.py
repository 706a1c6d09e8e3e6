"""One training job per run folder, and a refused job leaves the folder as it found it.

Job schedulers resubmit a job while the old one may still run. Two jobs in one
folder would move, overwrite or resume each other's files, so training takes
`fcntl.flock` on a file in the run folder before it reads or changes anything
there, and a second job exits at once, naming the holder. The kernel releases
the lock when its process ends, however it ends: a killed run never leaves a
stale lock behind, only a lock file that the next job takes over.

The lock file is removed when the lock is released. A job that opened it just
before checks, once it holds the lock, that the file it locked is still the
one at that path, and otherwise tries again on the new one.

A job refused for its input (exit status 2: "nothing was written") after it
took the folder, e.g. for unreadable training data found while reading the
first batches, removes what it added and puts back the config it rewrote,
unless it already saved a checkpoint: from then on its files are progress.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..errors import InputError, input_error_types
from ..files import remove_path, write_bytes
from ..layout import CHECKPOINT_PATTERN, LOCK_FILE

class RunFolderInUse(InputError):
    """Another job holds the run folder's lock."""


class RunLock:
    """The held lock of one run folder; `release()` (or the end of the process) gives it up."""

    def __init__(self, folder: Path, descriptor: int, made_folders: list[Path]):
        self.folder = folder
        self.made_folders = made_folders  # the folder and its parents that did not exist before, deepest first
        self._descriptor: int | None = descriptor

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    def release(self) -> None:
        """Remove the lock file, then unlock (in that order: see the module docstring). Idempotent."""
        if self._descriptor is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._descriptor)  # closing the last descriptor releases the flock
        self._descriptor = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def acquire_run_lock(folder: str | os.PathLike) -> RunLock:
    """Lock `folder` (made if missing) for this process; RunFolderInUse, naming the holder, if another has it.

    A refusal changes nothing in the folder: the lock file is opened, never
    written, unless this process gets the lock.
    """
    folder = Path(folder)
    made_folders = [path for path in (folder, *folder.parents) if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise RunFolderInUse(f"{folder} is in use by another training job ({holder}): wait for it to end, or "
                                 "stop it, or give another --output_dir") from None
        if _is_current_file(descriptor, path):
            break
        os.close(descriptor)  # its holder removed it on release: lock the file now at `path`
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps(holder_record()).encode())
    return RunLock(folder, descriptor, made_folders)


def holder_record() -> dict[str, object]:
    """Who holds a lock: host, process id, start time (UTC), written into the lock file."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started}


def _read_holder(descriptor: int) -> str:
    """The holder as "pid 123 on host h, started 2026-…", or what is known of it."""
    try:
        record = json.loads(os.pread(descriptor, 4096, 0) or b"{}")
        return f"pid {record['pid']} on host {record['host']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"


def _is_current_file(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False


class RunFolderClaim:
    """A training job's hold on its run folder: the lock (main process) and what to undo if it is refused.

    Enter it before anything reads or changes the folder; every process of a
    launch refuses together when another job holds it. On leaving with an
    input error, the main process undoes the job's files (see the module
    docstring) and removes the folders the lock made, when empty.
    """

    def __init__(self, accelerator: Accelerator, folder: str | os.PathLike, restored_files: tuple[str, ...] = ()):
        self.accelerator = accelerator
        self.folder = Path(folder)
        self.restored_files = restored_files  # files a job rewrites in place (the run's config)
        self.lock: RunLock | None = None
        self.snapshot: FolderSnapshot | None = None

    def __enter__(self) -> RunFolderClaim:
        refusal = None
        if self.accelerator.is_main_process:
            try:
                self.lock = acquire_run_lock(self.folder)
                self.snapshot = FolderSnapshot(self.folder, self.restored_files)
            except RunFolderInUse as error:
                refusal = str(error)
        (refusal,) = broadcast_object_list([refusal])  # the main process's answer, on every process
        if refusal is not None:
            raise RunFolderInUse(refusal)
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if self.lock is None:
            return
        refused = error_type is not None and issubclass(error_type, input_error_types())
        if refused and not self.snapshot.new_checkpoints():
            self.snapshot.restore()
        self.lock.release()
        if refused:
            for folder in self.lock.made_folders:
                if any(folder.iterdir()):
                    break
                folder.rmdir()


class FolderSnapshot:
    """The paths a folder holds (its lock file aside) and the bytes of `restored_files`, to put it back."""

    def __init__(self, folder: Path, restored_files: tuple[str, ...] = ()):
        self.folder = folder
        self.paths = set(_relative_paths(folder))
        self.contents = {name: (folder / name).read_bytes() for name in restored_files if (folder / name).is_file()}

    def new_checkpoints(self) -> list[str]:
        """Checkpoint folders made since the snapshot, at any depth (a distillation's are in its stages' folders)."""
        return [path for path in _relative_paths(self.folder) - self.paths
                if CHECKPOINT_PATTERN.match(os.path.basename(path))]

    def restore(self) -> None:
        """Remove every file and folder added since the snapshot; put back the saved files' bytes."""
        for path in sorted(_relative_paths(self.folder) - self.paths, reverse=True):  # a folder after its files
            remove_path(self.folder / path)
        for name, content in self.contents.items():
            if (self.folder / name).read_bytes() != content:
                write_bytes(content, self.folder / name)


def _relative_paths(folder: Path) -> set[str]:
    """Every file and folder below `folder` as a relative path, without following links; the lock file aside."""
    found = set()
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            found.add(os.path.relpath(os.path.join(root, name), folder))
    found.discard(LOCK_FILE)
    return found
