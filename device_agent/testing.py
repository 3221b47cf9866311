"""Crash injection for the power-loss tests, kept out of the agent's own modules.

Every durability boundary calls ``durable.boundary``. With ``EDGEPACK_AGENT_CRASH_AT=N`` the
process SIGKILLs itself at the N-th boundary of an install; an audit hook also turns every
write-open, rename, unlink, mkdir and rmdir made by *any* module (including the bundle
extractor) into a boundary, so the test reaches every step of the transaction without the
extractor knowing about it. ``EDGEPACK_AGENT_BOUNDARY_LOG=FILE`` records the labels seen.
Nothing here runs unless one of those variables is set.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import sys

from . import durable

_crash_at = 0
_count = 0
_armed = False
_labels: list[str] = []
_log_path: str | None = None
_hook_installed = False
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _boundary(label: str) -> None:
    global _count
    if not _armed:
        return
    _count += 1
    if _log_path:
        _labels.append(label)
    if _count == _crash_at:
        os.kill(os.getpid(), signal.SIGKILL)


def _audit(event: str, args: tuple) -> None:
    if not _armed:
        return
    if event == "open":
        path, mode, flags = (list(args) + [None, None, None])[:3]
        if not isinstance(path, (str, bytes)):
            return
        if isinstance(mode, str):
            if not any(c in mode for c in "wax+"):
                return
        elif not (isinstance(flags, int) and flags & _WRITE_FLAGS):
            return
        _boundary(f"open-w {os.path.basename(os.fsdecode(path))}")
    elif event in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.truncate"):
        _boundary(f"{event} {os.path.basename(os.fsdecode(args[0])) if isinstance(args[0], (str, bytes)) else ''}")


def _dump_log() -> None:
    if _log_path:
        with open(_log_path, "w") as f:
            json.dump({"count": _count, "labels": _labels}, f)


def requested() -> bool:
    return bool(os.environ.get("EDGEPACK_AGENT_CRASH_AT") or os.environ.get("EDGEPACK_AGENT_BOUNDARY_LOG"))


def arm_crash_injection() -> None:
    """Start counting boundaries if the test environment asks for it (no-op otherwise)."""
    global _crash_at, _armed, _log_path, _hook_installed
    if not requested():
        return
    _crash_at = int(os.environ.get("EDGEPACK_AGENT_CRASH_AT") or 0)
    _log_path = os.environ.get("EDGEPACK_AGENT_BOUNDARY_LOG")
    if not _hook_installed:
        sys.addaudithook(_audit)  # cannot be removed: only ever installed under test
        atexit.register(_dump_log)
        _hook_installed = True
    durable.set_boundary_hook(_boundary)
    _armed = True


def disarm_crash_injection() -> None:
    global _armed
    _armed = False
    durable.set_boundary_hook(None)


__all__ = ["arm_crash_injection", "disarm_crash_injection", "requested"]
