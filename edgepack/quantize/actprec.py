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
from .graph import attribute, consumers, is_depthwise, producers


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


FOLD_MAX_DEPTHWISE = 32_768   # every depthwise conv of EfficientNet-Lite0 (at most 28,800 weights)
FOLD_MAX_DENSE = 4_096        # its stem (864) and the first blocks' small pointwise convs


def _computes_in_float(n: onnx.NodeProto, producer: dict, readers: dict) -> bool:
    """A Conv ONNX Runtime cannot fuse into QLinearConv: its input or its output is not quantized."""
    fed = producer.get(n.input[0])
    return (fed is None or fed.op_type != "DequantizeLinear"
            or any(c.op_type != "QuantizeLinear" for c in readers.get(n.output[0], [])))


def fold_float_conv_weights(m: onnx.ModelProto, *, max_depthwise: int = FOLD_MAX_DEPTHWISE,
                            max_dense: int = FOLD_MAX_DENSE) -> onnx.ModelProto:
    """Store the INT8 weights (and bias) of small convolutions that compute in float as the
    float values they dequantize to, in place; the numbers stay the same.

    Why: ONNX Runtime prepacks a convolution's weights (NCHWc layout, its fast depthwise kernel)
    only when they are constant initializers; behind a DequantizeLinear it takes the generic
    path on every run. Measured on EfficientNet-Lite0 with its 15 depthwise outputs float (1 /
    2 threads, FP32 = 1): 2.58x with the DequantizeLinear nodes, 0.99 / 1.13x with the depthwise
    ones folded (+0.46 MB, 5.46 MB), 0.87 / 1.06x with every float conv of <= 32,768 weights
    folded (5.58 MB). Depthwise convs of at most ``max_depthwise`` weights and others of at most
    ``max_dense`` are folded: the pointwise ones carry the bytes, and float storage quadruples them."""
    producer, readers = producers(m), consumers(m)
    inits = {i.name: i for i in m.graph.initializer}
    folded = []
    for n in m.graph.node:
        if n.op_type != "Conv" or not _computes_in_float(n, producer, readers):
            continue
        limit = max_depthwise if is_depthwise(n) else max_dense
        for k in range(1, len(n.input)):
            dq = producer.get(n.input[k])
            if (dq is None or dq.op_type != "DequantizeLinear" or len(readers[dq.output[0]]) != 1
                    or any(x and x not in inits for x in dq.input)):
                continue
            q = numpy_helper.to_array(inits[dq.input[0]])
            if k == 1 and q.size > limit:
                break
            zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else None
            w = _dequantize(q, numpy_helper.to_array(inits[dq.input[1]]), zp,
                            axis=attribute(dq, "axis", 1))
            name = f"{n.input[k]}_folded"
            m.graph.initializer.append(numpy_helper.from_array(w, name))
            n.input[k] = name
            folded.append(dq)
    for dq in folded:
        m.graph.node.remove(dq)
    used = {x for n in m.graph.node for x in n.input} | {o.name for o in m.graph.output}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def _dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, *, axis: int) -> np.ndarray:
    """DequantizeLinear's arithmetic, in float32 as ONNX Runtime computes it."""
    s = scale.astype(np.float32)
    z = np.zeros_like(s) if zp is None else zp.astype(np.float32)
    if s.ndim == 1 and q.ndim > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return ((q.astype(np.float32) - z) * s).astype(np.float32)


def keep_float_activations(qdq_path: Path, tensors: list[str], out: Path) -> Path:
    """The QDQ model with ``tensors`` float, small convolutions that now compute in float
    holding float weights (fold_float_conv_weights)."""
    onnx.save(fold_float_conv_weights(without_quantizers(onnx.load(str(qdq_path)), tensors)), str(out))
    return out


def depthwise_outputs(m: onnx.ModelProto) -> list[str]:
    """The quantized activations written by depthwise convolutions.

    Why a group of its own: each depthwise channel is its own filter, so one per-tensor uint8
    range fits its channels worst of all (ranges differ by orders of magnitude), and the
    convolutions that read them float hold few weights. Measured on EfficientNet-Lite0 (fused
    exact judge): its 15 depthwise outputs float took the main job's model from 97.06 / 96.02 %
    (search / held-out) to 98.53 / 97.73 %; every activation float reaches 95.59 / 98.30 %."""
    producer = producers(m)
    return [t for t in activation_quantizers(m) if is_depthwise(producer.get(t))]


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
