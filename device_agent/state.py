"""The board's persistent state: board.json (configuration) and state.json (what is installed).

``state.json`` is the single commit point of the agent: the active slot, the slot kept for
rollback, a pending trial, the anti-rollback counter, the persisted trust root and a bounded
history all live in one file that is only ever replaced atomically (slots.atomic_write). So a
crash leaves either the old or the new state, never a mix, and there is no second file that
could disagree with it.

Fields of state.json (version 1)::

    active      "a" | "b" | null     slot the board runs
    previous    "a" | "b" | null     slot kept for rollback (hash-verified before use)
    trial       null | {slot, release, previous, started}   uncommitted switch: rolled back on restart
    writing     null | "a" | "b"     slot being (re)written: scratch until it is switched to
    counter     int                  anti-rollback: highest committed release; only moves forward
    trust       {root, release_keys, release_keys_floor}    trust documents after embedded updates
    history     [{time, event, ...}] last HISTORY_MAX events
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .agent_errors import NotInitialized, StateCorrupt, UsageError
from .slots import atomic_write_json

STATE_FORMAT = "edgepack-agent-state"
BOARD_FORMAT = "edgepack-agent-board"
HISTORY_MAX = 200
ENV_STATE = "EDGEPACK_AGENT_STATE"
RUNTIMES = ("onnxruntime", "litert", "openvino")


def now_utc() -> _dt.datetime:
    """The agent's clock; EDGEPACK_AGENT_NOW (ISO 8601) simulates a board's clock in tests."""
    s = os.environ.get("EDGEPACK_AGENT_NOW")
    if s:
        t = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)
    return _dt.datetime.now(_dt.timezone.utc)


def iso(t: _dt.datetime | None = None) -> str:
    return (t or now_utc()).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class BoardConfig:
    """What the board is and what it may spend. Written once by ``edgepack-agent init``."""

    target: str
    ram_budget_mb: float = 512.0
    storage_mb: float = 1024.0
    threads: int = 0  # 0: runtime default
    runtimes: list[str] = field(default_factory=lambda: ["onnxruntime"])  # preference order
    accelerator: str | None = None  # EP / delegate name the board must use (e.g. CUDAExecutionProvider)
    latency_budget_ms: float | None = None  # p90 over the trial runs; None: not checked
    trial_runs: int = 10
    trial_in_process: bool = False  # True: no child process for the trial (faster; a runtime crash kills the agent)

    def to_json(self) -> dict[str, Any]:
        return {"format": BOARD_FORMAT, "version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, d: Any) -> "BoardConfig":
        if not isinstance(d, dict) or d.get("format") != BOARD_FORMAT:
            raise UsageError("board.json is not an edgepack-agent board config; re-run `edgepack-agent init`")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        try:
            cfg = cls(**known)
        except TypeError as e:
            raise UsageError(f"board.json: {e}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not self.target:
            raise UsageError("board config needs a target name (--target)")
        bad = [r for r in self.runtimes if r not in RUNTIMES]
        if bad or not self.runtimes:
            raise UsageError(f"unknown runtime(s) {bad}; choose from {', '.join(RUNTIMES)}")
        if self.ram_budget_mb <= 0 or self.storage_mb <= 0 or self.threads < 0 or self.trial_runs < 1:
            raise UsageError("RAM/storage budgets must be > 0, threads >= 0, trial runs >= 1")


@dataclass
class AgentState:
    active: str | None = None
    previous: str | None = None
    trial: dict[str, Any] | None = None
    writing: str | None = None
    counter: int = 0
    trust: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, d: Any) -> "AgentState":
        if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
            raise StateCorrupt("state.json is not an edgepack-agent state file")
        try:
            st = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as e:
            raise StateCorrupt(f"state.json: {e}") from None
        for s in (st.active, st.previous, st.writing):
            if s not in (None, "a", "b"):
                raise StateCorrupt(f"state.json names slot {s!r}")
        if not isinstance(st.counter, int) or st.counter < 0:
            raise StateCorrupt("state.json anti-rollback counter is not a non-negative integer")
        return st

    def log(self, event: str, **kw: Any) -> None:
        self.history.append({"time": iso(), "event": event, **kw})
        del self.history[:-HISTORY_MAX]


class StateDir:
    """One board's state directory (several simulated boards can share a machine)."""

    def __init__(self, path: str | Path | None):
        p = path or os.environ.get(ENV_STATE)
        if not p:
            raise UsageError(f"no state directory: pass --state DIR or set {ENV_STATE}")
        self.path = Path(p)
        self.board_file = self.path / "board.json"
        self.state_file = self.path / "state.json"

    def exists(self) -> bool:
        return self.state_file.exists() and self.board_file.exists()

    def board(self) -> BoardConfig:
        try:
            return BoardConfig.from_json(json.loads(self.board_file.read_text()))
        except FileNotFoundError:
            raise NotInitialized(f"{self.path} is not an agent state dir (no board.json); "
                                 "run `edgepack-agent init --state DIR --target NAME --trust-root ROOT.json`") from None
        except ValueError as e:
            raise UsageError(f"board.json is not valid JSON ({e})") from None

    def load(self) -> AgentState:
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            raise NotInitialized(f"{self.path} has no state.json; run `edgepack-agent init` first") from None
        try:
            return AgentState.from_json(json.loads(text))
        except ValueError as e:
            raise StateCorrupt(f"state.json does not parse ({e}); it is only ever replaced atomically, "
                               "so the storage itself is failing") from None

    def save(self, st: AgentState) -> None:
        atomic_write_json(self.state_file, st.to_json())

    def save_board(self, cfg: BoardConfig) -> None:
        cfg.validate()
        atomic_write_json(self.board_file, cfg.to_json())


__all__ = ["BoardConfig", "AgentState", "StateDir", "ENV_STATE", "RUNTIMES", "now_utc", "iso"]
