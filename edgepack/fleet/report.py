"""``edgepack report``: one self-contained HTML page from the fleet store (charts: edgepack.charts).

No scripts, no fonts, no CDN: inline CSS and inline SVG only, so the page opens offline and can be
mailed or archived as one file. What a reader needs to decide: every board of the fleet (a board
never reached is listed as such, not left out), each rollout's real outcome (2 of 4 committed is
"partial", not green), regressions including the rollbacks at push time, p90 latency per board and
release against each board's budget, drift over time against the threshold, the rollout timeline
by wave, and per board a drill-down (history, last error, the agent's own log).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .agent_client import agent_error
from .thresholds import DEFAULT_MAX_DRIFT
from ..charts import Raw, esc, fmt_bytes, grouped_bars, lines, page, pill, table
from .store import Store

ROLLED_BACK = "rolled_back"


def _when(ts: Any) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if isinstance(ts, (int, float)) else "–"


def _rel(v: Any) -> str:
    return f"r{v}" if isinstance(v, int) and not isinstance(v, bool) else "–"


def _said(message: Any) -> str:
    """A board's message as a reader should see it: agents before December 2026 wrote "release None"
    for a board that had nothing installed before, and boards in the field still run them."""
    return str(message).replace("to release None", "to no release (nothing was installed before)")


@dataclass
class ReportData:
    latency: dict[tuple[str, str], float]
    boards: list[str]
    unreached: list[str]
    releases: list[str]
    drift: dict[str, list[tuple[float, float]]]
    flags: list[dict[str, Any]]
    rollouts: list[dict[str, Any]]
    status: list[dict[str, Any]]
    push_rollbacks: list[dict[str, Any]]
    budgets: dict[str, float]


def _last_error(store: Store, board: str) -> str | None:
    for r in store.history(board, limit=30):
        e = r.data.get("error") if isinstance(r.data, dict) else None
        if not r.ok and isinstance(e, dict):
            return _said(f"{_when(r.ts)} {r.kind}: {e.get('type')}: {e.get('message')}")
    return None


def collect(store: Store, fleet: Any = None) -> ReportData:
    rows = store.all_rows()
    lat: dict[tuple[str, str], tuple[int, float]] = {}  # (board, release) -> (priority, p90): bench beats install trial
    drift: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.p90_ms is not None and isinstance(r.release, int) and r.ok:
            k = (r.board, f"r{r.release}")
            pri = 2 if r.kind == "bench" else 1
            if k not in lat or pri >= lat[k][0]:
                lat[k] = (pri, r.p90_ms)
        if r.drift is not None and r.kind in ("eval", "install"):
            drift.setdefault(r.board, []).append((r.ts, r.drift))
    known = store.boards()
    fleet_boards = [b.name for b in fleet.boards] if fleet is not None else []
    boards = fleet_boards + [b for b in known if b not in fleet_boards]
    unreached = [b for b in fleet_boards if b not in known]
    budgets = {b.name: float(b.latency_budget_ms) for b in (fleet.boards if fleet is not None else [])
               if b.latency_budget_ms is not None}
    releases = sorted({k[1] for k in lat}, key=lambda s: int(s[1:]))
    status = []
    for b in boards:
        last = store.history(b, limit=1)
        ins = store.latest(b, "install", ok_only=False)
        bench = store.latest(b, "bench", need="p90_ms")
        ev = store.latest(b, "eval", need="drift")
        status.append({"board": b, "release": store.active_release(b), "last_seen": last[0].ts if last else None,
                       "last_install": (ins.data.get("status") or ("ok" if ins.ok else
                                        agent_error(ins.data).type)) if ins else None,
                       "p90_ms": bench.p90_ms if bench else (ins.p90_ms if ins else None),
                       "drift": ev.drift if ev else (ins.drift if ins else None), "reached": b not in unreached})
    rollouts = store.rollouts(50)
    push_rb = []
    for ro in rollouts:
        rep = ro["report"] if isinstance(ro["report"], dict) else {}
        for b in rep.get("boards", []) if isinstance(rep.get("boards"), list) else []:
            if isinstance(b, dict) and b.get("result") == ROLLED_BACK:
                push_rb.append({"ts": ro["ts"], "board": str(b.get("board")), "release": ro["release"],
                                "kind": "rolled back at push", "value": b.get("drift"), "threshold": None,
                                "message": _said(b.get("error") or "rolled back by the health gate")})
    return ReportData({k: v[1] for k, v in lat.items()}, boards, unreached, releases, drift, store.flags(), rollouts,
                      status, push_rb, budgets)


def rollout_outcome(ro: dict[str, Any]) -> tuple[str, str]:
    """(text, kind) of a rollout: complete only when every board committed or was already current."""
    rep = ro["report"] if isinstance(ro["report"], dict) else {}
    bs = [b for b in rep.get("boards", []) if isinstance(b, dict)] if isinstance(rep.get("boards"), list) else []
    good = sum(b.get("result") in ("committed", "current") for b in bs)
    if ro["halted"]:
        return f"halted: {(ro['reason'] or '')[:160]}", "bad"
    if not bs:
        return "no boards", "muted"
    if good == len(bs):
        return f"complete: {good} of {len(bs)}", "ok"
    return f"partial: {good} of {len(bs)} committed", "warn"


def _overview(d: ReportData) -> str:
    n_ok = sum(1 for s in d.status if s["reached"] and s["last_install"] in ("committed", "ok", None) and s["release"])
    last = rollout_outcome(d.rollouts[0]) if d.rollouts else ("no rollout yet", "muted")
    regress = len(d.flags) + len(d.push_rollbacks)
    cells = [("boards", f"{len(d.boards)}", "muted"), ("running a release", f"{n_ok}", "ok" if n_ok else "muted"),
             ("never reached", f"{len(d.unreached)}", "bad" if d.unreached else "ok"),
             ("regressions", f"{regress}", "bad" if regress else "ok"), ("last rollout", last[0], last[1])]
    return "<p id='overview'>" + " ".join(f"{esc(k)}: {pill(v, kind)}" for k, v, kind in cells) + "</p>"


def _boards_section(store: Store, d: ReportData) -> list[str]:
    rows, cls = [], []
    for s in d.status:
        state = pill("never reached", "bad") if not s["reached"] else pill(s["last_install"] or "no install", "ok"
                                                                          if s["last_install"] in ("committed", "ok")
                                                                          else "warn")
        rows.append((Raw(f"<a href='#board-{esc(s['board'])}'>{esc(s['board'])}</a>"), _rel(s["release"]), state,
                     s["p90_ms"], d.budgets.get(s["board"]), s["drift"], _when(s["last_seen"])))
        cls.append("" if s["reached"] else "bad")
    out = ["<h2>Boards</h2>", table(("board", "release", "last install", "p90 ms", "budget ms", "drift", "last seen"),
                                    rows, left=(0, 2), css_id="boards", classes=cls)]
    for s in d.status:
        b = s["board"]
        hist = store.history(b, limit=15)
        err = _last_error(store, b)
        log = []
        for r in hist:
            h = r.data.get("history") if isinstance(r.data, dict) else None
            if r.kind == "status" and isinstance(h, list) and h:
                log = [x for x in h[-12:] if isinstance(x, dict)]
                break
        body = [f"<details id='board-{esc(b)}'><summary>{esc(b)}: {esc(_rel(s['release']))}"
                f"{' (never reached)' if not s['reached'] else ''}</summary>"]
        body.append(f"<p><strong>last error</strong>: {esc(err) if err else 'none'}</p>")
        body.append(table(("when", "kind", "ok", "release", "p90 ms", "drift", "bytes"),
                          [(_when(r.ts), r.kind, "yes" if r.ok else "no", _rel(r.release), r.p90_ms, r.drift,
                            fmt_bytes(r.bytes)) for r in hist], left=(0, 1)) or "<p class='muted'>no reports</p>")
        if log:
            body.append("<h3>agent log (latest status)</h3><pre>" + esc("\n".join(
                f"{x.get('ts') or x.get('time') or ''} {x.get('event') or x.get('action') or ''} "
                f"{x.get('release') or ''} {x.get('reason') or x.get('message') or ''}".strip() for x in log)) + "</pre>")
        body.append("</details>")
        out.append("".join(body))
    return out


def _rollouts_section(d: ReportData) -> list[str]:
    if not d.rollouts:
        return ["<h2>Rollouts</h2><p class='muted'>no rollout yet</p>"]
    rows, cls = [], []
    for ro in d.rollouts:
        rep = ro["report"] if isinstance(ro["report"], dict) else {}
        bs = [b for b in rep.get("boards", []) if isinstance(b, dict)] if isinstance(rep.get("boards"), list) else []
        text, kind = rollout_outcome(ro)
        rows.append((ro["id"], _when(ro["ts"]), _rel(ro["release"]), len(bs),
                     sum(b.get("result") == "committed" for b in bs), fmt_bytes(rep.get("bytes_sent")), pill(text, kind)))
        cls.append({"bad": "bad", "warn": "warn"}.get(kind, ""))
    out = ["<h2>Rollouts</h2>", table(("#", "when", "release", "boards", "committed", "sent", "result"), rows,
                                      left=(6,), css_id="rollouts", classes=cls)]
    latest = d.rollouts[0]
    rep = latest["report"] if isinstance(latest["report"], dict) else {}
    waves = [w for w in rep.get("waves", []) if isinstance(w, dict)] if isinstance(rep.get("waves"), list) else []
    if waves:
        groups = [str(w.get("name", f"wave {i}")) for i, w in enumerate(waves)]
        vals = {}
        for g, w in zip(groups, waves):
            for k, label in (("committed", "committed"), ("current", "current"), ("rolled_back", "rolled back"),
                             ("failed", "failed"), ("not_reached", "not reached")):
                if isinstance(w.get(k), int) and w.get(k):
                    vals[(g, label)] = w[k]
        series = [s for s in ("committed", "current", "rolled back", "failed", "not reached")
                  if any(k[1] == s for k in vals)]
        out.append(grouped_bars(f"rollout #{latest['id']} ({_rel(latest['release'])}) by wave: boards per outcome",
                                groups, series, vals, ylabel="boards", integer=True, height=240, css_id="timeline"))
        out.append(table(("wave", "boards", "seconds", "sent", "failures so far"),
                         [(g, w.get("boards"), w.get("seconds"), fmt_bytes(w.get("bytes_sent")), w.get("failures_so_far"))
                          for g, w in zip(groups, waves)], css_id="waves"))
    return out


def render_html(store: Store, out: str | Path, *, title: str = "edgepack fleet report", max_drift: float = DEFAULT_MAX_DRIFT,
                fleet: Any = None) -> Path:
    """Write the report; ``fleet`` (the fleet file) adds the boards never reached and their budgets."""
    d = collect(store, fleet)
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    regress = len(d.flags) + len(d.push_rollbacks)
    sub = (f"generated {now} from {store.path.name}: {len(d.boards)} boards"
           f"{f' ({len(d.unreached)} never reached)' if d.unreached else ''}, {len(d.rollouts)} rollouts, "
           f"{regress} regressions")
    s = [_overview(d), "<h2>Latency per board and release</h2>"]
    s.append(grouped_bars("p90 latency (ms) per board and release; dashed: the board's latency budget", d.boards,
                          d.releases, d.latency, ylabel="p90 ms", limits=d.budgets, limit_name="latency budget",
                          css_id="latency")
             or "<p class='muted'>no latency figures yet (push a release or run `edgepack fleet check`)</p>")
    s.append("<h2>Top-1 drift over time</h2>")
    s.append(lines("top-1 drift vs the host's reference outputs", d.drift, xlabel="time", ylabel="1 - top-1 agreement",
                   limit=max_drift, limit_name="halt threshold", x_is_time=True, min_span=max_drift * 2, css_id="drift")
             or "<p class='muted'>no drift figures yet</p>")
    s.append("<h2>Regressions</h2>")
    allf = d.flags + d.push_rollbacks
    if allf:
        counts: dict[tuple[str, str], float] = {}
        for f in allf:
            counts[(str(f["board"]), str(f["kind"]))] = counts.get((str(f["board"]), str(f["kind"])), 0) + 1
        s.append(grouped_bars("regressions per board (fleet check flags and rollbacks at push time)",
                              sorted({k[0] for k in counts}), sorted({k[1] for k in counts}), counts, ylabel="count",
                              integer=True, height=240, css_id="flags"))
        s.append(table(("when", "board", "release", "kind", "value", "threshold", "message"),
                       [(_when(f["ts"]), f["board"], _rel(f["release"]), f["kind"], f["value"] if isinstance(
                           f["value"], (int, float)) else None, f["threshold"] if isinstance(f["threshold"], (int, float))
                         else None, f["message"]) for f in sorted(allf, key=lambda f: -(f["ts"] or 0))[:100]],
                       left=(1, 3, 6), css_id="flag-table", classes=["bad"] * min(len(allf), 100)))
    else:
        s.append("<p class='ok' id='no-flags'>no regressions flagged</p>")
    s += _rollouts_section(d)
    s += _boards_section(store, d)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(page(title, sub, s))
    tmp.replace(out)
    return out


__all__ = ["render_html", "collect", "rollout_outcome", "ReportData"]

