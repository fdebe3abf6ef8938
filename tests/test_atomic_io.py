"""atomic_io.py: a file is replaced whole or not at all, and one process at a time holds a path.

A PathLock (flock on a hidden file beside the path) names its holder and leaves nothing behind when released;
a torch.save into a full disk is an OSError naming the file (torch itself raises a RuntimeError no disk-error
handler catches), and no temp file is left.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch

from atomic_io import PathLock


def test_path_lock_names_the_holder_and_cleans_up(tmp_path):
    a, b = PathLock(tmp_path / "run"), PathLock(tmp_path / "." / "run")  # spelled differently: same lock
    assert a.acquire() is None
    assert a.file == tmp_path / ".run.lock" and not (tmp_path / "run").exists()
    assert b.acquire() == f"pid {os.getpid()} on {os.uname().nodename}"  # flock: per open file, even in-process
    a.release()
    assert not a.file.exists()  # a clean release leaves nothing behind
    assert b.acquire() is None
    b.release()


def test_disk_full_in_torch_save_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    """torch.save into a full disk raises RuntimeError, which no OSError handler catches (model.pt and
    encoder checkpoints were tracebacks); /dev/full fails every write with ENOSPC, like a full disk."""
    import atomic_io

    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic_io.os, "fdopen", lambda fd, mode: (os.close(fd), real_fdopen(
        os.open("/dev/full", os.O_WRONLY), mode))[1])
    with pytest.raises(OSError) as ei:
        atomic_io.atomic_torch_save({"w": torch.zeros(1000)}, tmp_path / "model.pt")
    assert ei.value.errno == errno.ENOSPC and ei.value.filename == str(tmp_path / "model.pt")
    assert not list(tmp_path.iterdir())  # no temp file left
