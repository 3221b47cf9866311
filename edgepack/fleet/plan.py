"""``edgepack push --dry-run``: the plan of a rollout before anything is sent.

For every selected board: its wave (the canary first), what it holds (from the store, or asked
now with ``live``), whether it would get a delta or the full bundle and how many bytes, and what
the canary gates (the policy a wave is judged by). Nothing is written to a board.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import FleetError, InventoryError
from .inventory import Board, Fleet
from .push import Policy, Release, _count, plan_waves
from .store import Store


@dataclass(frozen=True, kw_only=True)
class PlannedBoard:
    board: str
    wave: int
    wave_name: str
    holds_release: int | None
    kind: str               # delta | full | current | skip
    bytes: int
    why: str                # how the kind was decided (known base, unknown board, ...)


@dataclass
class PushPlan:
    release: int
    version: str
    bundle: str
    full_bytes: int
    deltas: list[dict[str, Any]]
    boards: list[PlannedBoard]
    waves: list[dict[str, Any]]
    gates: list[str] = field(default_factory=list)

    @property
    def bytes_total(self) -> int:
        return sum(b.bytes for b in self.boards)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_total": self.bytes_total, "dry_run": True}


def _held(board: Board, fleet: Fleet, store: Store | None, live: bool) -> tuple[int | None, str | None, str]:
    """(release, content sha256, source) the board holds: asked now (live), else its last report."""
    if live:
        from .transport import open_transport
        try:
            with open_transport(board, fleet) as t:
                r = t.agent("status", "--history", "0")
                a = r.json().get("active") if r.rc == 0 else None
                a = a if isinstance(a, dict) else {}
                return a.get("release"), a.get("content_sha256"), "asked now"
        except FleetError as e:
            return None, None, f"not reachable now ({str(e)[:120]})"
    if store is None:
        return None, None, "no store"
    for row in store.history(board.name, limit=50):
        d = row.data if isinstance(row.data, dict) else {}
        a = d.get("active") if isinstance(d.get("active"), dict) else None
        if row.kind in ("status", "rollback") and a is not None:
            return a.get("release"), a.get("content_sha256"), "last status report"
        if row.kind == "install" and row.ok and d.get("status") == "committed":
            return d.get("release"), d.get("content_sha256"), "last install"
    return None, None, "never reached: no report in the store"


def plan_push(rel: Release, fleet: Fleet, boards: list[Board] | None = None, *, policy: Policy | None = None,
              store: Store | None = None, live: bool = False) -> PushPlan:
    """What ``push`` would do, board by board; the same waves and the same choice of bundle."""
    p = policy or Policy()
    boards = list(boards if boards is not None else fleet.boards)
    if not boards:
        raise InventoryError("no boards selected; check --group and the fleet file")
    waves = plan_waves(boards, p)
    canary = _count(p.canary, len(boards), "--canary")
    rows: list[PlannedBoard] = []
    for i, wave in enumerate(waves):
        name = "canary" if i == 0 and canary else f"wave {i}"
        for b in wave:
            release, content, src = _held(b, fleet, store, live)
            if content and content == rel.full.content_sha256 and release == rel.release:
                kind, n, why = "current", 0, f"already active ({src})"
            elif isinstance(release, int) and release >= rel.release:
                kind, n, why = "skip", 0, f"holds release {release} >= {rel.release} (anti-rollback; {src})"
            else:
                f = rel.for_base(content)
                if f.kind == "full" and not content and isinstance(release, int):
                    # the report names the release, not its content: a delta from that release is the
                    # likely pick (push itself checks the board's content and falls back to full)
                    f = next((d for d in rel.deltas if d.base_release == release), f)
                    src += ", matched by release number"
                kind, n = f.kind, f.bytes
                why = (f"delta from release {f.base_release} ({src})" if f.kind == "delta" else
                       (f"no delta from release {release} ({src})" if release is not None else f"base unknown: {src}"))
            rows.append(PlannedBoard(board=b.name, wave=i, wave_name=name, holds_release=release, kind=kind,
                                     bytes=n, why=why))
    limit = _count(p.max_failures, len(boards), "--max-failures")
    gates = ["each install runs the board's health trial (golden outputs) before it commits",
             f"top-1 drift above {p.max_drift} rolls a board back",
             f"p90 latency above the previous release by {p.latency_margin:.0%} (and {p.latency_floor_ms} ms), "
             "or above a board's latency_budget_ms, rolls it back",
             f"more than {limit} release failure(s) halt the rollout"
             + (" and roll back the halting wave" if p.rollback_wave_on_halt else "")]
    if canary:
        gates.insert(0, f"canary: {len(waves[0])} board(s) first; no canary commit means no later wave")
    wv = [{"wave": i, "name": "canary" if i == 0 and canary else f"wave {i}", "boards": [b.name for b in w]}
          for i, w in enumerate(waves)]
    return PushPlan(release=rel.release, version=rel.full.version, bundle=str(rel.full.path), full_bytes=rel.full.bytes,
                    deltas=[{"path": str(d.path), "base_release": d.base_release, "bytes": d.bytes} for d in rel.deltas],
                    boards=rows, waves=wv, gates=gates)


__all__ = ["PlannedBoard", "PushPlan", "plan_push"]
