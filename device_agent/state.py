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

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .durable import describe, iso, read_bounded
from .agent_errors import NotInitialized, StateCorrupt, UsageError
from .slots import atomic_write_json

STATE_FORMAT = "edgepack-agent-state"
BOARD_FORMAT = "edgepack-agent-board"
HISTORY_MAX = 200
ENV_STATE = "EDGEPACK_AGENT_STATE"
RUNTIMES = ("onnxruntime", "litert", "openvino")
MAX_STATE_BYTES = 4 << 20  # state.json / board.json are a few KB; anything bigger is not ours


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


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
    # --- board policy a bundle cannot override (docs/security.md) ---
    max_release_step: int = 1000  # a bundle's release may exceed the counter by at most this much
    accelerators: list[str] = field(default_factory=list)  # extra EPs / delegates a bundle may ask for
    health_floors: dict[str, float] = field(default_factory=dict)  # loosest thresholds a bundle may set
    trial_cpu_s: int = 600  # RLIMIT_CPU of the trial process
    trial_max_files: int = 256  # RLIMIT_NOFILE of the trial process

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
        def num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def integer(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(self.target, str) or not self.target:
            raise UsageError("board config needs a target name (--target)")
        if not (num(self.ram_budget_mb) and num(self.storage_mb) and integer(self.threads)
                and integer(self.trial_runs) and integer(self.max_release_step) and integer(self.trial_cpu_s)
                and integer(self.trial_max_files) and isinstance(self.trial_in_process, bool)
                and (self.latency_budget_ms is None or num(self.latency_budget_ms))
                and (self.accelerator is None or isinstance(self.accelerator, str))
                and isinstance(self.runtimes, list) and all(isinstance(r, str) for r in self.runtimes)
                and isinstance(self.accelerators, list) and all(isinstance(a, str) for a in self.accelerators)
                and isinstance(self.health_floors, dict)
                and all(isinstance(k, str) and num(v) for k, v in self.health_floors.items())):
            raise UsageError("board.json has a field of the wrong type (numbers must be finite); "
                             "re-run `edgepack-agent init --force` or fix the file")
        if self.max_release_step < 1 or self.trial_cpu_s < 1 or self.trial_max_files < 16:
            raise UsageError("max_release_step must be >= 1, trial_cpu_s >= 1, trial_max_files >= 16")
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
    counter_reset_version: int = 0  # highest root-signed counter reset applied (replay protection)

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
        st.check()
        return st

    def check(self) -> None:
        """Every field has the type the agent relies on; anything else is StateCorrupt (exit 3),
        never an internal error: `edgepack-agent recover` rebuilds from the verifiable slots."""
        def integer(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**63 - 1

        fix = "; run `edgepack-agent recover` to rebuild it from the slots"
        for s in (self.active, self.previous, self.writing):
            if s not in (None, "a", "b"):
                raise StateCorrupt(f"state.json names slot {str(s)[:20]!r}{fix}")
        if not integer(self.counter) or not integer(self.counter_reset_version):
            raise StateCorrupt(f"state.json anti-rollback counter is not a non-negative integer{fix}")
        if self.trial is not None:
            t = self.trial
            if not (isinstance(t, dict) and t.get("slot") in ("a", "b") and t.get("previous") in (None, "a", "b")
                    and (t.get("release") is None or integer(t.get("release")))):
                raise StateCorrupt(f"state.json 'trial' is not {{slot, release, previous}}{fix}")
        if not isinstance(self.trust, dict) or (self.trust and not isinstance(self.trust.get("root"), dict)):
            raise StateCorrupt(f"state.json 'trust' is not an object holding the root document{fix}")
        if not isinstance(self.history, list) or not all(isinstance(h, dict) for h in self.history):
            raise StateCorrupt(f"state.json 'history' is not a list of events{fix}")

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
            data = read_bounded(self.board_file, MAX_STATE_BYTES, follow_symlinks=False)
        except FileNotFoundError:
            raise NotInitialized(f"{self.path} is not an agent state dir (no board.json); "
                                 "run `edgepack-agent init --state DIR --target NAME --trust-root ROOT.json`") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"board.json cannot be read ({describe(e)}); re-run `edgepack-agent init --force`") from None
        try:
            return BoardConfig.from_json(json.loads(data.decode("utf-8"), parse_constant=_no_constant))
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise UsageError(f"board.json is not valid JSON ({str(e)[:120]})") from None

    def load(self) -> AgentState:
        try:
            data = read_bounded(self.state_file, MAX_STATE_BYTES, follow_symlinks=False)
        except FileNotFoundError:
            raise NotInitialized(f"{self.path} has no state.json; run `edgepack-agent init` first") from None
        except (OSError, ValueError) as e:  # a directory, FIFO, symlink (to /dev/zero), or huge
            raise StateCorrupt(f"state.json cannot be read ({describe(e)}); run `edgepack-agent recover` "
                               "to rebuild it from the slots") from None
        try:
            return AgentState.from_json(json.loads(data.decode("utf-8"), parse_constant=_no_constant))
        except (ValueError, RecursionError) as e:
            raise StateCorrupt(f"state.json does not parse ({str(e)[:120]}); it is only ever replaced atomically, "
                               "so the storage itself is failing: run `edgepack-agent recover`") from None

    def save(self, st: AgentState) -> None:
        atomic_write_json(self.state_file, st.to_json())

    def save_board(self, cfg: BoardConfig) -> None:
        cfg.validate()
        atomic_write_json(self.board_file, cfg.to_json())


__all__ = ["BoardConfig", "AgentState", "StateDir", "ENV_STATE", "RUNTIMES"]
