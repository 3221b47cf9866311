"""Durable files, bounded reads, file hashes and the clock: the one module every write goes through.

Used by the board (slots, state, pull) and by the host (keys, bundles, stores): there is no
second copy of temp-file + fsync + rename, of directory fsync, of file hashing or of "now".

Writing (why each step): data is written to a temp name, flushed and fsynced (so the bytes are
on disk before any name points at them), renamed over the target (atomic on POSIX), and the
directory is fsynced (so the rename itself survives power loss). Every such step calls
:func:`boundary`, a no-op unless a test arms crash injection (device_agent/testing.py).

Reading files the agent did not write itself (or that something else could have replaced):

Why: ``open()`` on a FIFO blocks until a writer appears, and ``read()`` of a symlink to
``/dev/zero`` never ends, both while the agent holds the board lock. Every file from outside
(a bundle, a trust document) and every file in the state directory is therefore opened
non-blocking, checked to be a *regular* file with ``fstat`` (the check is made on the opened
descriptor, so nothing can be swapped in between), and read with a byte bound.
"""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable

Err = Callable[[str], Exception]


class NotRegularFile(OSError):
    """The path is a FIFO, device, socket or directory: refused before any read."""


def open_regular(path: str | Path, *, follow_symlinks: bool = True) -> BinaryIO:
    """Open ``path`` for reading, refusing anything but a regular file. Never blocks on a FIFO.

    Raises ``FileNotFoundError`` (absent), ``NotRegularFile`` or another ``OSError``.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if not follow_symlinks and e.errno == getattr(os, "ELOOP", -1):
            raise NotRegularFile(e.errno, f"{path} is a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
            raise NotRegularFile(0, f"{path} is {kind}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | Path, limit: int, *, follow_symlinks: bool = True) -> bytes:
    """All bytes of a regular file of at most ``limit`` bytes (``ValueError`` if longer)."""
    with open_regular(path, follow_symlinks=follow_symlinks) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data


def describe(e: BaseException) -> str:
    """A short reason for a refused read, for one-line error messages."""
    if isinstance(e, NotRegularFile):
        return e.strerror or str(e)
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return str(e)


def hash_file(path: str | Path, chunk: int = 1 << 20) -> tuple[int, str]:
    """(length, SHA-256 hex) of a file, read in bounded chunks: the one file hash of edgepack.

    Only regular files are read (a FIFO or device in a slot raises ``OSError``, never hangs)."""
    h = hashlib.sha256()
    n = 0
    with open_regular(path) as f:
        while b := f.read(chunk):
            h.update(b)
            n += len(b)
    return n, h.hexdigest()


def sha256_of_file(path: str | Path) -> str:
    return hash_file(path)[1]


# --------------------------------------------------------------------------- the clock
def utc_now() -> _dt.datetime:
    """Wall-clock UTC now: what the host stamps into bundles and documents."""
    return _dt.datetime.now(_dt.timezone.utc)


def board_now() -> _dt.datetime:
    """The board's clock: UTC now, or EDGEPACK_AGENT_NOW (ISO 8601) to simulate a board's clock."""
    s = os.environ.get("EDGEPACK_AGENT_NOW")
    if s:
        t = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)
    return utc_now()


def iso(t: _dt.datetime | None = None) -> str:
    """A UTC time as ``YYYY-MM-DDTHH:MM:SSZ`` (the board's clock when ``t`` is None)."""
    return (t or board_now()).astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- durable writes
WRITE_CHUNK = 4096  # small on purpose: one crash boundary per chunk of agent-written files
TMP_MARK = ".tmp-"
_hook: Callable[[str], None] | None = None


def boundary(label: str) -> None:
    """Mark a durability boundary (crash injection may kill the process here under test)."""
    if _hook is not None:
        _hook(label)


def set_boundary_hook(hook: Callable[[str], None] | None) -> None:
    """Install the crash-injection hook (device_agent/testing.py); None removes it."""
    global _hook
    _hook = hook


class DiskFullError(OSError):
    """No space (ENOSPC/EDQUOT) while writing; the caller maps it to its own named error."""


def fsync_dir(d: str | Path) -> None:
    """fsync a directory so the names created/renamed in it survive power loss."""
    fd = os.open(d, os.O_RDONLY)
    try:
        boundary(f"fsync-dir {Path(d).name}")
        os.fsync(fd)
    finally:
        os.close(fd)


def _cleanup(tmp: Path) -> None:
    try:
        tmp.unlink()
    except OSError:
        pass


def _write_error(e: OSError, what: str) -> OSError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(e.errno, f"disk full while writing {what}")
    return e


def atomic_write(path: str | Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically: temp file, chunked writes, fsync, rename, fsync dir.

    ``mode`` (e.g. 0o600 for a private key) is set on the temp file before any byte is written.
    Raises DiskFullError when the disk is full; the old file is then untouched."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            for i in range(0, max(len(data), 1), WRITE_CHUNK):
                f.write(data[i:i + WRITE_CHUNK])
                f.flush()
                boundary(f"write {path.name}[{i // WRITE_CHUNK}]")
    except OSError as e:
        _cleanup(tmp)
        raise _write_error(e, str(path)) from None
    commit_file(tmp, path)  # the same fsync / rename / fsync-dir tail as the streaming writers


def write_new(path: str | Path, data: bytes, *, mode: int = 0o600) -> None:
    """Create ``path`` with ``data`` (a private key: never overwrite one). FileExistsError if it exists.

    Created exclusively with ``mode`` (umask cannot widen it), fsynced, then its directory fsynced."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        boundary(f"fsync {path.name}")
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n")


def commit_file(tmp: str | Path, path: str | Path) -> None:
    """Make an already-written temp file durable under its final name: fsync, rename, fsync dir.

    For writers that stream (bundles, models): they write ``tmp`` themselves, then call this."""
    tmp, path = Path(tmp), Path(path)
    try:
        with open(tmp, "rb+") as f:
            boundary(f"fsync {path.name}")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _cleanup(tmp)
        raise _write_error(e, str(path)) from None
    fsync_dir(path.parent)


def temp_path(path: str | Path) -> Path:
    """The temp name a streaming writer uses next to ``path`` (removed on failure by commit_file)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def remove_tree(p: Path) -> None:
    """Delete a directory tree (or file), then fsync its parent so the deletion is durable."""
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)
    else:
        return
    fsync_dir(p.parent)


__all__ = ["open_regular", "read_bounded", "NotRegularFile", "describe", "hash_file", "sha256_of_file",
           "utc_now", "board_now", "iso", "boundary", "set_boundary_hook", "DiskFullError", "fsync_dir",
           "atomic_write", "atomic_write_json", "write_new", "commit_file", "temp_path", "remove_tree"]
