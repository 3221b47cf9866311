"""Cross-layer equalization with bias absorption (Nagel et al. 2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction"; AIMET's ``equalize_model``).

Why: in a depthwise network the channels of one layer's output can differ by orders of
magnitude (a depthwise filter per channel, BatchNorm folded in), and the next layer's input
columns with them. For two convolutions A -> act -> B with a positively homogeneous ``act``
(ReLU: ``relu(x / s) = relu(x) / s`` for ``s > 0``), dividing A's output channel i by ``s_i`` and
multiplying B's input channel i by ``s_i`` computes the same function; choosing
``s_i = sqrt(r_A[i] / r_B[i])`` (``r``: the channel's largest absolute weight) gives both weight
ranges the same ``sqrt(r_A r_B)``. That fixes per-tensor weights; with per-channel weights (every
edgepack target) it mostly changes how the *activation* between A and B spreads over the
per-tensor uint8 grid, which is what matters on EfficientNet-Lite0 (docs/BENCHMARKS.md, issue 11).

ReLU6 (EfficientNet-Lite, MobileNet) is not homogeneous: ``clip(x / s, 0, 6) != clip(x, 0, 6 s) / s``.
Two modes, both measured (docs/BENCHMARKS.md "Issue 11: EfficientNet-Lite0 at 97 %"):

- ``relu``: AIMET's choice, ReLU6 in the equalized pairs replaced by ReLU; the float function
  changes wherever a pre-activation exceeds 6, and agreement is still measured against the
  original FP32 model;
- ``relu6``: the Clip kept as it is, so each channel clips at ``6 s_i`` in the old units: exact
  only where ``s_i`` is 1 or the channel never reaches the clip.
- ``range`` (needs calibration data): activation-range equalization that keeps ReLU6 exact on the
  calibration set. Only into a *depthwise* B, whose per-channel weight scales absorb any ``s_i``
  without loss, and only scaling a channel *up*, until its calibration maximum ``hi_i`` is
  ``6 / headroom``: ``s_i = min(1, max(hi_i headroom / 6, floor))``. A channel of range 0.1 then
  uses a quarter of the per-tensor uint8 grid [0, 6] instead of 4 of its 255 steps, while B's
  large weights amplify that rounding. The headroom keeps the clip away from values the
  calibration set never showed (headroom 1, scaling right up to the clip, clipped enough
  held-out values to cost 8 points of FP32 agreement: docs/BENCHMARKS.md).

High-bias absorption: after equalization a channel of A whose pre-activation never goes below
``c_i > 0`` on the calibration set can hand ``c_i`` to B (``relu(y) = relu(y - c) + c`` when
``y >= c``; B's bias gains ``W_B c``), narrowing the activation's range. Only into a B without
padding (padding would feed ``-c`` at the borders) and only through ReLU, or through ReLU6 on
channels that never reach 6 on the calibration set (exact on the calibration data there).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..data import Dataset
from . import graph

MODES = ("relu", "relu6", "range")


@dataclass
class _Pair:
    a: onnx.NodeProto          # producing conv (its output channels are scaled by 1/s)
    act: onnx.NodeProto        # Relu or Clip(0, 6) between them
    b: onnx.NodeProto          # consuming conv (its input channels are scaled by s)
    b_depthwise: bool


@dataclass
class EqualizeReport:
    mode: str
    pairs: int
    iterations: int
    absorbed_channels: int = 0
    relu6_replaced: int = 0
    max_range_ratio_before: float = 0.0    # worst max/min channel weight range of a pair's A, before
    max_range_ratio_after: float = 0.0
    notes: list[str] = field(default_factory=list)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _clip_bounds(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> tuple[float, float] | None:
    if node.op_type == "Relu":
        return 0.0, float("inf")
    if node.op_type != "Clip" or len(node.input) < 3 or not all(i in consts for i in node.input[1:3]):
        return None
    return float(consts[node.input[1]]), float(consts[node.input[2]])


def find_pairs(model: onnx.ModelProto) -> list[_Pair]:
    """Conv -> (Relu | Clip(0, c)) -> Conv chains where the activation and the first conv's output
    have one consumer each and both weights are initializers (B plain or depthwise)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consumers = graph.consumers(g)
    outputs = {o.name for o in g.output}
    pairs = []
    for a in g.node:
        if a.op_type != "Conv" or len(a.input) < 2 or a.input[1] not in inits or a.output[0] in outputs:
            continue
        nxt = consumers.get(a.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type not in ("Relu", "Clip"):
            continue
        act = nxt[0]
        bounds = _clip_bounds(act, consts)
        if bounds is None or bounds[0] != 0.0 or act.output[0] in outputs:
            continue
        nb = consumers.get(act.output[0], [])
        if len(nb) != 1 or nb[0].op_type != "Conv" or nb[0].input[0] != act.output[0] or nb[0].input[1] not in inits:
            continue
        b = nb[0]
        wb = inits[b.input[1]].dims
        c = inits[a.input[1]].dims[0]
        group = _attr(b, "group", 1)
        if group == 1 and wb[1] == c:
            pairs.append(_Pair(a, act, b, False))
        elif group == c and wb[0] == c and wb[1] == 1:
            pairs.append(_Pair(a, act, b, True))
    return pairs


def _ranges(wa: np.ndarray, wb: np.ndarray, depthwise: bool) -> tuple[np.ndarray, np.ndarray]:
    ra = np.abs(wa.reshape(wa.shape[0], -1)).max(1)
    rb = np.abs(wb.reshape(wb.shape[0], -1)).max(1) if depthwise else np.abs(wb).max(axis=(0, *range(2, wb.ndim)))
    return ra, rb


def equalize(model: onnx.ModelProto, mode: str = "relu", *, iterations: int = 20,
             absorb: bool = True, calib: Dataset | None = None, input_names: list[str] | None = None,
             max_scale: float = 1e3, headroom: float = 4.0) -> tuple[onnx.ModelProto, EqualizeReport]:
    """A copy of ``model`` (BatchNorm already folded) with every Conv-act-Conv pair equalized, and
    high biases absorbed when ``calib`` is given (the pre-activation minima come from it)."""
    if mode not in MODES:
        raise ValueError(f"unknown equalization mode {mode!r} (known: {', '.join(MODES)})")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    pairs = find_pairs(m)
    rep = EqualizeReport(mode, len(pairs), iterations)
    if not pairs:
        return m, rep
    if mode == "range":
        if calib is None:
            raise ValueError("range equalization needs calibration data")
        return m, _range_equalize(m, pairs, calib, input_names or [], rep, headroom=headroom)
    inits = {i.name: i for i in m.graph.initializer}
    W = {n: numpy_helper.to_array(inits[n]).astype(np.float64) for p in pairs for n in (p.a.input[1], p.b.input[1])}
    B = {}
    for p in pairs:
        for node in (p.a, p.b):
            if len(node.input) > 2 and node.input[2]:
                B[node.input[2]] = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
    ratios = [float(r.max() / max(r.min(), 1e-12)) for r in (_ranges(W[p.a.input[1]], W[p.b.input[1]], p.b_depthwise)[0] for p in pairs)]
    rep.max_range_ratio_before = round(max(ratios), 1)
    for _ in range(iterations):
        for p in pairs:
            wa, wb = W[p.a.input[1]], W[p.b.input[1]]
            ra, rb = _ranges(wa, wb, p.b_depthwise)
            s = np.sqrt(np.maximum(ra, 1e-12) / np.maximum(rb, 1e-12))
            s = np.clip(np.where((ra > 1e-12) & (rb > 1e-12), s, 1.0), 1 / max_scale, max_scale)
            shape_a = (-1,) + (1,) * (wa.ndim - 1)
            W[p.a.input[1]] = wa / s.reshape(shape_a)
            if len(p.a.input) > 2 and p.a.input[2]:
                B[p.a.input[2]] = B[p.a.input[2]] / s
            if p.b_depthwise:
                W[p.b.input[1]] = wb * s.reshape(shape_a)
            else:
                W[p.b.input[1]] = wb * s.reshape((1, -1) + (1,) * (wb.ndim - 2))
            if p.act.op_type == "Clip" and mode == "relu6":
                pass   # the clip stays at 6: see the module docstring
    ratios = [float(r.max() / max(r.min(), 1e-12)) for r in (_ranges(W[p.a.input[1]], W[p.b.input[1]], p.b_depthwise)[0] for p in pairs)]
    rep.max_range_ratio_after = round(max(ratios), 1)
    for name, w in {**W, **B}.items():
        inits[name].CopyFrom(numpy_helper.from_array(w.astype(np.float32), name))
    if mode == "relu":
        for p in pairs:
            if p.act.op_type == "Clip":
                p.act.op_type = "Relu"
                del p.act.input[1:]
                rep.relu6_replaced += 1
    if absorb and calib is not None:
        rep.absorbed_channels = _absorb(m, pairs, calib, input_names or [], mode)
    return m, rep


def _preact_extremes(model: onnx.ModelProto, names: list[str], calib: Dataset,
                     input_names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel min and max of each named NCHW tensor over the calibration set."""
    from .calibrate import _exposing_session

    sess = _exposing_session(model, names, 0)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for _, feed in calib.feeds(8, input_names):
        for name, y in zip(names, sess.run(names, feed)):
            axes = (0,) + tuple(range(2, y.ndim))
            lo, hi = y.min(axis=axes), y.max(axis=axes)
            if name in out:
                lo, hi = np.minimum(out[name][0], lo), np.maximum(out[name][1], hi)
            out[name] = (lo, hi)
    return out


def _range_equalize(m: onnx.ModelProto, pairs: list[_Pair], calib: Dataset, input_names: list[str],
                    rep: EqualizeReport, floor: float = 1e-2, headroom: float = 4.0) -> EqualizeReport:
    inits = {i.name: i for i in m.graph.initializer}
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    dw = [p for p in pairs if p.b_depthwise]
    ext = _preact_extremes(m, [p.a.output[0] for p in dw], calib, input_names)
    worst_before, worst_after, n = 1.0, 1.0, 0
    for p in dw:
        top = _clip_bounds(p.act, consts)[1]
        hi = np.maximum(ext[p.a.output[0]][1], 0.0)
        if not np.isfinite(top):
            top = float(hi.max())
        # s <= 1: a channel is scaled up until its calibration maximum is 1/headroom of the clip
        s = np.minimum(np.maximum(hi * headroom / top, floor), 1.0)
        live = hi > 0
        if live.any():
            worst_before = max(worst_before, float(hi[live].max() / hi[live].min()))
            h2 = hi / s
            worst_after = max(worst_after, float(h2[live].max() / h2[live].min()))
        wa = numpy_helper.to_array(inits[p.a.input[1]]).astype(np.float64)
        wb = numpy_helper.to_array(inits[p.b.input[1]]).astype(np.float64)
        shape = (-1,) + (1,) * (wa.ndim - 1)
        inits[p.a.input[1]].CopyFrom(numpy_helper.from_array((wa / s.reshape(shape)).astype(np.float32), p.a.input[1]))
        if len(p.a.input) > 2 and p.a.input[2]:
            ba = numpy_helper.to_array(inits[p.a.input[2]]).astype(np.float64)
            inits[p.a.input[2]].CopyFrom(numpy_helper.from_array((ba / s).astype(np.float32), p.a.input[2]))
        inits[p.b.input[1]].CopyFrom(numpy_helper.from_array((wb * s.reshape(shape)).astype(np.float32), p.b.input[1]))
        n += int((s < 1).sum())
    rep.pairs, rep.iterations, rep.absorbed_channels = len(dw), 1, 0
    rep.max_range_ratio_before, rep.max_range_ratio_after = round(worst_before, 1), round(worst_after, 1)
    rep.notes.append(f"{n} channels scaled up to the clip (activation range ratios are before/after)")
    return rep


def _absorb(m: onnx.ModelProto, pairs: list[_Pair], calib: Dataset, input_names: list[str], mode: str) -> int:
    inits = {i.name: i for i in m.graph.initializer}
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    eligible = [p for p in pairs if not any(_attr(p.b, "pads", [0]))
                and len(p.a.input) > 2 and p.a.input[2] and len(p.b.input) > 2 and p.b.input[2]]
    if not eligible:
        return 0
    ext = _preact_extremes(m, [p.a.output[0] for p in eligible], calib, input_names)
    n = 0
    for p in eligible:
        lo, hi = ext[p.a.output[0]]
        c = np.maximum(lo, 0.0)
        bounds = _clip_bounds(p.act, consts)
        if bounds is not None and np.isfinite(bounds[1]):
            c = np.where(hi < bounds[1], c, 0.0)      # a channel that reaches the clip keeps its bias
        if not (c > 0).any():
            continue
        ba = numpy_helper.to_array(inits[p.a.input[2]]).astype(np.float64)
        bb = numpy_helper.to_array(inits[p.b.input[2]]).astype(np.float64)
        wb = numpy_helper.to_array(inits[p.b.input[1]]).astype(np.float64)
        if p.b_depthwise:
            bb = bb + wb.reshape(wb.shape[0], -1).sum(1) * c
        else:
            bb = bb + wb.sum(axis=tuple(range(2, wb.ndim))) @ c
        inits[p.a.input[2]].CopyFrom(numpy_helper.from_array((ba - c).astype(np.float32), p.a.input[2]))
        inits[p.b.input[2]].CopyFrom(numpy_helper.from_array(bb.astype(np.float32), p.b.input[2]))
        n += int((c > 0).sum())
    return n


__all__ = ["MODES", "EqualizeReport", "equalize", "find_pairs"]
