"""Why does INT8 hurt this model on this board? A structured quantization debugging report.

Four views, each measured on the real model and data:

- calibration data: does the calibration set cover the activation ranges the evaluation data
  produces (per tensor: share of evaluation values outside the calibrated range), and how the
  quantized model's output quality changes with the calibration set's size;
- per-layer sensitivity: each weight layer quantized *alone* (the rest float) - its own cost -
  and, for the worst, the full INT8 model with *that one layer kept in float* - the gain of
  rescuing it; plus the SQNR of every tensor in the full INT8 model;
- activation outliers per channel: the ratio of the largest channel's range to the median
  channel's, with the tensor's role (embeddings, attention, LayerNorm, GELU, first/last layer);
- placement: which ops the target's accelerator runs in INT8 and which fall back to the CPU,
  the number of float islands and their transfer cost.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from .calibrate import _exposing_session, activation_tensors, collect
from . import graph
from ..data import Dataset
from .evaluate import compare, predict, session
from ..modelinfo import WEIGHT_OPS, check_samples, load_model
from .qdq import QDQBuilder, preprocess_model
from ..targets import Target

ROLE_PATTERNS = [("attention", re.compile(r"attention|attn|softmax|query|key|value", re.I)),
                 ("LayerNorm", re.compile(r"layernorm|layer_norm|LayerNormalization", re.I)),
                 ("GELU", re.compile(r"gelu|intermediate.*act|Erf", re.I)),
                 ("embeddings", re.compile(r"embedding", re.I)),
                 ("classifier", re.compile(r"classifier|pooler|fc|logits", re.I))]


@dataclass
class LayerSensitivity:
    name: str
    op: str
    role: str
    alone_sqnr_db: float          # logits SQNR with only this layer quantized
    alone_drop: float             # accuracy/agreement drop with only this layer quantized (points)
    float_gain: float | None = None  # drop reduction when this layer alone stays float in full INT8


@dataclass
class OutlierTensor:
    tensor: str
    producer: str
    op: str
    role: str
    channels: int
    max_abs: float
    worst_channel: int
    ratio: float                  # largest channel absmax / median channel absmax


@dataclass
class Coverage:
    tensor: str
    calib_range: tuple[float, float]
    eval_range: tuple[float, float]
    outside_fraction: float       # share of evaluation values outside the calibrated range


@dataclass
class Placement:
    int8_nodes: int
    fallback_nodes: int
    fallback_ops: dict[str, int]
    islands: int
    estimated_transfer_ms: float
    matmul_gemm_int8: int
    matmul_gemm_total: int
    nodes: list[dict] = field(default_factory=list)  # per op in graph order: name, op, output, dtype, unit


@dataclass
class AnalysisReport:
    model: str
    target: str
    metric: str
    fp32_top1: float | None
    int8_drop: float
    int8_sqnr_db: float
    eval_samples: int
    coverage_worst: list[Coverage]
    coverage_mean_outside: float
    size_sweep: list[dict]
    layers: list[LayerSensitivity]
    tensor_sqnr: list[dict]
    outliers: list[OutlierTensor]
    placement: Placement
    findings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    fp32_size_bytes: int | None = None
    int8_size_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def role_of(name: str, op: str, index: int, last: int) -> str:
    if index == 0:
        return "first layer"
    if index == last:
        return "last layer"
    for role, pat in ROLE_PATTERNS:
        if pat.search(name) or pat.search(op):
            return role
    return op


def _channel_axis(shape: tuple) -> int:
    return 1 if len(shape) == 4 else len(shape) - 1


def placement_of(qdq: onnx.ModelProto, target: Target) -> Placement:
    """Which nodes of a QDQ model the target's INT8 accelerator can take.

    A node runs in INT8 when every float input comes from a DequantizeLinear, its outputs feed
    QuantizeLinear (or are graph outputs), and the accelerator lists its op type. Everything else
    falls back to a float unit; each connected fallback region is one island (one round trip)."""
    acc = next((u for u in target.compute if u.kind in ("npu", "dsp", "gpu") and "int8" in u.dtypes), None)
    cpu = next((u for u in target.compute if u.kind == "cpu"), None)
    ops = set(acc.int8_ops) if acc and acc.int8_ops else None
    producers, consumers = graph.producers(qdq), graph.consumers(qdq)
    inits = {i.name for i in qdq.graph.initializer}
    graph_out = {o.name for o in qdq.graph.output}
    fallback, int8 = [], 0
    nodes: list[dict] = []
    for n in qdq.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            continue
        ins = [i for i in n.input if i and i not in inits]
        q_in = all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in ins)
        q_out = all(o in graph_out or all(c.op_type == "QuantizeLinear" for c in consumers.get(o, [])) for o in n.output)
        if q_in and q_out and (ops is None or n.op_type in ops):
            int8 += 1
            unit, dtype = (acc.kind.upper() if acc else (cpu.kind.upper() if cpu else "CPU")), "int8"
        else:
            fallback.append(n)
            unit, dtype = "CPU" if acc else (cpu.kind.upper() if cpu else "CPU"), "float"
        nodes.append({"name": n.name, "op": n.op_type, "output": n.output[0] if n.output else "", "dtype": dtype,
                      "unit": unit})
    fb_names = {n.name for n in fallback}
    # islands: connected components of fallback nodes (through any tensor path of QDQ pairs)
    parent = {n: n for n in fb_names}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def upstream(t: str, depth: int = 0):
        p = producers.get(t)
        if p is None or depth > 4:
            return None
        if p.name in fb_names:
            return p.name
        if p.op_type in ("QuantizeLinear", "DequantizeLinear"):
            return upstream(p.input[0], depth + 1)
        return None

    for n in fallback:
        for i in n.input:
            u = upstream(i)
            if u:
                parent[find(u)] = find(n.name)
    islands = len({find(x) for x in fb_names})
    cost = (cpu.fallback_cost_ms if cpu else 0.0) * islands if acc else 0.0
    counts: dict[str, int] = {}
    for n in fallback:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    mm = [n for n in qdq.graph.node if n.op_type in ("MatMul", "Gemm")]
    mm_q = [n for n in mm if n.name not in fb_names]
    mm_int = [n for n in qdq.graph.node if n.op_type in ("MatMulInteger", "QLinearMatMul", "QGemm")]
    return Placement(int8, len(fallback), dict(sorted(counts.items(), key=lambda kv: -kv[1])), islands,
                     round(cost, 3), len(mm_q) + len(mm_int), len(mm) + len(mm_int), nodes)


def analyze(model_path: str | Path, target: Target, calib: Dataset, evaluation: Dataset, *,
            method: str = "percentile", max_eval: int = 256, top_float: int = 6,
            sweep: tuple[int, ...] = (8, 16, 32, 64, 128, 256),
            progress: Callable[[str, int, int], None] | None = None) -> AnalysisReport:
    """Run every analysis; ``max_eval`` bounds the evaluation samples used per measurement."""
    t0 = time.perf_counter()
    prog = progress or (lambda *a: None)
    info = load_model(model_path)
    check_samples(info, calib, "calibration")
    check_samples(info, evaluation, "evaluation")
    ev = evaluation.subset(np.arange(min(max_eval, len(evaluation))), evaluation.name)
    work = Path(tempfile.mkdtemp(prefix="edgepack-a-"))
    try:
        pre = preprocess_model(info, work)
        pre_path = work / "pre.onnx"
        ref = predict(session(info.path), ev)
        prog("calibrating", 0, 1)
        cal = collect(pre, calib, info.input_names)
        b = QDQBuilder(pre_path, cal, target, work, None)
        full = b.build(method, [])
        full_logits = predict(session(full), ev)
        base = compare(ref, full_logits, ev.labels)
        findings: list[str] = []

        # --- calibration coverage on the evaluation data
        ranges = cal.ranges(method)
        names = [n for n in activation_tensors(pre) if n in ranges]
        s = _exposing_session(pre, names, 0)
        outside = {n: 0 for n in names}
        total = {n: 0 for n in names}
        elo = {n: np.inf for n in names}
        ehi = {n: -np.inf for n in names}
        for _, feed in ev.feeds(16, info.input_names):
            for n, y in zip(names, s.run(names, feed)):
                if not isinstance(y, np.ndarray) or y.dtype.kind != "f" or y.size == 0:
                    continue
                lo, hi = ranges[n]
                outside[n] += int(((y < lo) | (y > hi)).sum())
                total[n] += y.size
                elo[n], ehi[n] = min(elo[n], float(y.min())), max(ehi[n], float(y.max()))
        cov = [Coverage(n, tuple(map(float, ranges[n])), (elo[n], ehi[n]), outside[n] / total[n])
               for n in names if total[n]]
        cov.sort(key=lambda c: c.outside_fraction, reverse=True)
        mean_out = float(np.mean([c.outside_fraction for c in cov])) if cov else 0.0
        if cov and cov[0].outside_fraction > 0.01:
            findings.append(f"calibration does not cover the evaluation data: {cov[0].outside_fraction * 100:.1f} % of "
                            f"{cov[0].tensor}'s evaluation values fall outside the calibrated range")

        # --- calibration size sweep
        sizes = [n for n in sweep if n < len(calib)] + [len(calib)]
        size_sweep = []
        for i, n in enumerate(sizes):
            prog("calibration size sweep", i, len(sizes))
            c_n = collect(pre, calib.subset(np.arange(n)), info.input_names)
            bn = QDQBuilder(pre_path, c_n, target, work / f"s{n}", None)
            (work / f"s{n}").mkdir(exist_ok=True)
            cmp_n = compare(ref, predict(session(bn.build(method, [])), ev), ev.labels)
            size_sweep.append({"samples": n, "drop": round(cmp_n.drop, 3), "sqnr_db": round(cmp_n.output_sqnr_db, 2)})

        # --- per-layer: quantized alone, then kept float in the full model for the worst
        weight_nodes = [n for n in pre.graph.node if n.op_type in WEIGHT_OPS]
        layers = []
        for i, n in enumerate(weight_nodes):
            prog("one layer at a time", i, len(weight_nodes))
            c = compare(ref, predict(session(b.build(method, [], only=[n.name])), ev), ev.labels)
            layers.append(LayerSensitivity(n.name, n.op_type, role_of(n.name, n.op_type, i, len(weight_nodes) - 1),
                                           round(c.output_sqnr_db, 2), round(c.drop, 3)))
        layers.sort(key=lambda l: l.alone_sqnr_db)
        for i, l in enumerate(layers[:top_float]):
            prog("keep one layer in float", i, top_float)
            c = compare(ref, predict(session(b.build(method, [l.name])), ev), ev.labels)
            l.float_gain = round(base.drop - c.drop, 3)

        # --- per-tensor SQNR in the full INT8 model (simulated arithmetic, optimizations off)
        fq = onnx.load(str(full))
        q_names = {o for nd in fq.graph.node for o in nd.output}
        q_nodes = {nd.name for nd in fq.graph.node}
        fused_pre = {i for nd in pre.graph.node if nd.op_type in ("Relu", "Clip") and nd.name not in q_nodes
                     for i in nd.input[:1]}  # inputs of activations the QDQ model folded away
        common = [n for n in names if n in q_names and n not in info.input_names and n not in fused_pre]
        # compare what the next op sees: the dequantized value where the tensor is quantized
        seen = [f"{n}_DequantizeLinear_Output" if f"{n}_DequantizeLinear_Output" in q_names else n for n in common]
        _, feed = next(ev.feeds(min(16, len(ev)), info.input_names))
        r1 = _exposing_session(pre, common, 0).run(common, feed)
        r2 = _exposing_session(fq, seen, 0).run(seen, feed)
        tensor_sqnr = []
        for n, a, q in zip(common, r1, r2):
            if a.dtype.kind != "f":
                continue
            err = float(((a.astype(np.float64) - q) ** 2).sum())
            sig = float((a.astype(np.float64) ** 2).sum())
            tensor_sqnr.append({"tensor": n, "sqnr_db": round(10 * np.log10(sig / err), 2) if err > 0 else 99.0})

        # --- activation outliers per channel
        producers = graph.producers(pre)
        order = {nd.name: k for k, nd in enumerate(pre.graph.node)}
        last = len(pre.graph.node) - 1
        outl = []
        for n, a in zip(common, r1):
            if a.ndim < 2 or a.dtype.kind != "f":
                continue
            ax = _channel_axis(a.shape)
            ch = np.abs(np.moveaxis(a, ax, -1).reshape(-1, a.shape[ax])).max(0)
            if len(ch) < 4:
                continue
            med = float(np.median(ch)) or 1e-12
            p = producers.get(n)
            outl.append(OutlierTensor(n, p.name if p else "", p.op_type if p else "", role_of(
                n, p.op_type if p else "", order.get(p.name, 1) if p else 1, last), len(ch), float(ch.max()),
                int(ch.argmax()), round(float(ch.max()) / med, 2)))
        outl.sort(key=lambda o: o.ratio, reverse=True)
        if outl and outl[0].ratio > 20:
            findings.append(f"activation outliers: {outl[0].tensor} ({outl[0].role}) has a channel {outl[0].ratio:.0f}x "
                            "the median channel range; per-tensor INT8 spends its levels on it (SmoothQuant-style "
                            "scale migration moves it into the weights)")
        pl = placement_of(fq, target)
        if pl.fallback_nodes:
            findings.append(f"{pl.fallback_nodes} op(s) fall back to the CPU on {target.name} "
                            f"({', '.join(f'{k} x{v}' for k, v in list(pl.fallback_ops.items())[:5])}), "
                            f"{pl.islands} island(s), ~{pl.estimated_transfer_ms} ms of transfers")
        worst = layers[0] if layers else None
        if worst:
            findings.append(f"most sensitive layer quantized alone: {worst.name} ({worst.role}), logits SQNR "
                            f"{worst.alone_sqnr_db} dB, drop {worst.alone_drop} points")
        return AnalysisReport(str(info.path), target.name, base.metric, base.fp32_top1, round(base.drop, 3),
                              round(base.output_sqnr_db, 2), len(ev), cov[:15], round(mean_out, 6), size_sweep,
                              layers, tensor_sqnr, outl[:15], pl, findings, round(time.perf_counter() - t0, 1),
                              fp32_size_bytes=info.size_bytes, int8_size_bytes=Path(full).stat().st_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def to_html(r: AnalysisReport) -> str:
    """The analysis as one self-contained page (edgepack.quantize.analyze_html; charts: edgepack.charts)."""
    from .analyze_html import render
    return render(r)
