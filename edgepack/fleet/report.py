"""``edgepack report --html``: one self-contained HTML page from the fleet store.

No scripts, no fonts, no CDN: inline CSS and inline SVG only, so the page opens offline and can be
mailed or archived as one file. Plots: p90 latency per board and release, top-1 drift over time,
flagged regressions per board; tables: boards, rollouts, flags.
"""
from __future__ import annotations

import datetime as dt
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .agent_client import agent_error
from .thresholds import DEFAULT_MAX_DRIFT
from .store import Store

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any, nd: int = 3) -> str:
    """A figure for a table cell, HTML-escaped: every value may come from a board."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return _e(f"{v:.{nd}f}")
    return _e(v)


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    import math
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * e:
            return m * e
    return 10 * e


def _axes(w: int, h: int, pad: dict[str, int], ymax: float, ylabel: str, ticks: int = 4) -> list[str]:
    out = []
    x0, y0, y1 = pad["l"], h - pad["b"], pad["t"]
    for i in range(ticks + 1):
        y = y0 - (y0 - y1) * i / ticks
        v = ymax * i / ticks
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{w - pad["r"]}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{v:.3g}</text>')
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{w - pad["r"]}" y2="{y0}" class="axis"/>')
    out.append(f'<text x="14" y="{(y0 + y1) / 2:.0f}" transform="rotate(-90 14 {(y0 + y1) / 2:.0f})" '
               f'text-anchor="middle" class="label">{_e(ylabel)}</text>')
    return out


def bar_chart(groups: list[str], series: list[str], values: dict[tuple[str, str], float], *, title: str,
              ylabel: str, width: int = 860, height: int = 300, css_id: str = "chart") -> str:
    """Grouped bars: one group per x label, one bar per series."""
    pad = {"l": 60, "r": 150, "t": 30, "b": 60}
    vmax = _nice_max(max(values.values(), default=0) * 1.05)
    out = [f'<svg id="{css_id}" role="img" aria-label="{_e(title)}" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}"><title>{_e(title)}</title>',
           f'<text x="{width / 2}" y="18" text-anchor="middle" class="title">{_e(title)}</text>']
    out += _axes(width, height, pad, vmax, ylabel)
    pw = width - pad["l"] - pad["r"]
    gw = pw / max(len(groups), 1)
    bw = max(min(gw * 0.8 / max(len(series), 1), 40), 2)
    y0, ph = height - pad["b"], height - pad["b"] - pad["t"]
    for gi, g in enumerate(groups):
        gx = pad["l"] + gi * gw + (gw - bw * len(series)) / 2
        for si, s in enumerate(series):
            v = values.get((g, s))
            if v is None:
                continue
            bh = ph * v / vmax
            out.append(f'<rect class="bar" x="{gx + si * bw:.1f}" y="{y0 - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" '
                       f'fill="{PALETTE[si % len(PALETTE)]}"><title>{_e(g)} / {_e(s)}: {v:.4g}</title></rect>')
        out.append(f'<text x="{pad["l"] + gi * gw + gw / 2:.1f}" y="{y0 + 14}" text-anchor="end" class="tick" '
                   f'transform="rotate(-35 {pad["l"] + gi * gw + gw / 2:.1f} {y0 + 14})">{_e(g)}</text>')
    for si, s in enumerate(series):
        y = pad["t"] + 14 * si + 6
        out.append(f'<rect x="{width - pad["r"] + 12}" y="{y - 8}" width="10" height="10" fill="{PALETTE[si % len(PALETTE)]}"/>'
                   f'<text x="{width - pad["r"] + 26}" y="{y + 1}" class="tick">{_e(s)}</text>')
    out.append("</svg>")
    return "".join(out)


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, ylabel: str, width: int = 860,
               height: int = 300, css_id: str = "lines", threshold: float | None = None) -> str:
    """x = time (epoch seconds), one polyline per series."""
    pad = {"l": 60, "r": 150, "t": 30, "b": 50}
    pts = [p for s in series.values() for p in s]
    vmax = _nice_max(max([p[1] for p in pts] + [threshold or 0], default=0) * 1.1 or 0.05)
    tmin = min((p[0] for p in pts), default=0.0)
    tmax = max((p[0] for p in pts), default=1.0)
    span = (tmax - tmin) or 1.0
    pw, ph = width - pad["l"] - pad["r"], height - pad["t"] - pad["b"]
    y0 = height - pad["b"]

    def xy(t: float, v: float) -> tuple[float, float]:
        return pad["l"] + pw * (t - tmin) / span, y0 - ph * v / vmax

    out = [f'<svg id="{css_id}" role="img" aria-label="{_e(title)}" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}"><title>{_e(title)}</title>',
           f'<text x="{width / 2}" y="18" text-anchor="middle" class="title">{_e(title)}</text>']
    out += _axes(width, height, pad, vmax, ylabel)
    if threshold is not None:
        _, ty = xy(tmin, threshold)
        out.append(f'<line x1="{pad["l"]}" y1="{ty:.1f}" x2="{width - pad["r"]}" y2="{ty:.1f}" class="threshold"/>'
                   f'<text x="{width - pad["r"] - 4}" y="{ty - 4:.1f}" text-anchor="end" class="tick">threshold {threshold:g}</text>')
    for i, (name, s) in enumerate(sorted(series.items())):
        c = PALETTE[i % len(PALETTE)]
        s = sorted(s)
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(t, v) for t, v in s))
        if len(s) > 1:
            out.append(f'<polyline class="series" fill="none" stroke="{c}" stroke-width="2" points="{coords}"/>')
        for t, v in s:
            x, y = xy(t, v)
            out.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{c}"><title>{_e(name)} '
                       f'{dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")}: {v:.4g}</title></circle>')
        yl = pad["t"] + 14 * i + 6
        out.append(f'<rect x="{width - pad["r"] + 12}" y="{yl - 8}" width="10" height="10" fill="{c}"/>'
                   f'<text x="{width - pad["r"] + 26}" y="{yl + 1}" class="tick">{_e(name)}</text>')
    for t in (tmin, tmax):
        x, _ = xy(t, 0)
        out.append(f'<text x="{x:.1f}" y="{y0 + 16}" text-anchor="middle" class="tick">'
                   f'{dt.datetime.fromtimestamp(t).strftime("%m-%d %H:%M:%S")}</text>')
    out.append("</svg>")
    return "".join(out)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1000px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.bad{color:#b00020;font-weight:600}.ok{color:#1b7f2a}.muted{color:#777}
svg{background:#fff;border:1px solid #eee;margin:6px 0}
.grid{stroke:#eee}.axis{stroke:#888}.tick{font-size:11px;fill:#444}.label{font-size:12px;fill:#333}
.title{font-size:14px;font-weight:600;fill:#222}.threshold{stroke:#b00020;stroke-dasharray:4 3}
"""


@dataclass
class ReportData:
    latency: dict[tuple[str, str], float]
    boards: list[str]
    releases: list[str]
    drift: dict[str, list[tuple[float, float]]]
    flags: list[dict[str, Any]]
    rollouts: list[dict[str, Any]]
    status: list[dict[str, Any]]


def collect(store: Store) -> ReportData:
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
    boards = store.boards()
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
                       "drift": ev.drift if ev else (ins.drift if ins else None)})
    return ReportData({k: v[1] for k, v in lat.items()}, boards, releases, drift, store.flags(), store.rollouts(), status)


def render_html(store: Store, out: str | Path, *, title: str = "edgepack fleet report", max_drift: float = DEFAULT_MAX_DRIFT) -> Path:
    d = collect(store)
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<meta name='viewport' content='width=device-width'><style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1><p class='muted'>generated {now} from {_e(store.path.name)}: "
             f"{len(d.boards)} boards, {len(d.rollouts)} rollouts, {len(d.flags)} flagged regressions</p>"]
    parts.append("<h2>Latency per board and release</h2>")
    if d.latency:
        parts.append(bar_chart(d.boards, d.releases, d.latency, title="p90 latency (ms) per board and release",
                               ylabel="p90 ms", css_id="latency"))
    else:
        parts.append("<p class='muted'>no latency figures yet (push a release or run `edgepack fleet check`)</p>")
    parts.append("<h2>Top-1 drift over time</h2>")
    if d.drift:
        parts.append(line_chart(d.drift, title="top-1 drift vs the host's reference", ylabel="1 - top-1 agreement",
                                css_id="drift", threshold=max_drift))
    else:
        parts.append("<p class='muted'>no drift figures yet</p>")
    parts.append("<h2>Flagged regressions</h2>")
    if d.flags:
        counts: dict[tuple[str, str], float] = {}
        kinds = sorted({f["kind"] for f in d.flags})
        fb = sorted({f["board"] for f in d.flags})
        for f in d.flags:
            counts[(f["board"], f["kind"])] = counts.get((f["board"], f["kind"]), 0) + 1
        parts.append(bar_chart(fb, kinds, counts, title="flags per board", ylabel="count", css_id="flags", height=240))
        parts.append("<table id='flag-table'><tr><th>when</th><th>board</th><th>release</th><th>kind</th><th>value</th>"
                     "<th>threshold</th><th>message</th></tr>")
        for f in d.flags[:100]:
            parts.append(f"<tr class='bad'><td>{dt.datetime.fromtimestamp(f['ts']):%Y-%m-%d %H:%M}</td><td>{_e(f['board'])}</td>"
                         f"<td>{_e(f['release'])}</td><td>{_e(f['kind'])}</td><td>{_fmt(f['value'])}</td>"
                         f"<td>{_fmt(f['threshold'])}</td><td style='text-align:left'>{_e(f['message'])}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class='ok' id='no-flags'>no regressions flagged</p>")
    parts.append("<h2>Boards</h2><table id='boards'><tr><th>board</th><th>release</th><th>last install</th>"
                 "<th>p90 ms</th><th>drift</th><th>last seen</th></tr>")
    for s in d.status:
        seen = dt.datetime.fromtimestamp(s["last_seen"]).strftime("%Y-%m-%d %H:%M") if s["last_seen"] else "–"
        parts.append(f"<tr><td>{_e(s['board'])}</td><td>{_fmt(s['release'])}</td><td>{_e(s['last_install'] or '–')}</td>"
                     f"<td>{_fmt(s['p90_ms'])}</td><td>{_fmt(s['drift'])}</td><td>{seen}</td></tr>")
    parts.append("</table><h2>Rollouts</h2><table id='rollouts'><tr><th>#</th><th>when</th><th>release</th>"
                 "<th>boards</th><th>committed</th><th>bytes sent</th><th>result</th></tr>")
    for r in d.rollouts:
        rep = r["report"] if isinstance(r["report"], dict) else {}
        bs = [b for b in rep.get("boards", []) if isinstance(b, dict)] if isinstance(rep.get("boards"), list) else []
        res = f"<span class='bad'>halted: {_e((r['reason'] or '')[:160])}</span>" if r["halted"] else "<span class='ok'>complete</span>"
        parts.append(f"<tr><td>{_e(r['id'])}</td><td>{dt.datetime.fromtimestamp(r['ts']):%Y-%m-%d %H:%M}</td>"
                     f"<td>{_e(r['release'])}</td><td>{len(bs)}</td><td>{sum(b.get('result') == 'committed' for b in bs)}</td>"
                     f"<td>{_e(rep.get('bytes_sent', '–'))}</td><td style='text-align:left'>{res}</td></tr>")
    parts.append("</table></body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text("".join(parts))
    tmp.replace(out)
    return out


__all__ = ["render_html", "collect", "bar_chart", "line_chart"]
