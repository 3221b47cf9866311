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

``evaluate_on_board`` runs a model over inputs on such a board (or any board) and returns its
top-1 classes: the board's own figure, e.g. for ``edgepack quantize --confirm-on BOARD``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import AgentCommandFailed, InventoryError

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


def board_from_fleet_row(d: dict[str, Any], where: str, base: Path) -> dict[str, Any]:
    """Defaults and checks for a fleet-file row with ``kind = "emulated-..."`` (a dict for Board)."""
    from .inventory import DEFAULT_HOME
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
    home = Path(DEFAULT_HOME) / "boards" / d["name"]
    for key, rel in (("agent_path", "edgepack-agent.pyz"), ("state", "state"), ("incoming", "incoming")):
        d.setdefault(key, str(home / rel))
        p = Path(os.path.expanduser(str(d[key])))
        d[key] = str(p if p.is_absolute() else base / p)
    return d


def default_emulated_boards(home: Path, *, always: bool = False) -> list[Any]:
    """The emulated boards of the embedded default fleet: ``rpi4-emu`` when its emulator is built
    (and ``EDGEPACK_EMULATED_BOARD`` is not 0, unless ``always``)."""
    from .inventory import Board
    if not always and os.environ.get(ENV_SWITCH, "1").strip() in ("0", "false", "no", "off"):
        return []
    out = []
    for k in KINDS.values():
        if k.available():
            d = Path(home) / "boards" / k.default_name
            out.append(Board(name=k.default_name, host="localhost", transport="local", kind=k.kind,
                             target=k.default_target, python=str(k.python()),
                             agent_path=str(d / "edgepack-agent.pyz"), state=str(d / "state"),
                             incoming=str(d / "incoming"), groups=["emulated"]))
    return out


# --------------------------------------------------------------------------- the board's own top-1
def _resolve(board_or_name: Any, fleet: Any) -> tuple[Any, Any]:
    from .inventory import Board, Fleet
    if isinstance(board_or_name, Board):
        return board_or_name, fleet or Fleet.default()
    fl = fleet or Fleet.default()
    name = str(board_or_name)
    try:
        return fl.board(name), fl
    except InventoryError:
        if fleet is None:  # asked for by name: the default emulated board even where the default leaves it out
            from .inventory import DEFAULT_HOME
            home = Path(os.environ.get("EDGEPACK_FLEET_HOME") or DEFAULT_HOME)
            for b in default_emulated_boards(home, always=True):
                if b.name == name:
                    return b, fl
        hint = next((f"; {k.missing()}" for k in KINDS.values() if k.default_name == name and not k.available()), "")
        raise InventoryError(f"no board named {name!r} in the fleet ({', '.join(b.name for b in fl.boards)}){hint}") from None


def _ensure_agent(t: Any, board: Any) -> None:
    """An emulated board without the agent gets the zipapp (what bootstrap copies); eval --model
    needs no initialised state."""
    if board.agent or t.size(board.agent_path) is not None:
        return
    from .agent_zipapp import build_zipapp
    with tempfile.TemporaryDirectory(prefix="edgepack-agent-") as td:
        pyz = build_zipapp(Path(td) / "edgepack-agent.pyz").path
        t.makedirs(str(Path(board.agent_path).parent))
        t.put(pyz, board.agent_path + ".part")
        t.rename(board.agent_path + ".part", board.agent_path)


def evaluate_on_board(board_or_name: Any, model_path: str | Path, inputs: Any, *, fleet: Any = None,
                      runtime: str | None = None, threads: int | None = None,
                      timeout: float | None = None) -> Any:
    """Run ``model_path`` on the board over ``inputs``; return the board's top-1 class per sample.

    ``inputs``: an array whose axis 0 enumerates samples (one more axis than the model input, or
    the model's own batch-of-one shape stacked), or ``{input_name: array}`` for several inputs.
    ``board_or_name``: a Board, or a board name in ``fleet`` (default: the embedded default fleet,
    whose emulated Raspberry Pi 4 is ``rpi4-emu``). Works for any board the fleet reaches; on an
    emulated one it is the board's arithmetic (ARM kernels) at the emulator's speed (about 1.2 s
    per EfficientNet-Lite0 image). Raises InventoryError (unknown board, emulator missing),
    AgentCommandFailed (the agent refused or the model did not run, with its message) or the
    transport's errors. The files sent are removed afterwards.
    """
    import numpy as np

    from .transport import file_sha256, open_transport
    board, fl = _resolve(board_or_name, fleet)
    if is_emulated(board) and not emulator_kind(board.kind).available() and board.python == str(
            emulator_kind(board.kind).python()):
        raise InventoryError(f"board {board.name}: {emulator_kind(board.kind).missing()}")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise InventoryError(f"model {model_path} not found")
    arrays: Mapping[str, Any] = inputs if isinstance(inputs, Mapping) else {"inputs": inputs}
    arrays = {(k if k == "inputs" or k.startswith("inputs_") else f"inputs_{k}"): np.asarray(v)
              for k, v in arrays.items()}
    n = len(next(iter(arrays.values())))
    if n == 0 or any(len(v) != n for v in arrays.values()):
        raise InventoryError("inputs: every array needs the same number (> 0) of samples on axis 0")
    with tempfile.TemporaryDirectory(prefix="edgepack-confirm-") as td:
        data = Path(td) / "inputs.npz"
        np.savez(data, **arrays)
        tag = hashlib.sha256((file_sha256(model_path) + file_sha256(data)).encode()).hexdigest()[:16]
        remote = f"{board.incoming.rstrip('/')}/confirm-{tag}"
        rmodel, rdata = f"{remote}/{'model' + model_path.suffix}", f"{remote}/inputs.npz"
        t = open_transport(board, fl)
        try:
            t.connect()
            _ensure_agent(t, board)
            t.makedirs(remote)
            t.put(model_path, rmodel)
            t.put(data, rdata)
            args = ["eval", "--model", rmodel, "--data", rdata, "--per-sample"]
            if runtime:
                args += ["--runtime", runtime]
            if threads is not None:
                args += ["--threads", str(threads)]
            res = t.agent(*args, timeout=timeout or 300.0 + 10.0 * n)
            j = res.json()
        finally:
            try:
                t.remove(rmodel)
                t.remove(rdata)
                if board.transport == "local":
                    shutil.rmtree(os.path.expanduser(remote), ignore_errors=True)
            finally:
                t.close()
    if res.rc != 0 or not j.get("ok") or not isinstance(j.get("top1"), list):
        e = j.get("error") or {}
        raise AgentCommandFailed(f"board {board.name}: eval of {model_path.name} failed (exit {res.rc}): "
                                 f"{e.get('type', 'no result')}: {str(e.get('message') or res.stderr.strip()[-300:])[:300]}", j)
    top1 = np.asarray(j["top1"], dtype=np.int64)
    if top1.shape != (n,):
        raise AgentCommandFailed(f"board {board.name}: eval returned {top1.size} predictions for {n} samples", j)
    return top1


__all__ = ["EMULATED_AARCH64", "KINDS", "EmulatorKind", "emulator_kind", "is_emulated", "default_emulated_boards",
           "board_from_fleet_row", "evaluate_on_board"]
