"""``edgepack analyze --html``: the quantization analysis as a page a user can act on.

Read top to bottom: the board budgets (size, RAM) as bars against their limits; the findings; the
layers ranked by how much quantizing each alone costs (SQNR, dB: higher is better); the graph read
layer by layer like Netron's (op, dtype, where it runs on the target, SQNR of its output); the
tensors with the lowest SQNR by name; activation outliers; calibration size on a log axis and
coverage. Empty sections are left out. Charts come from ``edgepack.charts``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..charts import budgets, esc, fmt_bytes, hbars, lines, page, pill, table


def _target(name: str) -> Any:
    from ..errors import EdgepackError
    from ..targets import load_target
    try:
        return load_target(name)
    except EdgepackError:
        return None


def _budget_section(r: Any, t: Any) -> str:
    if t is None:
        return ""
    rows = [("OTA bundle (model)", r.int8_size_bytes, t.ota_budget_mb * 1e6, "bytes"),
            ("model RAM (weights)", r.int8_size_bytes, t.model_ram_mb * 1e6, "bytes"),
            ("latency", None, t.latency_ms, "ms")]
    chart = budgets(f"{t.name} budgets (dashed: the limit; latency is measured by `edgepack quantize`)", rows)
    return "<h2>Board budgets</h2>" + chart if chart else ""


def _layer_view(r: Any) -> str:
    """Every op in graph order: what it is, the dtype it computes in, the unit it runs on, the SQNR of
    what it produces (the ops the QDQ builder folded into their producer show no SQNR of their own)."""
    sq = {t["tensor"]: t["sqnr_db"] for t in r.tensor_sqnr}
    sens = {l.name: l for l in r.layers}
    rows, cls = [], []
    for n in r.placement.nodes:
        s = sq.get(n["output"])
        l = sens.get(n["name"])
        unit = pill(f"{n['unit']} {n['dtype']}", "ok" if n["dtype"] == "int8" else "warn")
        rows.append((n["name"], n["op"], unit, s, l.alone_sqnr_db if l else None,
                     l.alone_drop if l else None, l.role if l else ""))
        cls.append("warn" if (s is not None and s < 20) else "")
    if not rows:
        return ""
    return ("<h2>Layer by layer</h2><p class='muted'>graph order; unit and dtype on this target; SQNR of the op's "
            "output in the full INT8 model (dB, higher is better; under 20 dB marked); 'alone' = only this layer "
            "quantized.</p>" + table(("layer", "op", "runs as", "output SQNR dB", "alone SQNR dB", "alone drop",
                                      "role"), rows, left=(0, 1, 2, 6), css_id="layers", classes=cls))


def render(r: Any) -> str:
    t = _target(r.target)
    sections = [f"<p id='summary'>full INT8 ({esc(r.metric)}) drop <b>{r.int8_drop:.2f}</b> points, logits SQNR "
                f"<b>{r.int8_sqnr_db} dB</b> on {r.eval_samples} samples; size {fmt_bytes(r.fp32_size_bytes)} -> "
                f"{fmt_bytes(r.int8_size_bytes)}; analysis took {r.seconds:.0f} s.</p>",
                _budget_section(r, t)]
    if r.findings:
        sections.append("<h2>Findings</h2><ul>" + "".join(f"<li>{esc(f)}</li>" for f in r.findings) + "</ul>")
    if r.layers:
        worst = r.layers[:30]
        sections.append("<h2>Per-layer sensitivity</h2>" + hbars(
            "logits SQNR with only this layer in INT8 (dB, higher is better; red: below 20 dB)",
            [(f"{l.name} [{l.role}]", l.alone_sqnr_db) for l in worst], unit=" dB", limit=20.0,
            limit_name="20 dB", lower_is_worse=True, css_id="sensitivity"))
        if any(l.float_gain is not None for l in worst):
            sections.append(table(("layer", "op", "role", "alone SQNR dB", "alone drop", "gain if kept float"),
                                  [(l.name, l.op, l.role, l.alone_sqnr_db, l.alone_drop, l.float_gain)
                                   for l in worst if l.float_gain is not None], left=(0, 1, 2)))
    sections.append(_layer_view(r))
    if r.tensor_sqnr:
        low = sorted(r.tensor_sqnr, key=lambda x: x["sqnr_db"])[:25]
        sections.append("<h2>Tensors with the lowest SQNR</h2>" + hbars(
            f"SQNR of each tensor in the full INT8 model, lowest {len(low)} of {len(r.tensor_sqnr)} (dB)",
            [(x["tensor"], x["sqnr_db"]) for x in low], unit=" dB", limit=20.0, limit_name="20 dB",
            lower_is_worse=True, css_id="tensor-sqnr"))
    if r.outliers:
        sections.append("<h2>Activation outliers per channel</h2>" + hbars(
            "largest / median channel range (per-tensor INT8 spends its levels on the largest)",
            [(f"{o.tensor} [{o.role}]", o.ratio) for o in r.outliers], unit="x", css_id="outliers"))
    if r.size_sweep:
        pts = [(s["samples"], s["drop"]) for s in r.size_sweep]
        sections.append("<h2>Calibration data</h2>" + lines(
            "accuracy drop vs calibration set size", {"drop (points)": pts}, xlabel="calibration samples",
            ylabel="drop (points)", log_x=True, min_span=1.0, css_id="sweep"))
    if r.coverage_worst:
        sections.append(table(("tensor", "calibrated range", "evaluation range", "evaluation values outside"),
                              [(c.tensor, f"{c.calib_range[0]:.3g}..{c.calib_range[1]:.3g}",
                                f"{c.eval_range[0]:.3g}..{c.eval_range[1]:.3g}", f"{c.outside_fraction * 100:.3f} %")
                               for c in r.coverage_worst], left=(0,), css_id="coverage"))
    p = r.placement
    sections.append("<h2>Placement on the target</h2>" + table(
        ("INT8 nodes", "CPU fallback nodes", "islands", "transfer cost ms", "MatMul/Gemm in INT8"),
        [(p.int8_nodes, p.fallback_nodes, p.islands, p.estimated_transfer_ms,
          f"{p.matmul_gemm_int8}/{p.matmul_gemm_total}")], css_id="placement"))
    sections.append(table(("fallback op", "count"), list(p.fallback_ops.items()), css_id="fallback"))
    name = Path(r.model).name
    return page(f"edgepack analyze: {name} on {r.target}", f"model {name}, target {r.target}, {r.eval_samples} "
                f"evaluation samples", sections)


__all__ = ["render"]
