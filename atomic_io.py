"""Atomic file writes, used by every checkpoint, dataset and result writer in the project.

A write goes to a temp file in the destination folder, is flushed and fsync'd, made readable per the umask
(mkstemp creates 0600), then os.replace'd onto the final name: a reader — or a run resumed after a kill —
sees either the old file or the complete new one, never a torn one.

Also here: `PathLock`, the exclusive lock a run directory or a dataset folder is held under while a process
writes it, and `os_error_reason`, the short reason ("no space left on device", ...) user errors quote.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a folder's entries (a rename is only durable once its folder is synced); a file's contents alike."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = False) -> Path:
    """Call write(file_object) on a temp file beside `path`, then atomically move it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed f.write names no file: name ours
            e.filename = str(path)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2, **kw: Any) -> Path:
    return atomic_write(path, lambda f: json.dump(obj, f, indent=indent, **kw))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save, atomically. Serialised in memory first: torch.save writing into a full disk raises
    RuntimeError ("PytorchStreamWriter failed writing file"), which no OSError handler catches; a plain
    write of the bytes raises the OSError (ENOSPC, EROFS, ...) the callers turn into one line."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, lambda f: f.write(buf.getbuffer()), binary=True)


# The errnos of a disk that cannot take a write (full, over quota, read-only, forbidden), with the reason user
# errors quote: one line each; any other OSError is a bug and keeps its traceback.
_DISK_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}
DISK_ERRNOS = frozenset(_DISK_REASONS)


# How libraries that write files themselves report a full or read-only disk instead of raising OSError
# (measured on a full tmpfs): torch.save "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs
# 598" or "PytorchStreamWriter failed writing file ...: file write failed" (RuntimeError), safetensors
# "I/O error: No space left on device (os error 28)" (SafetensorError). Message -> reason.
_WRITE_FAILURE_MARKERS = (("os error 28", "no space left on device"), ("No space left", "no space left on device"),
                          ("os error 122", "disk quota exceeded"), ("os error 30", "read-only file system"),
                          ("Read-only file system", "read-only file system"), ("file write failed", "write failed"),
                          ("PytorchStreamWriter failed", "write failed"), ("unexpected pos", "write failed"))


def write_failure_reason(e: BaseException) -> str | None:
    """The short reason of a failed write on a full / read-only / forbidden disk: an OSError with one of
    DISK_ERRNOS, or a library's own exception carrying one (_WRITE_FAILURE_MARKERS); None for anything else
    (a bug, which keeps its traceback)."""
    if isinstance(e, OSError):
        return os_error_reason(e) if e.errno in DISK_ERRNOS else None
    msg = str(e)
    return next((why for marker, why in _WRITE_FAILURE_MARKERS if marker in msg), None)


def os_error_reason(e: OSError) -> str:
    """A short, user-facing reason for a failed read/write ("no space left on device", ...)."""
    reasons = {**_DISK_REASONS, errno.ENOENT: "no such file or folder"}
    return reasons.get(e.errno, e.strerror or type(e).__name__)


class PathLock:
    """Exclusive lock on a run directory or dataset folder `path`, held by one process at a time.

    fcntl.flock on the hidden file <parent>/.<name>.lock beside `path` (beside, not inside: the folder may
    not exist yet, and overwrite=true empties it). The kernel drops the lock when the holder exits in any
    way (crash, SIGKILL), so a stale lock file never blocks anyone; a clean release also deletes the file.
    The holder writes "<pid> <host>" into it, so the refusal can name who holds it. A path spelled
    differently (./runs/x, an absolute path, a symlink) resolves to the same lock. flock is node-local on
    some network file systems: two launches on different machines are not protected there.
    """

    def __init__(self, path: str | os.PathLike):
        p = Path(path).expanduser().resolve()
        self.file = p.parent / f".{p.name}.lock"
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; None on success, else a description of the holder ("pid 123 on host")."""
        self.file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = os.pread(fd, 200, 0).decode(errors="replace").split()
                os.close(fd)
                return f"pid {info[0]} on {info[1]}" if len(info) >= 2 else "another process (pid not yet written)"
            # A releasing holder unlinks the file after we opened it: then we hold a lock nobody else can see;
            # retry on the file that is now there.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is None:
            return
        self.file.unlink(missing_ok=True)  # while still holding the lock: a waiter that opened it re-checks its inode
        os.close(self.fd)
        self.fd = None
