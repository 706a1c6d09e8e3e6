"""One training job per run folder: the lock, a second job refused without touching anything, a killed holder
leaving no stale lock, and a refused job leaving the folder as it found it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lsun_ddpm.layout import LOCK_FILE
from lsun_ddpm.train.run_lock import FolderSnapshot, RunFolderInUse, acquire_run_lock

from conftest import TINY_RUN, TRAIN_SCRIPT, offline_env, run_script_directly
from forked_process import ForkedProcess

HOLD_LOCK = """
import sys, time
from lsun_ddpm.train.run_lock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a folder)."""
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_folder_is_refused_naming_the_holder_and_its_files_stay_as_they_were(tmp_path):
    folder = tmp_path / "run"
    holder = hold_in_another_process(folder)
    try:
        (folder / "training_config.yaml").write_text("seed: 0\n")
        before = snapshot(folder)
        with pytest.raises(RunFolderInUse) as refused:
            acquire_run_lock(folder)
        record = json.loads((folder / LOCK_FILE).read_text())
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}, started {record['started']}" in message
        assert message.startswith(f"{folder} is in use by another training job") and "\n" not in message
        assert snapshot(folder) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "run"
    holder = hold_in_another_process(folder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (folder / LOCK_FILE).is_file()  # the file stays; the kernel released the lock with the process
    with acquire_run_lock(folder) as lock:
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(RunFolderInUse, match=f"pid {os.getpid()} on host"):
            acquire_run_lock(folder)  # a second descriptor, even in this process, is another holder
    assert not lock.path.exists()  # released: the file goes with the lock


def test_a_lock_file_removed_by_its_releasing_holder_is_not_the_one_locked(tmp_path, monkeypatch):
    """A job that opened the lock file just before its holder released (and unlinked) it must not take the
    unlinked file for the lock: it locks the file now at the path instead."""
    from lsun_ddpm.train import run_lock

    first = acquire_run_lock(tmp_path)
    real_flock = run_lock.fcntl.flock

    def release_first_then_lock(descriptor, operation):
        if first._descriptor is not None:
            first.release()  # between this job's open() and its flock(): the file it opened is gone
        return real_flock(descriptor, operation)

    monkeypatch.setattr(run_lock.fcntl, "flock", release_first_then_lock)
    second = acquire_run_lock(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / LOCK_FILE).is_file()  # the retry made and locked a new file at the path
    with pytest.raises(RunFolderInUse):
        acquire_run_lock(tmp_path)
    second.release()


def test_a_lock_on_a_new_folder_knows_which_folders_it_made(tmp_path):
    lock = acquire_run_lock(tmp_path / "a" / "b")
    assert lock.made_folders == [tmp_path / "a" / "b", tmp_path / "a"]
    lock.release()


def test_a_snapshot_removes_what_was_added_and_puts_back_a_rewritten_file(tmp_path):
    (tmp_path / "logs" / "old").mkdir(parents=True)
    (tmp_path / "logs" / "old" / "events.1").write_bytes(b"old events")
    (tmp_path / "training_config.yaml").write_text("seed: 0\n")
    (tmp_path / LOCK_FILE).write_text("{}")
    before = snapshot(tmp_path)
    taken = FolderSnapshot(tmp_path, ("training_config.yaml",))
    (tmp_path / "logs" / "new" / "deeper").mkdir(parents=True)
    (tmp_path / "logs" / "new" / "deeper" / "events.2").write_bytes(b"new events")
    (tmp_path / "logs" / "old" / "events.3").write_bytes(b"more")
    (tmp_path / "training_config.yaml").write_text("seed: 1\n")
    assert taken.new_checkpoints() == []
    (tmp_path / "checkpoint-3").mkdir()
    assert taken.new_checkpoints() == ["checkpoint-3"]
    taken.restore()
    assert snapshot(tmp_path) == before


def test_a_checkpoint_in_a_sub_folder_is_progress_too(tmp_path):
    """A distillation's folder holds its stages' run folders: a checkpoint there counts as one here."""
    taken = FolderSnapshot(tmp_path)
    (tmp_path / "stage-4" / "checkpoint-3" / "x").mkdir(parents=True)
    (tmp_path / "stage-4" / "checkpoint-x").mkdir()  # not a checkpoint's name
    assert taken.new_checkpoints() == [str(Path("stage-4") / "checkpoint-3")]


# ---------------------------------------------------------------- two real training jobs


@pytest.mark.slow
def test_a_second_job_on_a_live_run_is_refused_and_the_live_run_goes_on(tmp_path, image_folder):
    """A scheduler resubmits a job while the first still trains (before its first checkpoint), or a user starts
    one with --overwrite_output_dir: each second job is refused in one sentence naming the holder, moves and
    writes nothing, and the first finishes normally."""
    output_dir = tmp_path / "run"
    args = [*TINY_RUN, "--train_data_dir", str(image_folder), "--output_dir", str(output_dir),
            "--gradient_accumulation_steps", "1", "--max_train_steps", "100000", "--checkpointing_steps", "100000",
            "--logger", "tensorboard"]
    first = ForkedProcess([str(TRAIN_SCRIPT), *args], offline_env(tmp_path), tmp_path, stdout=Path(os.devnull),
                          stderr=tmp_path / "first.err")
    try:
        deadline = time.monotonic() + 240
        while "train:" not in (tmp_path / "first.err").read_text():  # training, so its logs and config exist
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.err").read_text()[-3000:]
            time.sleep(0.5)
        holder = json.loads((output_dir / LOCK_FILE).read_text())
        for second_job in (["--resume_from_checkpoint", "latest"], ["--overwrite_output_dir"]):
            before = snapshot(tmp_path)

            second = run_script_directly(tmp_path, *args, *second_job)

            assert second.returncode == 2, second.stderr[-3000:]
            assert "Traceback" not in second.stderr
            message = second.stderr.strip().splitlines()[-1]
            assert message == (f"train_unconditional.py: error: {output_dir} is in use by another training job (pid "
                               f"{holder['pid']} on host {holder['host']}, started {holder['started']}): wait for it "
                               "to end, or stop it, or give another --output_dir"), second_job
            after = snapshot(tmp_path)
            changed = {path for path in set(before) | set(after) if before.get(path) != after.get(path)}
            # only what the live run itself writes as it trains (its log and TensorBoard events) changed
            assert all(path == "first.err" or path.startswith(("run/logs/", "hf_home")) for path in changed), changed
            assert not list(tmp_path.glob("run.replaced-*"))
    finally:
        first.send_signal(signal.SIGTERM)  # the live run saves a checkpoint and exits
        first.wait(timeout=120)
    assert first.returncode == 143, (tmp_path / "first.err").read_text()[-3000:]
    assert list(output_dir.glob("checkpoint-*")) and not (output_dir / LOCK_FILE).exists()
