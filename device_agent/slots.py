"""A/B model slots and the durability primitives every agent write goes through.

Layout under the state directory::

    slots/a/           one release: its payload files + .slot.json (written last = "complete")
    slots/b/           the other one
    current -> slots/a convenience symlink for the inference service (derived from state.json)

Which slot is active is recorded in ``state.json`` (see state.py), replaced atomically; the
slot not named there is scratch space the next install may wipe. A slot is *complete* only
when its ``.slot.json`` exists, and it is *good* only when every file matches the length and
SHA-256 recorded there (the signed hashes of the bundle it came from).

Durability discipline (why each step): data is written to a temp name, flushed and fsynced
(so the bytes are on disk before any name points at them), renamed over the target (atomic on
POSIX), and the directory is fsynced (so the rename itself survives power loss).

Crash injection: every durability boundary calls :func:`boundary`. With
``EDGEPACK_AGENT_CRASH_AT=N`` the process SIGKILLs itself at the N-th boundary of an install;
an audit hook also turns every write-open, rename, unlink, mkdir and rmdir made by *any*
module (including the bundle extractor) into a boundary, so the test reaches every step of
the transaction without the extractor knowing about it.
"""
from __future__ import annotations

import atexit
import errno
import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._internal.encoding import hash_file, is_hex
from ._internal.files import read_bounded
from ._internal.manifest import _PATH_RE
from .agent_errors import ActiveSlotCorrupt, DiskFull, StateCorrupt

SLOTS = ("a", "b")
SLOT_META = ".slot.json"
WRITE_CHUNK = 4096  # small on purpose: one crash boundary per chunk of agent-written files
HASH_CHUNK = 1 << 20
TMP_MARK = ".tmp-"
MAX_META_BYTES = 4 << 20

# --------------------------------------------------------------------------- crash injection
_crash_at = 0
_count = 0
_armed = False
_labels: list[str] = []
_log_path: str | None = None
_hook_installed = False
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def boundary(label: str) -> None:
    """Mark a durability boundary; with crash injection armed, maybe die right here."""
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
        boundary(f"open-w {os.path.basename(os.fsdecode(path))}")
    elif event in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.truncate"):
        boundary(f"{event} {os.path.basename(os.fsdecode(args[0])) if isinstance(args[0], (str, bytes)) else ''}")


def _dump_log() -> None:
    if _log_path:
        with open(_log_path, "w") as f:
            json.dump({"count": _count, "labels": _labels}, f)


def arm_crash_injection() -> None:
    """Start counting boundaries if the test environment asks for it (no-op otherwise)."""
    global _crash_at, _armed, _log_path, _hook_installed
    crash = os.environ.get("EDGEPACK_AGENT_CRASH_AT")
    log = os.environ.get("EDGEPACK_AGENT_BOUNDARY_LOG")
    if not crash and not log:
        return
    _crash_at = int(crash or 0)
    _log_path = log
    if not _hook_installed:
        sys.addaudithook(_audit)  # cannot be removed: only ever installed under test
        atexit.register(_dump_log)
        _hook_installed = True
    _armed = True


def disarm_crash_injection() -> None:
    global _armed
    _armed = False


# --------------------------------------------------------------------------- durable writes
def fsync_dir(d: str | Path) -> None:
    """fsync a directory so the names created/renamed in it survive power loss."""
    fd = os.open(d, os.O_RDONLY)
    try:
        boundary(f"fsync-dir {Path(d).name}")
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(e: OSError, what: str) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full while writing {what}; the active release is untouched: free space on the board")
    return e


def atomic_write(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: temp file, chunked writes, fsync, rename, fsync dir."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for i in range(0, max(len(data), 1), WRITE_CHUNK):
                f.write(data[i:i + WRITE_CHUNK])
                f.flush()
                boundary(f"write {path.name}[{i // WRITE_CHUNK}]")
            boundary(f"fsync {path.name}")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise _disk_full(e, str(path)) from None
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n")


def remove_tree(p: Path) -> None:
    """Delete a directory tree, then fsync its parent so the deletion is durable."""
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)
    else:
        return
    fsync_dir(p.parent)


def sha256_file(p: Path) -> tuple[int, str]:
    return hash_file(p, HASH_CHUNK)


# --------------------------------------------------------------------------- slots
@dataclass(frozen=True)
class SlotInfo:
    """What a complete slot holds (read from its .slot.json)."""

    name: str
    dir: Path
    release: int
    version: str
    model: str
    content_sha256: str
    manifest_sha256: str
    files: tuple[dict[str, Any], ...]
    settings: dict[str, Any]

    def file(self, role: str) -> Path | None:
        f = next((x for x in self.files if x["role"] == role), None)
        return self.dir / f["path"] if f else None

    @property
    def model_path(self) -> Path:
        """The model file: settings' "model" if it names one, else the first file with role model."""
        name = self.settings.get("model")
        if isinstance(name, str) and any(f["path"] == name for f in self.files):
            return self.dir / name
        p = self.file("model")
        if p is None:
            raise ActiveSlotCorrupt(f"slot {self.name} holds no model file")
        return p

    def to_json(self) -> dict[str, Any]:
        return {"slot": self.name, "release": self.release, "version": self.version, "model": self.model,
                "content_sha256": self.content_sha256, "manifest_sha256": self.manifest_sha256,
                "model_file": self.model_path.name}


class Slots:
    """The two slots of one state directory."""

    def __init__(self, state_dir: Path):
        self.root = Path(state_dir) / "slots"
        self.current_link = Path(state_dir) / "current"

    def dir(self, name: str) -> Path:
        if name not in SLOTS:
            raise ValueError(f"slot {name!r}")
        return self.root / name

    @staticmethod
    def other(name: str | None) -> str:
        return "b" if name == "a" else "a"

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def info(self, name: str) -> SlotInfo | None:
        """The slot's metadata if it is complete (no hashing); None for an empty/partial slot."""
        meta = self.dir(name) / SLOT_META
        try:
            d = json.loads(read_bounded(meta, MAX_META_BYTES, follow_symlinks=False).decode("utf-8"))
            files = d["files"]
            if not (isinstance(files, list) and files and all(
                    isinstance(f, dict) and isinstance(f.get("path"), str) and _PATH_RE.fullmatch(f["path"])
                    and isinstance(f.get("role"), str) and isinstance(f.get("length"), int)
                    and not isinstance(f.get("length"), bool) and is_hex(f.get("sha256"), 64) for f in files)):
                return None  # a .slot.json that is not ours: the slot is not complete
            if not isinstance(d["release"], int) or isinstance(d["release"], bool) or d["release"] < 0:
                return None
            settings = d.get("settings") or {}
            return SlotInfo(name=name, dir=self.dir(name), release=d["release"], version=str(d["version"]),
                            model=str(d["model"]), content_sha256=str(d["content_sha256"]),
                            manifest_sha256=str(d["manifest_sha256"]), files=tuple(files),
                            settings=dict(settings) if isinstance(settings, dict) else {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None

    def verify(self, name: str, deep: bool = True) -> SlotInfo:
        """The slot's info after checking every file's length (and, if deep, SHA-256).

        Raises ActiveSlotCorrupt naming the first bad file: a bit flip, a truncated file or a
        deleted one all make a slot unusable.
        """
        info = self.info(name)
        if info is None:
            raise ActiveSlotCorrupt(f"slot {name} holds no complete release (missing or unreadable {SLOT_META})")
        for f in info.files:
            p = info.dir / f["path"]
            try:
                if deep:
                    n, h = sha256_file(p)
                else:
                    n, h = p.stat().st_size, f["sha256"]
            except OSError:
                raise ActiveSlotCorrupt(f"slot {name}: file {f['path']} is missing") from None
            if n != f["length"] or h != f["sha256"]:
                raise ActiveSlotCorrupt(f"slot {name}: file {f['path']} does not match its signed hash "
                                        f"(release {info.release}); the slot is corrupt")
        return info

    def is_good(self, name: str | None) -> bool:
        if name is None:
            return False
        try:
            self.verify(name)
            return True
        except ActiveSlotCorrupt:
            return False

    def write_meta(self, name: str, meta: dict[str, Any]) -> None:
        atomic_write_json(self.dir(name) / SLOT_META, meta)

    def wipe(self, name: str) -> None:
        """Empty a slot (meta first, so a crash mid-wipe leaves an *incomplete* slot, never a wrong one)."""
        d = self.dir(name)
        meta = d / SLOT_META
        if meta.exists():
            meta.unlink()
            fsync_dir(d)
        remove_tree(d)

    def point_current(self, name: str | None) -> None:
        """Repoint the ``current`` symlink atomically (symlink to temp name, rename over)."""
        link = self.current_link
        if name is None:
            if link.is_symlink():
                link.unlink()
            return
        want = os.path.join("slots", name)
        try:
            if os.readlink(link) == want:
                return
        except OSError:
            if os.path.lexists(link) and not link.is_symlink():
                raise StateCorrupt(f"{link} is not a symlink (a directory or file took its place); "
                                   "run `edgepack-agent recover` to repair it") from None
        tmp = link.with_name(f"current{TMP_MARK}{os.getpid()}")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(want, tmp)
        os.replace(tmp, link)
        fsync_dir(link.parent)

    def clean_partials(self) -> list[str]:
        """Remove staging dirs and temp files a crash left behind. Returns what was removed."""
        removed = []
        for name in SLOTS:
            d = self.dir(name)
            if not d.is_dir():
                continue
            for p in d.iterdir():
                if p.name.startswith(".edgepack-partial-") or TMP_MARK in p.name:
                    remove_tree(p)
                    removed.append(str(p.relative_to(self.root.parent)))
        parent = self.root.parent
        for p in parent.iterdir():
            if TMP_MARK in p.name:
                remove_tree(p)
                removed.append(p.name)
        return removed


__all__ = ["Slots", "SlotInfo", "SLOTS", "atomic_write", "atomic_write_json", "fsync_dir", "boundary",
           "arm_crash_injection", "disarm_crash_injection", "sha256_file", "remove_tree"]
