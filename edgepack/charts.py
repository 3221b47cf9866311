"""One small chart module for every HTML report (fleet.html, analyze.html): inline SVG and CSS only,
no script, no font, no CDN, so a page opens offline and can be mailed as one file.

Rules every chart follows, because a report is read by someone deciding whether to ship:
* every string is data (board names, tensor names, messages): escaped, never markup;
* labels never overlap: category labels sit on their own rows (horizontal bars) or are thinned,
  a long label is shortened with the full text in a hover ``<title>``;
* ticks are "nice" numbers, integers on counts, bytes as KB/MB, a log axis where sizes span decades;
* a limit (budget, threshold) is a dashed line named in the legend, and a bar over it is red.

Charts: ``hbars`` (one labelled bar per row), ``grouped_bars`` (groups x series), ``lines``
(series over x, optional log x), ``budgets`` (value against its limit, one row each); helpers
``page``, ``table`` and ``fmt_bytes``.
"""
from __future__ import annotations

import html
import math
from typing import Any, Iterable, Sequence

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
BAD, OK, WARN = "#c62828", "#2e7d32", "#ef6c00"
CHAR_W = 6.2  # px per character at 11px system-ui: enough to keep labels apart

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1040px;color:#222;padding:0 12px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f5f5f5}td.l,th.l{text-align:left}
.ok{color:#2e7d32}.bad{color:#c62828;font-weight:600}.warn{color:#ef6c00;font-weight:600}.muted{color:#777}
svg{background:#fff;border:1px solid #eee;margin:6px 0;display:block}
svg text{font-family:system-ui,sans-serif}.tick{font-size:11px;fill:#444}.label{font-size:12px;fill:#333}
.grid{stroke:#eee}.axis{stroke:#888}.limit{stroke:#c62828;stroke-dasharray:5 4;stroke-width:1.5}
.legend{font-size:11px;fill:#333}.value{font-size:11px;fill:#222}
details{margin:6px 0;border:1px solid #e3e3e3;border-radius:4px;padding:4px 10px}summary{cursor:pointer;font-weight:600}
.pill{display:inline-block;padding:1px 8px;border-radius:9px;font-size:12px;color:#fff}
.pill.ok{background:#2e7d32;color:#fff}.pill.bad{background:#c62828;color:#fff}.pill.warn{background:#ef6c00;color:#fff}
.pill.muted{background:#9e9e9e;color:#fff}
pre{background:#f7f7f7;padding:6px;overflow-x:auto;font-size:12px;max-height:260px}
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt_bytes(n: Any) -> str:
    """1234567 -> '1.23 MB' (decimal units, as OTA budgets are given)."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "–"
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.3g} {unit}"
    return f"{int(n)} B"


def fmt_num(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.{nd}f}".rstrip("0").rstrip(".")
    return str(v)


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (integers only when ``integer``)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        hi = lo + (1 if integer else max(abs(lo) * 0.1, 1e-9))
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, math.ceil(step))
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def _short(label: str, max_chars: int) -> str:
    return label if len(label) <= max_chars else "…" + label[-(max_chars - 1):]


def _svg(width: int, height: int, title: str, body: Iterable[str], css_id: str = "") -> str:
    ident = f' id="{esc(css_id)}"' if css_id else ""
    return (f'<svg{ident} class="chart" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>'
            + "".join(body) + "</svg>")


def _legend(items: Sequence[tuple[str, str, bool]], x: float, y: float, width: float) -> list[str]:
    """Legend entries (name, colour, dashed) laid out left to right, wrapping inside ``width``."""
    out, cx, cy = [], x, y
    for name, color, dashed in items:
        w = 26 + len(name) * CHAR_W
        if cx + w > x + width and cx > x:
            cx, cy = x, cy + 16
        if dashed:
            out.append(f'<line x1="{cx:.1f}" y1="{cy - 4:.1f}" x2="{cx + 16:.1f}" y2="{cy - 4:.1f}" class="limit"/>')
        else:
            out.append(f'<rect x="{cx:.1f}" y="{cy - 10:.1f}" width="12" height="10" fill="{color}"/>')
        out.append(f'<text x="{cx + 20:.1f}" y="{cy:.1f}" class="legend">{esc(name)}</text>')
        cx += w + 12
    return out


def hbars(title: str, rows: Sequence[tuple[str, float]], *, unit: str = "", width: int = 900,
          limit: float | None = None, limit_name: str = "limit", highlight: Sequence[bool] | None = None,
          value_fmt: Any = None, css_id: str = "", lower_is_worse: bool = False) -> str:
    """One horizontal bar per row, its label on its own line (long names never collide). Values
    below zero are drawn from zero; ``limit`` draws a dashed line and bars beyond it turn red."""
    if not rows:
        return ""
    vf = value_fmt or (lambda v: f"{fmt_num(v)}{unit}")
    labels = [str(r[0]) for r in rows]
    longest = max(len(s) for s in labels)
    left = int(min(360, max(90, longest * CHAR_W + 20)))
    max_chars = longest if longest * CHAR_W + 20 <= left else int((left - 20) / CHAR_W)
    bar_h, gap, top = 16, 6, 34
    vals = [float(v) if v is not None and math.isfinite(float(v)) else 0.0 for _, v in rows]
    vmax = max([*vals, limit or 0, 1e-12])
    ticks = nice_ticks(0, vmax, 5)
    span = ticks[-1] or 1
    right = 70
    plot_w = width - left - right
    sx = lambda v: left + plot_w * max(v, 0) / span  # noqa: E731
    h = top + len(rows) * (bar_h + gap) + 28 + (18 if limit is not None else 0)
    axis_y = top + len(rows) * (bar_h + gap) + 20
    out = [f'<text x="{left}" y="18" class="label">{esc(title)}</text>']
    for t in ticks:
        out.append(f'<line x1="{sx(t):.1f}" y1="{top - 6}" x2="{sx(t):.1f}" y2="{axis_y - 14}" class="grid"/>'
                   f'<text x="{sx(t):.1f}" y="{axis_y}" text-anchor="middle" class="tick">{esc(fmt_num(t))}</text>')
    for i, (lab, v) in enumerate(zip(labels, vals)):
        y = top + i * (bar_h + gap)
        over = limit is not None and ((v < limit) if lower_is_worse else (v > limit))
        color = BAD if over or (highlight and highlight[i]) else PALETTE[0]
        out.append(f'<g class="bar-row"><text x="{left - 8}" y="{y + 12}" text-anchor="end" class="tick">'
                   f'<title>{esc(lab)}</title>{esc(_short(lab, max_chars))}</text>'
                   f'<rect class="bar" x="{left}" y="{y}" width="{max(1.0, sx(v) - left):.1f}" height="{bar_h}" '
                   f'fill="{color}"><title>{esc(lab)}: {esc(vf(v))}</title></rect>'
                   f'<text x="{sx(v) + 4:.1f}" y="{y + 12}" class="value">{esc(vf(v))}</text></g>')
    if limit is not None:
        out.append(f'<line x1="{sx(limit):.1f}" y1="{top - 6}" x2="{sx(limit):.1f}" y2="{axis_y - 14}" class="limit"/>')
        out += _legend([(f"{limit_name}" if vf(limit) in limit_name else f"{limit_name}: {vf(limit)}", BAD, True)],
                       left, h - 6, width - left)
    return _svg(width, h, title, out, css_id)


def grouped_bars(title: str, groups: Sequence[str], series: Sequence[str], values: dict[tuple[str, str], float], *,
                 ylabel: str, integer: bool = False, limits: dict[str, float] | None = None,
                 limit_name: str = "budget", width: int = 900, height: int = 300, css_id: str = "") -> str:
    """Vertical bars, one group per category and one bar per series; ``limits`` (per group) draws
    each group's budget as a dashed segment over its bars, and a bar above it is red."""
    if not groups or not series:
        return ""
    limits = limits or {}
    data_max = max([v for v in values.values() if v is not None] + [1e-12])
    # a budget far above every bar would squash the bars flat: it is written above the group instead
    off_scale = {g: v for g, v in limits.items() if v > 3 * data_max}
    limits = {g: v for g, v in limits.items() if g not in off_scale}
    vmax = max([data_max] + list(limits.values()))
    ticks = nice_ticks(0, vmax, 5, integer=integer)
    top_v = ticks[-1] or 1
    left, right, top = 64, 16, 40
    gw = (width - left - right) / len(groups)
    # category labels: shortened to the group's width, thinned when even that cannot fit
    max_chars = max(3, int((gw - 6) / CHAR_W))
    every = 1 if gw >= 4 * CHAR_W else math.ceil(4 * CHAR_W / gw)
    bottom = 44
    y0, y1 = height - bottom, top
    sy = lambda v: y0 - (y0 - y1) * v / top_v  # noqa: E731
    out = [f'<text x="{left}" y="18" class="label">{esc(title)}</text>']
    for t in ticks:
        out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{width - right}" y2="{sy(t):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" class="tick">'
                   f'{esc(fmt_num(int(t)) if integer else fmt_num(t))}</text>')
    out.append(f'<line x1="{left}" y1="{y0}" x2="{width - right}" y2="{y0}" class="axis"/>'
               f'<text x="14" y="{(y0 + y1) / 2:.0f}" transform="rotate(-90 14 {(y0 + y1) / 2:.0f})" '
               f'text-anchor="middle" class="label">{esc(ylabel)}</text>')
    bw = max(2.0, (gw - 10) / len(series))
    for gi, g in enumerate(groups):
        gx = left + gi * gw + 5
        for si, s in enumerate(series):
            v = values.get((g, s))
            if v is None:
                continue
            over = g in limits and v > limits[g]
            color = BAD if over else PALETTE[si % len(PALETTE)]
            out.append(f'<rect class="bar" x="{gx + si * bw:.1f}" y="{sy(v):.1f}" width="{bw - 1:.1f}" '
                       f'height="{max(0.5, y0 - sy(v)):.1f}" fill="{color}"><title>{esc(g)} {esc(s)}: '
                       f'{esc(fmt_num(v))}</title></rect>')
        if g in limits:
            out.append(f'<line x1="{gx - 3:.1f}" y1="{sy(limits[g]):.1f}" x2="{gx + gw - 7:.1f}" '
                       f'y2="{sy(limits[g]):.1f}" class="limit"><title>{esc(g)} {esc(limit_name)} '
                       f'{esc(fmt_num(limits[g]))}</title></line>')
        if g in off_scale:
            note = _short(f"{limit_name} {fmt_num(off_scale[g])} ↑", max_chars)
            out.append(f'<text x="{gx + (gw - 10) / 2:.1f}" y="{y1 - 4}" text-anchor="middle" class="tick offscale">'
                       f'<title>{esc(g)} {esc(limit_name)} {esc(fmt_num(off_scale[g]))} (above the scale)</title>'
                       f'{esc(note)}</text>')
        if gi % every == 0:
            out.append(f'<text x="{gx + (gw - 10) / 2:.1f}" y="{y0 + 16}" text-anchor="middle" class="tick xlabel">'
                       f'<title>{esc(g)}</title>{esc(_short(str(g), max_chars))}</text>')
    leg = [(str(s), PALETTE[i % len(PALETTE)], False) for i, s in enumerate(series)]
    if limits or off_scale:
        leg.append((limit_name, BAD, True))
    out += _legend(leg, left, height - 10, width - left - right)
    return _svg(width, height, title, out, css_id)


def lines(title: str, series: dict[str, Sequence[tuple[float, float]]], *, xlabel: str, ylabel: str,
          log_x: bool = False, limit: float | None = None, limit_name: str = "threshold", x_is_time: bool = False,
          min_span: float = 0.0, width: int = 900, height: int = 280, css_id: str = "") -> str:
    """Series of (x, y) points. ``log_x`` for sizes spanning decades; ``min_span`` keeps the y axis
    from blowing noise up into a trend (a one-sample change on a 0.1-point axis); time on x is
    labelled as dates."""
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and math.isfinite(y)]
    if not pts:
        return ""
    import datetime as dt
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts] + ([limit] if limit is not None else [])
    lo, hi = min(ys), max(ys)
    if hi - lo < min_span:
        mid = (hi + lo) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
        if min(ys) >= 0 > lo:
            lo, hi = 0.0, hi - lo
    yt = nice_ticks(lo, hi, 5)
    fx = (lambda x: math.log10(max(x, 1e-12))) if log_x else (lambda x: x)  # noqa: E731
    xmin, xmax = fx(min(xs)), fx(max(xs))
    if xmax <= xmin:
        xmin, xmax = xmin - 1, xmax + 1
    left, right, top, bottom = 70, 20, 40, 64
    y0, y1 = height - bottom, top
    sx = lambda x: left + (width - left - right) * (fx(x) - xmin) / (xmax - xmin)  # noqa: E731
    sy = lambda y: y0 - (y0 - y1) * (y - yt[0]) / ((yt[-1] - yt[0]) or 1)  # noqa: E731
    out = [f'<text x="{left}" y="18" class="label">{esc(title)}</text>']
    for t in yt:
        out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{width - right}" y2="{sy(t):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" class="tick">{esc(fmt_num(t))}</text>')
    span_t = max(xs) - min(xs)
    tfmt = "%H:%M:%S" if span_t < 3600 else ("%m-%d %H:%M" if span_t < 14 * 86400 else "%Y-%m-%d")
    if log_x:
        if len(set(xs)) <= 8:
            xt = sorted(set(xs))  # few sizes: label each one measured
        else:
            xt = [10 ** k for k in range(math.floor(xmin), math.ceil(xmax) + 1)]
            xt = [x for x in xt if xmin - 1e-9 <= math.log10(x) <= xmax + 1e-9] or sorted(set(xs))
    elif x_is_time:
        xt = [min(xs) + span_t * k / 4 for k in range(5)] if span_t > 0 else [min(xs)]
    else:
        xt = nice_ticks(min(xs), max(xs), 6) if len(set(xs)) > 8 else sorted(set(xs))
    last_end = -1e9
    for x in xt:
        lab = (dt.datetime.fromtimestamp(x).strftime(tfmt) if x_is_time else fmt_num(x))
        half = len(lab) * CHAR_W / 2
        px = min(max(sx(x), left + half), width - half - 2)  # the first and last label stay inside the chart
        if px - half < last_end + 6:
            continue  # would overlap the previous label
        last_end = px + half
        out.append(f'<text x="{px:.1f}" y="{y0 + 16}" text-anchor="middle" class="tick xlabel">{esc(lab)}</text>')
    out.append(f'<line x1="{left}" y1="{y0}" x2="{width - right}" y2="{y0}" class="axis"/>'
               f'<text x="{(left + width - right) / 2:.0f}" y="{y0 + 34}" text-anchor="middle" class="label">'
               f'{esc(xlabel)}{" (log scale)" if log_x else ""}</text>'
               f'<text x="14" y="{(y0 + y1) / 2:.0f}" transform="rotate(-90 14 {(y0 + y1) / 2:.0f})" '
               f'text-anchor="middle" class="label">{esc(ylabel)}</text>')
    if limit is not None:
        out.append(f'<line x1="{left}" y1="{sy(limit):.1f}" x2="{width - right}" y2="{sy(limit):.1f}" class="limit"/>')
    leg = []
    for k, (name, s) in enumerate(series.items()):
        c = PALETTE[k % len(PALETTE)]
        p = [(sx(x), sy(y)) for x, y in sorted(s) if y is not None and math.isfinite(y)]
        if not p:
            continue
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" '
                   f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in p)}"/>')
        out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"><title>{esc(name)}</title></circle>' for a, b in p]
        leg.append((str(name), c, False))
    if limit is not None:
        leg.append((f"{limit_name} {fmt_num(limit)}", BAD, True))
    out += _legend(leg, left, height - 6, width - left - right)
    return _svg(width, height, title, out, css_id)


def budgets(title: str, rows: Sequence[tuple[str, float | None, float | None, str]], *, width: int = 900,
            css_id: str = "budgets") -> str:
    """Each row (name, value, limit, unit) as a bar against its own limit (100 % = the limit), the
    figures written out; over budget is red, unknown is said."""
    rows = [r for r in rows if r[2]]
    if not rows:
        return ""
    left, bar_h, gap, top = 150, 18, 10, 34
    plot_w = width - left - 260
    scale = max([1.0] + [(v or 0) / lim for _, v, lim, _ in rows])
    h = top + len(rows) * (bar_h + gap) + 10
    out = [f'<text x="{left}" y="18" class="label">{esc(title)}</text>']
    x_lim = left + plot_w / scale
    for i, (name, v, lim, unit) in enumerate(rows):
        y = top + i * (bar_h + gap)
        out.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end" class="tick">{esc(name)}</text>'
                   f'<rect x="{left}" y="{y}" width="{plot_w / scale:.1f}" height="{bar_h}" fill="#f1f1f1"/>')
        if v is None:
            out.append(f'<text x="{left + 6}" y="{y + 13}" class="value">not measured here</text>')
            continue
        frac = v / lim
        color = BAD if frac > 1 else (WARN if frac > 0.9 else OK)
        txt = f"{fmt_num(v)} {unit} of {fmt_num(lim)} {unit} ({frac:.0%})" if unit != "bytes" else \
            f"{fmt_bytes(v)} of {fmt_bytes(lim)} ({frac:.0%})"
        out.append(f'<rect class="bar budget" x="{left}" y="{y}" width="{max(1.0, plot_w * frac / scale):.1f}" '
                   f'height="{bar_h}" fill="{color}"><title>{esc(name)}: {esc(txt)}</title></rect>'
                   f'<text x="{left + plot_w + 8}" y="{y + 13}" class="value">{esc(txt)}</text>')
    out.append(f'<line x1="{x_lim:.1f}" y1="{top - 6}" x2="{x_lim:.1f}" y2="{h - 6}" class="limit"/>')
    return _svg(width, h, title, out, css_id)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, left: Sequence[int] = (0,), css_id: str = "",
          classes: Sequence[str] | None = None) -> str:
    """An escaped table; empty input gives nothing (no empty tables in a report)."""
    if not rows:
        return ""
    ident = f' id="{esc(css_id)}"' if css_id else ""
    th = "".join(f'<th class="l">{esc(h)}</th>' if i in left else f"<th>{esc(h)}</th>" for i, h in enumerate(headers))
    body = []
    for k, r in enumerate(rows):
        cls = f' class="{esc(classes[k])}"' if classes and classes[k] else ""
        tds = "".join(f'<td class="l">{_cell(c)}</td>' if i in left else f"<td>{_cell(c)}</td>" for i, c in enumerate(r))
        body.append(f"<tr{cls}>{tds}</tr>")
    return f"<table{ident}><tr>{th}</tr>{''.join(body)}</table>"


class Raw(str):
    """Markup made by this module or a report (a pill, a link): inserted as is, not escaped."""


def _cell(c: Any) -> str:
    if isinstance(c, Raw):
        return str(c)
    return esc(fmt_num(c) if isinstance(c, float) or c is None else c)


def pill(text: str, kind: str) -> Raw:
    return Raw(f'<span class="pill {esc(kind)}">{esc(text)}</span>')


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<meta name='viewport' content='width=device-width'><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class='muted'>{esc(subtitle)}</p>{''.join(s for s in sections if s)}"
            "</body></html>\n")


__all__ = ["hbars", "grouped_bars", "lines", "budgets", "table", "page", "pill", "Raw", "fmt_bytes", "fmt_num",
           "nice_ticks", "esc", "CSS"]
