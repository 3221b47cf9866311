"""``edgepack fleet check``: re-run eval and bench on boards and flag regressions.

Flags (each stored in the ``flags`` table):

* ``drift``: top-1 drift (1 - top-1 agreement with the host's reference outputs in the release's
  golden data) above ``max_drift``;
* ``latency_budget``: p90 above the board's ``latency_budget_ms``;
* ``latency_regression``: p90 above the previous release's p90 on the same board by more than
  ``latency_margin`` (and by more than ``latency_floor_ms``, so timer noise on tiny models does
  not page anyone);
* ``ram``: the agent process's peak RSS during the bench above the board's ``ram_budget_mb``.

Exit code: 0 clean, 26 a regression was flagged, 21 no regression but some board could not be
checked. Made for cron and CI.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from .agent_client import AgentClient
from .errors import AuthFailed, HostKeyRejected, RegressionFound, TransferFailed, UnreachableBoard
from .inventory import Board, Fleet
from .store import Store
from .thresholds import DEFAULT_MAX_DRIFT, Thresholds
from .thresholds import judge as judge_figures
from .transport import open_transport


@dataclass
class CheckPolicy:
    max_drift: float = DEFAULT_MAX_DRIFT
    latency_margin: float = 0.20
    latency_floor_ms: float = 0.5
    bench_runs: int = 50
    warmup: int = 5
    concurrency: int = 4
    timeout: float = 600.0

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(max_drift=self.max_drift, latency_margin=self.latency_margin,
                          latency_floor_ms=self.latency_floor_ms)


@dataclass
class Flag:
    board: str
    release: int | None
    kind: str  # drift | latency_budget | latency_regression | ram
    value: float
    threshold: float
    message: str


@dataclass
class BoardCheck:
    board: str
    release: int | None = None
    top1: float | None = None
    drift: float | None = None
    accuracy: float | None = None
    p90_ms: float | None = None
    baseline_p90_ms: float | None = None
    peak_rss_mb: float | None = None
    flags: list[Flag] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class CheckReport:
    boards: list[BoardCheck]
    seconds: float = 0.0

    @property
    def flags(self) -> list[Flag]:
        return [f for b in self.boards for f in b.flags]

    @property
    def exit_code(self) -> int:
        if self.flags:
            return RegressionFound.exit_code
        if any(b.error for b in self.boards):
            return UnreachableBoard.exit_code
        return 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "exit_code": self.exit_code, "flags": [asdict(f) for f in self.flags]}


def judge(board: Board, c: BoardCheck, p: CheckPolicy) -> list[Flag]:
    """fleet/thresholds.py's judgement, the same as push's, on a board's current figures."""
    if board.kind != "board":  # an emulated board: its latency is the emulator's, never flagged
        c.p90_ms = c.baseline_p90_ms = None
    return [Flag(board.name, c.release, f.kind, f.value, f.threshold, f"{board.name}: {f.message}")
            for f in judge_figures(p.thresholds, drift=c.drift, p90_ms=c.p90_ms, baseline_p90_ms=c.baseline_p90_ms,
                                   latency_budget_ms=board.latency_budget_ms, peak_rss_mb=c.peak_rss_mb,
                                   ram_budget_mb=board.ram_budget_mb)]


def check_board(board: Board, fleet: Fleet, store: Store | None, p: CheckPolicy) -> BoardCheck:
    c = BoardCheck(board=board.name)
    t0 = time.perf_counter()
    t = open_transport(board, fleet)
    try:
        t.connect()
        record = (lambda kind, data, ok: store.add(board.name, kind, data, ok=ok)) if store else None
        agent = AgentClient(t, timeout=p.timeout)
        st = agent.status()
        if st.rc != 0:
            raise UnreachableBoard(f"{board.name}: agent status failed: {st.error.message}")
        if store:
            store.add(board.name, "status", st.data)
        c.release = st.figures()["release"]
        if c.release is None:
            c.error = f"{board.name}: no release installed; push one first"
            return c
        ev = AgentClient(t, timeout=p.timeout, record=record).eval()
        if ev.rc == 0:
            f = ev.figures()
            c.top1, c.drift = f["top1"], f["drift"]
            c.accuracy = (ev.data.get("comparison") or {}).get("accuracy")
        else:
            c.error = f"{board.name}: eval failed: {ev.error.message}"
        bn = agent.bench(p.bench_runs, p.warmup)
        if bn.rc == 0:
            f = bn.figures()
            c.p90_ms, c.peak_rss_mb = f["p90_ms"], f["peak_rss_mb"]
            if store:
                c.baseline_p90_ms = store.baseline_p90(board.name, c.release)
                store.add(board.name, "bench", bn.data)
        else:
            if store:
                store.add(board.name, "bench", bn.data, ok=False)
            c.error = f"{board.name}: bench failed: {bn.error.message}"
        c.flags = judge(board, c, p)
    except (UnreachableBoard, AuthFailed, HostKeyRejected, TransferFailed) as e:
        c.error = str(e)
    finally:
        t.close()
        c.seconds = round(time.perf_counter() - t0, 3)
    return c


def check(fleet: Fleet, boards: list[Board] | None = None, *, store: Store | None = None,
          policy: CheckPolicy | None = None) -> CheckReport:
    p = policy or CheckPolicy()
    boards = list(boards if boards is not None else fleet.boards)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(p.concurrency, len(boards)))) as ex:
        res = list(ex.map(lambda b: check_board(b, fleet, store, p), boards))
    rep = CheckReport(boards=res, seconds=round(time.perf_counter() - t0, 3))
    if store:
        store.add_flags(rep.flags)
    return rep


__all__ = ["CheckPolicy", "CheckReport", "BoardCheck", "Flag", "check", "judge"]
