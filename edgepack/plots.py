"""Tiny self-contained SVG charts for HTML reports (no JavaScript, no CDN, prints anywhere)."""
from __future__ import annotations

import html
from typing import Sequence


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float], *, unit: str = "",
              width: int = 760, bar_h: int = 16, highlight: Sequence[bool] | None = None) -> str:
    """Horizontal bars, one per label, values >= 0 scaled to the largest."""
    n = len(values)
    if n == 0:
        return f"<h3>{html.escape(title)}</h3><p>(no data)</p>"
    left, right = 300, 80
    vmax = max(max(values), 1e-12)
    h = n * (bar_h + 4) + 30
    rows = []
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = 24 + i * (bar_h + 4)
        w = max(1.0, (width - left - right) * max(v, 0) / vmax)
        color = "#d9534f" if highlight and highlight[i] else "#4a7bd0"
        rows.append(f'<text x="{left - 6}" y="{y + bar_h - 4}" text-anchor="end" font-size="11">'
                    f'{html.escape(str(lab)[-48:])}</text>'
                    f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>'
                    f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 4}" font-size="11">{v:.3g}{unit}</text>')
    return (f'<h3>{html.escape(title)}</h3><svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" '
            f'role="img" aria-label="{html.escape(title)}">{"".join(rows)}</svg>')


def line_chart(title: str, xs: Sequence[float], series: dict[str, Sequence[float]], *, xlabel: str = "",
               ylabel: str = "", width: int = 760, height: int = 260) -> str:
    """Lines over a shared x axis (points marked); axes annotated with min/max."""
    if not xs or not series:
        return f"<h3>{html.escape(title)}</h3><p>(no data)</p>"
    colors = ["#4a7bd0", "#d9534f", "#5cb85c", "#f0ad4e", "#6f42c1"]
    allv = [v for s in series.values() for v in s if v == v]
    lo, hi = min(allv), max(allv)
    if hi == lo:
        hi = lo + 1
    x0, x1, y0, y1 = 60, width - 20, height - 40, 20
    xmin, xmax = min(xs), max(xs)
    sx = lambda x: x0 + (x1 - x0) * ((x - xmin) / (xmax - xmin) if xmax > xmin else 0.5)  # noqa: E731
    sy = lambda y: y0 - (y0 - y1) * (y - lo) / (hi - lo)  # noqa: E731
    parts = [f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#333"/>',
             f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#333"/>',
             f'<text x="{x0 - 4}" y="{y0}" text-anchor="end" font-size="11">{lo:.3g}</text>',
             f'<text x="{x0 - 4}" y="{y1 + 8}" text-anchor="end" font-size="11">{hi:.3g}</text>',
             f'<text x="{(x0 + x1) / 2}" y="{height - 8}" text-anchor="middle" font-size="11">{html.escape(xlabel)}</text>',
             f'<text x="12" y="{(y0 + y1) / 2}" font-size="11" transform="rotate(-90 12 {(y0 + y1) / 2})">'
             f'{html.escape(ylabel)}</text>']
    for x in xs:
        parts.append(f'<text x="{sx(x):.1f}" y="{y0 + 14}" text-anchor="middle" font-size="10">{x:g}</text>')
    for k, (name, ys) in enumerate(series.items()):
        c = colors[k % len(colors)]
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys) if y == y)
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{pts}"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>' for x, y in zip(xs, ys) if y == y]
        parts.append(f'<text x="{x1 - 150}" y="{y1 + 14 * (k + 1)}" font-size="11" fill="{c}">{html.escape(name)}</text>')
    return (f'<h3>{html.escape(title)}</h3><svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="{html.escape(title)}">{"".join(parts)}</svg>')


def page(title: str, sections: Sequence[str]) -> str:
    css = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
           "th{background:#f4f4f4}h1{font-size:22px}h2{font-size:18px;margin-top:1.6em}h3{font-size:14px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.4g}"
    return str(c)
