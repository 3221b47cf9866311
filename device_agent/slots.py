"""A/B model slots: which release each holds, whether it is complete and good, and the `current` link.

Layout under the state directory::

    slots/a/           one release: its payload files + .slot.json (written last = "complete")
    slots/b/           the other one
    current -> slots/a convenience symlink for the inference service (derived from state.json)

Which slot is active is recorded in ``state.json`` (see state.py), replaced atomically; the
slot not named there is scratch space the next install may wipe. A slot is *complete* only
when its ``.slot.json`` exists, and it is *good* only when every file matches the length and
SHA-256 recorded there (the signed hashes of the bundle it came from).

Durability (temp file, fsync, rename, directory fsync) is device_agent/durable.py's; this module
only maps a full disk to the agent's named DiskFull error. Crash injection for the tests hooks the
same boundaries (device_agent/testing.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import durable
from .agent_errors import ActiveSlotCorrupt, DiskFull, StateCorrupt
from .durable import TMP_MARK, fsync_dir, read_bounded, remove_tree
from .wire.encoding import is_hex
from .wire.manifest import PATH_RE

SLOTS = ("a", "b")
SLOT_META = ".slot.json"
HASH_CHUNK = 1 << 20
MAX_META_BYTES = 4 << 20


def _disk_full(e: durable.DiskFullError) -> DiskFull:
    return DiskFull(f"{e.strerror}; the active release is untouched: free space on the board")


def atomic_write(path: str | Path, data: bytes) -> None:
    """durable.atomic_write, with a full disk reported as the agent's DiskFull."""
    try:
        durable.atomic_write(path, data)
    except durable.DiskFullError as e:
        raise _disk_full(e) from None


def atomic_write_json(path: str | Path, obj: Any) -> None:
    try:
        durable.atomic_write_json(path, obj)
    except durable.DiskFullError as e:
        raise _disk_full(e) from None


def sha256_file(p: Path) -> tuple[int, str]:
    return durable.hash_file(p, HASH_CHUNK)


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
                    isinstance(f, dict) and isinstance(f.get("path"), str) and PATH_RE.fullmatch(f["path"])
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


__all__ = ["Slots", "SlotInfo", "SLOTS", "atomic_write", "atomic_write_json", "sha256_file"]
