"""Pull fleets' reports into the SQLite store, and ``fleet check`` judged from the store.

Boards upload one JSON object per pull that did something (``reports/<UTC stamp, microseconds>-<board>-<rand>.json``,
device_agent/pull.py). ``ingest`` lists the prefix, fetches the objects it has not seen and writes,
per report, the agent's install JSON as an ``install`` row (a recall as a ``rollback`` row) and a
``status`` row with the board's active release, so ``fleet status``, ``fleet history``, the HTML
report and push's baselines read pull boards exactly like push boards.

Incremental and idempotent: every object key is recorded in the ``ingested`` table in the same
transaction as its rows (a key seen twice adds nothing), and listing starts an hour before the
newest key already ingested (keys sort by the board's clock; ``full=True`` rescans everything).

Reports are hostile input: at most 1 MiB, strict JSON, a board id matching the agent's rule; a
bad object is counted and skipped (named in the result), never half-ingested.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from .monitor import BoardCheck, CheckPolicy, CheckReport, judge
from .storage import Backend
from .store import Store, figures

PREFIX = "reports/"
MAX_REPORT = 1 << 20
BOARD_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
KEY_RE = re.compile(r"^reports/(\d{8}T\d{6}(?:\.\d{6})?Z)-[A-Za-z0-9._-]{1,100}\.json$")
SCHEMA = "CREATE TABLE IF NOT EXISTS ingested (key TEXT PRIMARY KEY, ts REAL NOT NULL, board TEXT)"


@dataclass
class IngestReport:
    listed: int = 0
    new: int = 0
    rows: int = 0
    skipped_known: int = 0
    bad: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _stamp_ts(stamp: str) -> float:
    fmt = "%Y%m%dT%H%M%S.%fZ" if "." in stamp else "%Y%m%dT%H%M%SZ"
    return _dt.datetime.strptime(stamp, fmt).replace(tzinfo=_dt.timezone.utc).timestamp()


def rows_of(key: str, data: bytes) -> tuple[str, float, list[tuple[str, dict[str, Any], bool]]]:
    """(board, time, [(kind, agent-shaped JSON, ok)]) of one report object; ValueError if hostile."""
    m = KEY_RE.match(key)
    if not m:
        raise ValueError("key is not reports/<YYYYmmddTHHMMSSZ>-<board>-<id>.json")
    if len(data) > MAX_REPORT:
        raise ValueError(f"larger than {MAX_REPORT} bytes")
    from device_agent.wire.encoding import parse_json
    from device_agent.errors import MalformedBundle
    try:
        doc = parse_json(data, key)
    except MalformedBundle as e:
        raise ValueError(str(e)) from None
    if not isinstance(doc, dict) or doc.get("format") != "edgepack-pull-report":
        raise ValueError("not an edgepack-pull-report")
    board = doc.get("board")
    res = doc.get("result")
    if not isinstance(board, str) or not BOARD_RE.match(board) or not isinstance(res, dict):
        raise ValueError("board id or result missing or malformed")
    ts = _stamp_ts(m.group(1))
    out: list[tuple[str, dict[str, Any], bool]] = []
    inst = res.get("install")
    pull = {k: res.get(k) for k in ("action", "target", "kind", "bytes_downloaded", "requests", "bucket",
                                    "release_before", "release_after", "seconds", "error")}
    if isinstance(inst, dict):
        if isinstance(inst.get("rollback"), dict):
            out.append(("rollback", {**inst["rollback"], "ok": True, "pull": pull}, True))
        else:
            out.append(("install", {**inst, "pull": pull}, bool(inst.get("ok"))))
    rel = res.get("release_after")
    out.append(("status", {"ok": True, "active": {"release": rel if isinstance(rel, int) else None}, "pull": pull,
                           "error": res.get("error")}, True))
    return board, ts, out


def _insert(db: Any, key: str, board: str, ts: float, rows: list[tuple[str, dict[str, Any], bool]]) -> int:
    cur = db.execute("INSERT OR IGNORE INTO ingested(key, ts, board) VALUES (?,?,?)", (key, time.time(), board))
    if cur.rowcount == 0:
        return 0
    vals = []
    for kind, d, ok in rows:
        f = figures(kind, d)
        vals.append((ts, board, kind, f["release"], int(ok), None, f["p90_ms"], f["drift"], f["top1"],
                     f["peak_rss_mb"], f["bytes"], json.dumps(d, default=str)))
    db.executemany("INSERT INTO reports(ts, board, kind, release, ok, rollout, p90_ms, drift, top1, peak_rss_mb, "
                   "bytes, json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", vals)
    return len(vals)


def ingest_objects(store: Store, objects: Iterable[tuple[str, bytes]], *, batch: int = 2000) -> IngestReport:
    """Ingest (key, bytes) pairs in transactions of ``batch`` objects (the bulk path; the benchmark
    feeds it directly)."""
    rep = IngestReport()
    t0 = time.perf_counter()
    with store.transaction() as db:
        db.execute(SCHEMA)
    buf: list[tuple[str, str, float, list]] = []

    def flush() -> None:
        with store.transaction() as db:
            for key, board, ts, rows in buf:
                n = _insert(db, key, board, ts, rows)
                rep.rows += n
                rep.new += bool(n)
                rep.skipped_known += not n
        buf.clear()

    for key, data in objects:
        rep.listed += 1
        try:
            board, ts, rows = rows_of(key, data)
        except ValueError as e:
            rep.bad.append(f"{key}: {e}"[:300])
            continue
        buf.append((key, board, ts, rows))
        if len(buf) >= batch:
            flush()
    if buf:
        flush()
    rep.seconds = round(time.perf_counter() - t0, 3)
    return rep


def ingest(store: Store, backend: Backend, *, full: bool = False, batch: int = 500) -> IngestReport:
    """Fetch the report objects the store has not seen yet and write their rows."""
    with store.transaction() as db:
        db.execute(SCHEMA)
        last = db.execute("SELECT MAX(key) FROM ingested").fetchone()[0]
    start = ""
    if last and not full:
        m = KEY_RE.match(last)
        if m:
            t = _dt.datetime.fromtimestamp(_stamp_ts(m.group(1)) - 3600, _dt.timezone.utc)
            start = PREFIX + t.strftime("%Y%m%dT%H%M%SZ")
    known: set[str] = set()
    keys = [k for k in backend.list(PREFIX, start_after=start) if k.endswith(".json")]
    with store.transaction() as db:
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            q = ",".join("?" * len(chunk))
            known.update(r[0] for r in db.execute(f"SELECT key FROM ingested WHERE key IN ({q})", chunk))

    def objects() -> Iterable[tuple[str, bytes]]:
        for k in keys:
            if k in known:
                continue
            data = backend.get(k)
            if data is not None:
                yield k, data

    rep = ingest_objects(store, objects(), batch=batch)
    rep.listed, rep.skipped_known = len(keys), rep.skipped_known + len(known)
    return rep


def check_reports(store: Store, policy: CheckPolicy | None = None, *, latency_budget_ms: float | None = None,
                  ram_budget_mb: float | None = None, save_flags: bool = True) -> CheckReport:
    """``fleet check`` for boards nobody can reach: judge every board's latest committed install
    (its trial on the board) with ``monitor.judge``, baseline = that board's previous release."""
    from .inventory import Board
    p = policy or CheckPolicy()
    t0 = time.perf_counter()
    # one ordered scan of the covering index store.reports_installs; per board: the latest
    # committed install, and as its baseline the latest earlier one of a lower release with a p90
    sql = """SELECT board, release, p90_ms, drift, top1, peak_rss_mb FROM reports INDEXED BY reports_installs
             WHERE kind = 'install' AND ok = 1 ORDER BY board, id"""
    out = []

    def judge_board(rows: list[tuple]) -> None:
        board, rel, p90, drift, top1, rss = rows[-1]
        base = next((r[2] for r in reversed(rows[:-1]) if r[2] is not None and r[1] is not None and rel is not None
                     and r[1] < rel), None)
        b = Board(name=board, latency_budget_ms=latency_budget_ms, ram_budget_mb=ram_budget_mb)
        c = BoardCheck(board=board, release=rel, top1=top1, drift=drift, p90_ms=p90, baseline_p90_ms=base,
                       peak_rss_mb=rss)
        c.flags = judge(b, c, p)
        out.append(c)

    with store.transaction() as db:
        cur: list[tuple] = []
        for row in db.execute(sql):
            if cur and row[0] != cur[0][0]:
                judge_board(cur)
                cur = []
            cur.append(row)
        if cur:
            judge_board(cur)
    rep = CheckReport(boards=out, seconds=round(time.perf_counter() - t0, 3))
    if save_flags:
        store.add_flags(rep.flags)
    return rep


# What a board's refusal of the repository means for the operator, by the agent's named error
# (device_agent.pull). A refusal protects the board; these say what to do so the fleet moves again.
REFUSAL_ADVICE = {
    "MetadataRollback": "the board trusts a newer timestamp/snapshot than the repository serves: a replayed old "
                        "repository, or a fast-forward by a stolen key. If yours is the newest, rotate: "
                        "`edgepack repo rotate timestamp` (stolen snapshot key: `repo rotate snapshot timestamp`)",
    "MetadataUnsigned": "metadata not signed by the repository's keys reached the board: a tampered mirror or a "
                        "man in the middle; compare the store with your keys",
    "MetadataMismatch": "metadata differs from what the newer signed metadata pins (mix-and-match): a tampered or "
                        "half-synced mirror",
    "TargetHashMismatch": "a bundle's bytes differ from the signed targets: a tampered store or mirror",
    "MetadataExpired": "the timestamp (or snapshot) has expired: run `edgepack repo refresh` from cron, or a "
                       "mirror serves a frozen copy",
    "EndlessData": "the server sent more bytes than the signed length: a hostile mirror",
    "SlowRetrieval": "transfers below the minimum rate or past the deadline: a slow link or a hostile mirror",
}


def repository_refusals(store: Store) -> list[dict[str, Any]]:
    """Boards whose latest report is a refusal of the repository (TUF's checks), with what it means.
    A pull fleet has no session to see this in: it is only in the reports the boards upload."""
    types = tuple(REFUSAL_ADVICE)
    sql = f"""
    WITH last AS (SELECT board, MAX(id) AS id FROM reports WHERE kind='status' GROUP BY board)
    SELECT r.board, r.ts, json_extract(r.json, '$.error.type'), json_extract(r.json, '$.error.message')
    FROM reports r JOIN last ON r.id = last.id
    WHERE json_extract(r.json, '$.error.type') IN ({",".join("?" * len(types))}) ORDER BY r.board"""
    with store.transaction() as db:
        db.execute("CREATE INDEX IF NOT EXISTS reports_kind_board ON reports(kind, board, id)")
        rows = db.execute(sql, types).fetchall()
    return [{"board": b, "ts": ts, "error": t, "message": str(m)[:300], "advice": REFUSAL_ADVICE[t]}
            for b, ts, t, m in rows]


__all__ = ["ingest", "ingest_objects", "check_reports", "repository_refusals", "rows_of", "IngestReport",
           "REFUSAL_ADVICE"]
