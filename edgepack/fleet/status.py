"""``edgepack fleet status``: one row per board from the store (``live=True`` asks the boards first).

The aggregation lives here, not in the CLI, so a notebook, the report and ``--watch`` see the same
rows. Every board of the fleet file gets a row, reached or not: a board the store has never heard
from shows ``release None`` and ``last_seen None`` rather than disappearing.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from .errors import FleetError
from .inventory import Board, Fleet
from .store import Store


@dataclass(frozen=True, kw_only=True)
class BoardStatus:
    board: str
    host: str
    groups: list[str]
    release: int | None
    last_install: str | None
    p90_ms: float | None
    drift: float | None
    last_seen: str | None
    error: str | None
    decode_tok_s: float | None = None   # an LLM bundle's last bench: greedy decode tokens/s (p90_ms is per token)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _where(b: Board) -> str:
    return b.host if b.transport == "ssh" else ("pull" if b.transport == "pull" else "local")


def _ask(b: Board, fleet: Fleet, store: Store) -> str | None:
    """Ask one board for its status now and store the answer; the error text if it cannot be reached."""
    from .transport import open_transport
    try:
        with open_transport(b, fleet) as t:
            r = t.agent("status", "--history", "0")
            store.add(b.name, "status", r.json(), ok=r.rc == 0)
    except FleetError as e:
        return str(e)
    return None


def board_status(b: Board, store: Store, error: str | None = None) -> BoardStatus:
    """The store's view of one board: active release, last install outcome, last figures."""
    last = store.history(b.name, limit=1)
    ins = store.latest(b.name, "install", ok_only=False)
    bench = store.latest(b.name, "bench", need="p90_ms")
    ev = store.latest(b.name, "eval", need="drift")
    outcome = None
    if ins:
        e = ins.data.get("error")
        outcome = ins.data.get("status") or (e.get("type") if isinstance(e, dict) else None)
    return BoardStatus(board=b.name, host=_where(b), groups=list(b.groups), release=store.active_release(b.name),
                       last_install=outcome, p90_ms=bench.p90_ms if bench else (ins.p90_ms if ins else None),
                       drift=ev.drift if ev else (ins.drift if ins else None),
                       last_seen=dt.datetime.fromtimestamp(last[0].ts).isoformat(timespec="seconds") if last else None,
                       error=error, decode_tok_s=_decode_tok_s(bench.data) if bench else None)


def _decode_tok_s(data: dict[str, Any]) -> float | None:
    """The agent's ``bench`` of a decoder reports token metrics under ``llm``; other models have none."""
    v = (data.get("llm") or {}).get("decode_tok_s") if isinstance(data.get("llm"), dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def status(fleet: Fleet, store: Store, *, group: str | None = None, live: bool = False,
           reported: bool = False) -> list[BoardStatus]:
    """Rows for the selected boards; ``reported`` adds every board the store has reports from
    (pull fleets are known by their reports, not by a fleet file)."""
    sel = fleet.select(group)
    if reported:
        names = {b.name for b in sel}
        sel = sel + [Board(name=n, transport="pull") for n in store.boards() if n not in names]
    rows = []
    for b in sel:
        err = _ask(b, fleet, store) if live and b.transport != "pull" else None
        rows.append(board_status(b, store, err))
    return rows


__all__ = ["BoardStatus", "board_status", "status"]
