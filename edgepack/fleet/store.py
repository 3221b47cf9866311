"""Fleet reports in one SQLite file: every install / bench / eval / status JSON a board returned,
the rollouts, and the regressions ``fleet check`` flagged.

The agent's JSON is stored verbatim (``json`` column); the few figures the queries need
(release, p90, drift, RAM, bytes) are extracted into columns when the row is written.
"""
from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
  id INTEGER PRIMARY KEY, ts REAL NOT NULL, board TEXT NOT NULL, kind TEXT NOT NULL,
  release INTEGER, ok INTEGER NOT NULL, rollout INTEGER,
  p90_ms REAL, drift REAL, top1 REAL, peak_rss_mb REAL, bytes INTEGER, json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS reports_board ON reports(board, ts);
-- committed installs, per board in id order, with the figures `fleet check-reports` judges: that
-- check is then one ordered scan of this index (no table lookups, no sort), also at 10^6 rows
CREATE INDEX IF NOT EXISTS reports_installs ON reports(board, id, release, p90_ms, drift, top1, peak_rss_mb)
  WHERE kind = 'install' AND ok = 1;
CREATE TABLE IF NOT EXISTS rollouts (
  id INTEGER PRIMARY KEY, ts REAL NOT NULL, release INTEGER, bundle TEXT, halted INTEGER, reason TEXT, json TEXT);
CREATE TABLE IF NOT EXISTS flags (
  id INTEGER PRIMARY KEY, ts REAL NOT NULL, board TEXT NOT NULL, release INTEGER, kind TEXT NOT NULL,
  value REAL, threshold REAL, message TEXT NOT NULL);
"""


def _num(x: Any) -> float | None:
    """A finite number from a board reply, else None (NaN/inf/strings never reach the columns)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        v = float(x)
        return v if math.isfinite(v) else None
    return None


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63 else None


def _obj(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def figures(kind: str, d: dict[str, Any]) -> dict[str, Any]:
    """Columns extracted from an agent JSON object (install, bench, eval, status).

    The JSON comes from a board: any field may have the wrong type; such a field is None."""
    f: dict[str, Any] = {"release": None, "p90_ms": None, "drift": None, "top1": None, "peak_rss_mb": None, "bytes": None}
    d = _obj(d)
    rep = _obj(d.get("report")) if not d.get("ok", True) and isinstance(d.get("report"), dict) else d
    if kind == "install":
        f["release"] = _int(rep.get("release"))
        trial = _obj(rep.get("trial"))
        f["p90_ms"] = _num(_obj(trial.get("latency")).get("p90_ms"))
        comp = _obj(trial.get("comparison"))
        f["top1"] = _num(comp.get("top1_agreement"))
        f["peak_rss_mb"] = _num(trial.get("peak_rss_mb")) or _num(rep.get("peak_rss_mb_before_trial"))
        f["bytes"] = _int(rep.get("bundle_bytes"))
    elif kind == "bench":
        f["release"] = _int(d.get("release"))
        f["p90_ms"] = _num(_obj(d.get("latency")).get("p90_ms"))
        f["peak_rss_mb"] = _num(d.get("peak_rss_mb"))
    elif kind == "eval":
        f["release"] = _int(d.get("release"))
        f["top1"] = _num(_obj(d.get("comparison")).get("top1_agreement"))
    elif kind in ("status", "rollback"):
        f["release"] = _int(_obj(d.get("active")).get("release"))
    if f["top1"] is not None:
        f["drift"] = round(1.0 - f["top1"], 6)
    src = ((rep.get("trial") or {}) if kind == "install" else rep).get("latency_source")
    if src == "emulator":  # an emulator's clock: never a budget, baseline or regression figure
        f["p90_ms"] = None
    return f


@dataclass
class Row:
    id: int
    ts: float
    board: str
    kind: str
    release: int | None
    ok: bool
    rollout: int | None
    p90_ms: float | None
    drift: float | None
    top1: float | None
    peak_rss_mb: float | None
    bytes: int | None
    data: dict[str, Any]


class Store:
    """Thread-safe (one lock, one connection); WAL so a reader (report) never blocks a rollout."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.db.commit()

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *a: Any) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection under the store's lock, committed at the end (rolled back on error):
        for bulk writers such as the pull-report ingest (edgepack.fleet.ingest)."""
        with self._lock:
            try:
                yield self.db
                self.db.commit()
            except BaseException:
                self.db.rollback()
                raise

    # ---------------------------------------------------------------- writes
    def add(self, board: str, kind: str, data: dict[str, Any], *, ok: bool | None = None, rollout: int | None = None,
            ts: float | None = None, **override: Any) -> int:
        data = _obj(data)
        f = {**figures(kind, data), **{k: v for k, v in override.items() if v is not None}}
        ok = data.get("ok", True) is True if ok is None else ok
        with self._lock:
            cur = self.db.execute(
                "INSERT INTO reports(ts, board, kind, release, ok, rollout, p90_ms, drift, top1, peak_rss_mb, bytes, json)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (ts or time.time(), board, kind, f["release"], int(ok), rollout, f["p90_ms"], f["drift"], f["top1"],
                 f["peak_rss_mb"], f["bytes"], json.dumps(data, default=str, allow_nan=True)))
            self.db.commit()
            return int(cur.lastrowid)

    def start_rollout(self, release: int | None, bundle: str) -> int:
        with self._lock:
            cur = self.db.execute("INSERT INTO rollouts(ts, release, bundle, halted) VALUES (?,?,?,0)",
                                  (time.time(), release, bundle))
            self.db.commit()
            return int(cur.lastrowid)

    def finish_rollout(self, rid: int, halted: bool, reason: str | None, data: dict[str, Any]) -> None:
        with self._lock:
            self.db.execute("UPDATE rollouts SET halted=?, reason=?, json=? WHERE id=?",
                            (int(halted), reason, json.dumps(data, default=str), rid))
            self.db.commit()

    def add_flags(self, flags: Iterable[Any]) -> None:
        with self._lock:
            for fl in flags:
                self.db.execute("INSERT INTO flags(ts, board, release, kind, value, threshold, message) VALUES (?,?,?,?,?,?,?)",
                                (time.time(), fl.board, fl.release, fl.kind, fl.value, fl.threshold, fl.message))
            self.db.commit()

    # ---------------------------------------------------------------- reads
    def _rows(self, sql: str, args: tuple = ()) -> list[Row]:
        with self._lock:
            cur = self.db.execute("SELECT id, ts, board, kind, release, ok, rollout, p90_ms, drift, top1, peak_rss_mb,"
                                  " bytes, json FROM reports " + sql, args)
            rows = cur.fetchall()
        return [Row(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8], r[9], r[10], r[11], json.loads(r[12]))
                for r in rows]

    def history(self, board: str, limit: int = 50, kind: str | None = None) -> list[Row]:
        if kind:
            return self._rows("WHERE board=? AND kind=? ORDER BY ts DESC, id DESC LIMIT ?", (board, kind, limit))
        return self._rows("WHERE board=? ORDER BY ts DESC, id DESC LIMIT ?", (board, limit))

    def all_rows(self, kinds: tuple[str, ...] = ("install", "bench", "eval", "status")) -> list[Row]:
        q = ",".join("?" * len(kinds))
        return self._rows(f"WHERE kind IN ({q}) ORDER BY ts, id", kinds)

    def boards(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self.db.execute("SELECT DISTINCT board FROM reports ORDER BY board")]

    def latest(self, board: str, kind: str, *, release: int | None = None, before_release: int | None = None,
               ok_only: bool = True, need: str | None = None) -> Row | None:
        sql, args = "WHERE board=? AND kind=?", [board, kind]
        if release is not None:
            sql += " AND release=?"
            args.append(release)
        if before_release is not None:
            sql += " AND release<?"
            args.append(before_release)
        if ok_only:
            sql += " AND ok=1"
        if need:
            sql += f" AND {need} IS NOT NULL"
        rows = self._rows(sql + " ORDER BY ts DESC, id DESC LIMIT 1", tuple(args))
        return rows[0] if rows else None

    def active_release(self, board: str) -> int | None:
        """The board's active release as last reported (status, or a committed install)."""
        rows = self._rows("WHERE board=? AND kind IN ('status', 'install', 'rollback') ORDER BY ts DESC, id DESC LIMIT 20",
                          (board,))
        for r in rows:
            if r.kind in ("status", "rollback") and r.ok:
                return r.release
            if r.kind == "install" and r.ok and r.data.get("status", "committed") == "committed":
                return r.release
        return None

    def baseline_p90(self, board: str, release: int) -> float | None:
        """p90 of the release before ``release`` on this board (bench if any, else its install trial)."""
        for kind in ("bench", "install"):
            r = self.latest(board, kind, before_release=release, need="p90_ms")
            if r is not None:
                return r.p90_ms
        return None

    def rollouts(self, limit: int = 20) -> list[dict[str, Any]]:
        with self._lock:
            cur = self.db.execute("SELECT id, ts, release, bundle, halted, reason, json FROM rollouts ORDER BY id DESC LIMIT ?",
                                  (limit,))
            return [{"id": r[0], "ts": r[1], "release": r[2], "bundle": r[3], "halted": bool(r[4]), "reason": r[5],
                     "report": json.loads(r[6]) if r[6] else None} for r in cur.fetchall()]

    def flags(self, limit: int = 200) -> list[dict[str, Any]]:
        with self._lock:
            cur = self.db.execute("SELECT ts, board, release, kind, value, threshold, message FROM flags ORDER BY ts DESC LIMIT ?",
                                  (limit,))
            return [{"ts": r[0], "board": r[1], "release": r[2], "kind": r[3], "value": r[4], "threshold": r[5],
                     "message": r[6]} for r in cur.fetchall()]


__all__ = ["Store", "Row", "figures"]
