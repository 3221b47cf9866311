"""Opening files the agent did not write itself (or that something else could have replaced).

Why: ``open()`` on a FIFO blocks until a writer appears, and ``read()`` of a symlink to
``/dev/zero`` never ends, both while the agent holds the board lock. Every file from outside
(a bundle, a trust document) and every file in the state directory is therefore opened
non-blocking, checked to be a *regular* file with ``fstat`` (the check is made on the opened
descriptor, so nothing can be swapped in between), and read with a byte bound.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, Callable

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


__all__ = ["open_regular", "read_bounded", "NotRegularFile", "describe"]
