"""Activation precision: which activation quantizers cost the most accuracy, and keeping them float.

Why: on EfficientNet-Lite0 the INT8 error is spread over many layers, and keeping whole layers
in float buys little accuracy per megabyte (each float layer carries FP32 weights). Most of the
error comes from a few *activation* tensors whose per-tensor uint8 range is stretched by
outliers. Leaving just those activations in float, with every weight still INT8, costs no
size: the ops next to them run in float on a CPU board (ONNX Runtime, XNNPACK and the
unfused QDQ graph all dequantize the INT8 weights and compute those ops in float), which is
what the board computes and what edgepack.quantize.numerics judges. Their latency cost is measured
like every candidate's.

Ranking, in two stages so that it stays cheap:

1. one pass of the QDQ model (unfused) on a few samples with every activation quantizer's
   input and output exposed gives each quantizer's own noise-to-signal ratio;
2. the ``limit`` noisiest are each removed alone and the model's output error against FP32
   is measured on the same samples: the score is that error's reduction (what the quantizer
   costs at the output, downstream gain included).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .calibrate import _exposing_session
from .evaluate import session


@dataclass(frozen=True)
class ActivationScore:
    tensor: str             # the float tensor the quantizer reads
    local_nsr: float        # ||DQ(Q(x)) - x||^2 / ||x||^2 on the ranking samples
    gain: float             # output error reduction when only this quantizer is removed (fraction)


def activation_quantizers(m: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, list[onnx.NodeProto]]]:
    """``{tensor: (QuantizeLinear, [DequantizeLinear...])}`` for every quantized activation."""
    inits = {i.name for i in m.graph.initializer}
    outputs = {o.name for o in m.graph.output}
    dqs: dict[str, list[onnx.NodeProto]] = {}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear":
            dqs.setdefault(n.input[0], []).append(n)
    found = {}
    for n in m.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or n.output[0] in outputs:
            continue
        ds = dqs.get(n.output[0], [])
        if ds and not any(d.output[0] in outputs for d in ds):
            found[n.input[0]] = (n, ds)
    return found


def _range(m: onnx.ModelProto, qn: onnx.NodeProto) -> tuple[float, float]:
    """The float interval a QuantizeLinear represents: [(qmin - zp)·s, (qmax - zp)·s]."""
    inits = {i.name: i for i in m.graph.initializer}
    scale = float(numpy_helper.to_array(inits[qn.input[1]]).reshape(-1)[0])
    zp = numpy_helper.to_array(inits[qn.input[2]]) if len(qn.input) > 2 and qn.input[2] in inits else np.uint8(0)
    info = np.iinfo(zp.dtype)
    z = float(zp.reshape(-1)[0])
    return (info.min - z) * scale, (info.max - z) * scale


def without_quantizers(m: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of QDQ model ``m`` in which the activations ``tensors`` stay float.

    Each Q/DQ pair becomes a Clip to the interval it represented, not a plain wire: ORT's QDQ
    models fold a ReLU / ReLU6 into the quantizer's range, so only the rounding is dropped."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    q = activation_quantizers(out)
    unknown = [t for t in tensors if t not in q]
    if unknown:
        raise ValueError(f"not quantized activations of this model: {unknown[:3]}")
    drop, rename, clips = set(), {}, []
    for i, t in enumerate(tensors):
        qn, ds = q[t]
        lo, hi = _range(out, qn)
        c = f"{t}_float_clip"
        out.graph.initializer.extend([numpy_helper.from_array(np.array(lo, np.float32), f"{c}_min"),
                                      numpy_helper.from_array(np.array(hi, np.float32), f"{c}_max")])
        clips.append((qn, helper.make_node("Clip", [t, f"{c}_min", f"{c}_max"], [c], name=c)))
        drop.add(qn.output[0])
        for d in ds:
            drop.add(d.output[0])
            rename[d.output[0]] = c
    nodes = []
    by_q = {qn.output[0]: clip for qn, clip in clips}
    for n in out.graph.node:
        if n.op_type == "QuantizeLinear" and n.output[0] in by_q:
            nodes.append(by_q[n.output[0]])
        elif n.output[0] not in drop:
            nodes.append(n)
    for n in nodes:
        for i, x in enumerate(n.input):
            n.input[i] = rename.get(x, x)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {x for n in nodes for x in n.input} | {o.name for o in out.graph.output}
    inits = [t for t in out.graph.initializer if t.name in used]   # the dropped quantizers' scales and zero points
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return out


def keep_float_activations(qdq_path: Path, tensors: list[str], out: Path) -> Path:
    onnx.save(without_quantizers(onnx.load(str(qdq_path)), tensors), str(out))
    return out


def rank_activations(fp32_path: Path, qdq_path: Path, feeds: dict[str, np.ndarray], *,
                     limit: int = 32) -> list[ActivationScore]:
    """Activation quantizers of ``qdq_path`` by output error removed when kept float, worst first."""
    m = onnx.load(str(qdq_path))
    q = activation_quantizers(m)
    if not q:
        return []
    names = list(q)
    dq_out = [q[t][1][0].output[0] for t in names]
    got = _exposing_session(m, names + dq_out, 0).run(names + dq_out, feeds)
    local = {}
    for i, t in enumerate(names):
        x, y = got[i].astype(np.float64), got[len(names) + i].astype(np.float64)
        local[t] = float(((x - y) ** 2).sum() / max((x ** 2).sum(), 1e-30))
    top = sorted(names, key=lambda t: local[t], reverse=True)[:limit]
    ref = session(fp32_path).run(None, feeds)[0].astype(np.float64)

    def err(model: onnx.ModelProto) -> float:
        y = session(model.SerializeToString(), optimize=False).run(None, feeds)[0]
        return float(((y - ref) ** 2).sum())

    base = err(m)
    scores = [ActivationScore(t, local[t], (base - err(without_quantizers(m, [t]))) / max(base, 1e-30))
              for t in top]
    return sorted((s for s in scores if s.gain > 0), key=lambda s: s.gain, reverse=True)
