"""Emulated boards: the real device agent on real ARM kernels, under qemu-user on this machine.

``scripts/arm-board.sh`` builds an aarch64 Python 3.11 (Debian's arm64 packages) with the agent's
aarch64 wheels (numpy, cryptography, backports-zstd, onnxruntime 1.22.1, ai-edge-litert 2.1.6)
into the assets folder; its ``bin/python3`` runs it under ``qemu-aarch64-static -cpu cortex-a72``.
A fleet-file board with ``kind = "emulated-aarch64"`` is that interpreter running the agent
zipapp (copied by ``edgepack fleet bootstrap``, as onto a real board) with its own state folder;
files travel as for a local board. Install, trial (in a child process, as on a board), status,
bench, eval and rollback are the agent's own code paths.

Its outputs are the board's arithmetic (ORT's aarch64 kernels, not this host's AVX2 ones); its
timings are the emulator's. The agent reports ``latency_source: "emulator"``, skips the trial's
latency budget there, and the host never stores, budgets or compares those timings
(fleet/store.py ``figures``, push and check judgements).

```toml
[[boards]]
name = "pi-emu"
kind = "emulated-aarch64"       # transport, python, agent_path, state and incoming have defaults
target = "rpi4-2gb"
```

``edgepack.fleet.confirm.evaluate_on_board`` runs a model over inputs on such a board (or any
board) and returns its top-1 classes: the board's own figure, e.g. for ``quantize --confirm-on``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InventoryError

ENV_SWITCH = "EDGEPACK_EMULATED_BOARD"  # 0: no emulated board in the embedded default fleet
QEMU = Path("/usr/bin/qemu-aarch64-static")


@dataclass(frozen=True)
class EmulatorKind:
    """One kind of emulated board: where scripts/arm-board.sh put it and what it stands in for."""

    kind: str
    folder: str  # under the assets folder
    machine: str
    qemu: Path
    default_name: str
    default_target: str
    build_command: str

    def dir(self) -> Path:
        from ..assets import assets_dir
        return assets_dir() / self.folder

    def python(self) -> Path:
        return self.dir() / "bin" / "python3"

    def available(self) -> bool:
        return self.qemu.is_file() and os.access(self.python(), os.X_OK) and (self.dir() / ".done.json").is_file()

    def info(self) -> dict[str, Any]:
        """What the smoke check recorded (versions of Python, ORT, LiteRT, qemu)."""
        try:
            return json.loads((self.dir() / ".done.json").read_text())
        except (OSError, ValueError):
            return {}

    def missing(self) -> str:
        return (f"the {self.kind} emulator is not installed ({self.python()} or {self.qemu} missing); "
                f"run `{self.build_command}`")


KINDS: dict[str, EmulatorKind] = {
    "emulated-aarch64": EmulatorKind(kind="emulated-aarch64", folder="arm-board-v1", machine="aarch64", qemu=QEMU,
                                     default_name="rpi4-emu", default_target="rpi4-2gb",
                                     build_command="bash scripts/arm-board.sh"),
}
EMULATED_AARCH64 = "emulated-aarch64"


def emulator_kind(kind: str) -> EmulatorKind:
    k = KINDS.get(kind)
    if k is None:
        raise InventoryError(f"unknown board kind {kind!r}; known: board, {', '.join(KINDS)}")
    return k


def is_emulated(board: Any) -> bool:
    return getattr(board, "kind", "board") in KINDS


def board_from_fleet_row(d: dict[str, Any], where: str, base: Path, home: str | Path) -> dict[str, Any]:
    """Defaults and checks for a fleet-file row with ``kind = "emulated-..."`` (a dict for Board);
    ``home`` is the fleet's folder for local boards (inventory.DEFAULT_HOME)."""
    k = emulator_kind(str(d.get("kind")))
    if d.get("transport", "local") != "local":
        raise InventoryError(f"{where}: an {k.kind} board runs on this machine; drop transport = {d['transport']!r}")
    if not k.available() and not d.get("python") and not d.get("agent"):
        raise InventoryError(f"{where}: {k.missing()}")
    d = dict(d)
    d["transport"] = "local"
    d.setdefault("host", "localhost")
    d.setdefault("target", k.default_target)
    if "python" not in d:
        d["python"] = str(k.python())
    home = Path(home) / "boards" / d["name"]
    for key, rel in (("agent_path", "edgepack-agent.pyz"), ("state", "state"), ("incoming", "incoming")):
        d.setdefault(key, str(home / rel))
        p = Path(os.path.expanduser(str(d[key])))
        d[key] = str(p if p.is_absolute() else base / p)
    return d


def default_emulated_boards(home: Path, *, always: bool = False) -> list[dict[str, Any]]:
    """The emulated boards of the embedded default fleet, as Board fields: ``rpi4-emu`` when its
    emulator is built (and ``EDGEPACK_EMULATED_BOARD`` is not 0, unless ``always``)."""
    if not always and os.environ.get(ENV_SWITCH, "1").strip() in ("0", "false", "no", "off"):
        return []
    out = []
    for k in KINDS.values():
        if k.available():
            d = Path(home) / "boards" / k.default_name
            out.append(dict(name=k.default_name, host="localhost", transport="local", kind=k.kind,
                            target=k.default_target, python=str(k.python()),
                            agent_path=str(d / "edgepack-agent.pyz"), state=str(d / "state"),
                            incoming=str(d / "incoming"), groups=["emulated"]))
    return out


__all__ = ["EMULATED_AARCH64", "KINDS", "EmulatorKind", "emulator_kind", "is_emulated", "default_emulated_boards",
           "board_from_fleet_row"]
