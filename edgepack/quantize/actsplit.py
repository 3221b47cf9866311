"""Activation splitting: one ReLU6 output as ``k`` clipped pieces, ``log2 k`` more bits in INT8.

Why: on an INT8-only board every activation is one per-tensor 8-bit grid. On EfficientNet-Lite0
the stem's ReLU6 output alone costs 2.2 dB of logit SQNR and about 3 points of top-1 agreement
(keeping just that tensor float: 95.45 % -> 97.16 % held out, docs/BENCHMARKS.md), and no range
rule, equalization or fine-tuning recovers it: its 32 channels all use the whole [0, 6] range, so
the grid is simply coarse. Exactly, for ``h = c / k``::

    clip(z, 0, c) = sum_j clip(z - j h, 0, h),  j = 0 .. k-1

so the producing conv A can write ``k`` channels per channel, and each reader B takes them all
in one accumulation: a plain B with its weights repeated over the pieces, a depthwise B as a
plain conv whose filter is block-diagonal (output channel c reads its channel's ``k`` pieces,
zeros elsewhere). Each piece is written ``k`` times larger, ``clip(k z - j c, 0, c) = k clip(z - j h, 0, h)``
(A's filter times ``k``, bias ``k b - j c``; B's weights divided by ``k``), so the activation stays
the same ``Clip(0, c)`` (ReLU6, which every runtime fuses) and the float function is unchanged.
Each piece has its own 8-bit grid, ``k`` times finer in the original units, and everything stays
INT8 in ops every runtime runs fast.

Why not cheaper forms, measured in LiteRT on this host: a depthwise B as a grouped conv (``k``
inputs per group) is not taken by XNNPACK in int8 (it runs in the builtin kernels: EfficientNet-
Lite0 split x4 ran 18.7 ms against 4.3 ms unsplit); ``k`` depthwise branches summed by Adds keep
the MACs but each partial sum is an unclipped tensor on its own INT8 grid (about +-50 where B's
clipped output spans [0, 6]), which costs more than the split gains (SQNR 28 -> 26 dB after the
first block). The block-diagonal conv costs ``C`` times a depthwise B's MACs, so depthwise
readers are split only up to :data:`MAX_DENSE_CHANNELS` channels (the stem's 32: +0.5 ms at
``k = 2``, +1.7 ms at ``k = 4`` in XNNPACK int8, batch 1, one thread); the rest of the price is
``k`` times the pieces' activation memory and A's MACs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelError
from . import graph

__all__ = ["SplitReport", "splittable", "split_activations"]

PASS_THROUGH = ("Pad",)              # channel-agnostic ops (zero padding) between the Clip and its readers
MAX_DENSE_CHANNELS = 64              # a depthwise reader becomes a dense conv: C x its MACs, so only small C


@dataclass
class SplitReport:
    tensors: list[str] = field(default_factory=list)   # the activations split
    pieces: int = 2
    extra_weights: int = 0                               # weights added by repeating filters


def _clip_range(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> tuple[float, float] | None:
    if node.op_type == "Relu":
        return None                                      # unbounded: nothing to split into
    if node.op_type != "Clip":
        return None
    lo = float(consts[node.input[1]]) if len(node.input) > 1 and node.input[1] in consts else graph.attribute(node, "min", None)
    hi = float(consts[node.input[2]]) if len(node.input) > 2 and node.input[2] in consts else graph.attribute(node, "max", None)
    return None if lo is None or hi is None else (float(lo), float(hi))


def _plan(model: onnx.ModelProto, tensor: str):
    """(conv A, clip, readers B) for a splittable ``tensor``, else None."""
    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    cons = graph.consumers(g)
    outputs = {o.name for o in g.output}
    clip = prod.get(tensor)
    if clip is None or tensor in outputs:
        return None
    rng = _clip_range(clip, consts)
    conv = prod.get(clip.input[0])
    if rng is None or rng[0] != 0.0 or rng[1] <= 0 or conv is None or conv.op_type != "Conv":
        return None
    if len(cons.get(conv.output[0], [])) != 1 or conv.input[1] not in consts:
        return None
    wa = consts[conv.input[1]]
    if not (graph.attribute(conv, "group", 1) == 1 or wa.shape[1] == 1):   # plain, or depthwise (multiplier k)
        return None
    readers, frontier, touched = [], [tensor], [conv.output[0]]
    while frontier:
        t = frontier.pop()
        touched.append(t)
        if t in outputs:
            return None
        for c in cons.get(t, []):
            if c.op_type in PASS_THROUGH and c.input[0] == t:
                frontier.append(c.output[0])
            elif c.op_type == "Conv" and c.input[0] == t and c.input[1] in consts:
                w = consts[c.input[1]]
                grp = graph.attribute(c, "group", 1)
                if not (grp == 1 or (grp == w.shape[0] and w.shape[1] == 1 and grp <= MAX_DENSE_CHANNELS)):
                    return None
                readers.append(c)
            else:
                return None
    return (conv, clip, readers, touched) if readers else None


def splittable(model: onnx.ModelProto) -> list[str]:
    """Every activation :func:`split_activations` can split: a plain or depthwise ``Conv -> Clip(0, c)`` read only by
    convolutions (plain or depthwise), possibly through zero padding."""
    return [n.output[0] for n in model.graph.node if n.op_type == "Clip" and _plan(model, n.output[0])]


def split_activations(model: onnx.ModelProto, tensors: list[str], *, pieces: int = 2
                      ) -> tuple[onnx.ModelProto, SplitReport]:
    """A copy of ``model`` computing the same function with each of ``tensors`` split into
    ``pieces`` clipped channels per channel (module docstring). Raises ModelError naming a
    tensor that is not splittable."""
    if pieces < 2:
        raise ModelError("activation splitting needs at least 2 pieces")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    rep = SplitReport(pieces=pieces)
    inits = {i.name: i for i in m.graph.initializer}
    for t in tensors:
        plan = _plan(m, t)
        if plan is None:
            raise ModelError(f"activation {t!r} cannot be split: it must be Conv -> Clip(0, c) read only by "
                             "plain or depthwise convolutions")
        conv, clip, readers, touched = plan
        stale = [v for v in m.graph.value_info if v.name in touched]   # their channel count changes
        for v in stale:
            m.graph.value_info.remove(v)
        _, hi = _clip_range(clip, {k: numpy_helper.to_array(v) for k, v in inits.items() if k in clip.input[1:]})
        w = numpy_helper.to_array(inits[conv.input[1]])
        b = numpy_helper.to_array(inits[conv.input[2]]) if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0], w.dtype)
        shift = (np.arange(pieces, dtype=np.float64) * hi).astype(w.dtype)     # piece j: clip(k z - j c, 0, c)
        wn, bn = f"{conv.output[0]}_split_w", f"{conv.output[0]}_split_b"
        m.graph.initializer.extend([
            numpy_helper.from_array((np.repeat(w, pieces, axis=0) * pieces).astype(w.dtype), wn),
            numpy_helper.from_array((np.repeat(b, pieces) * pieces - np.tile(shift, w.shape[0])).astype(w.dtype), bn)])
        rep.extra_weights += w.size * (pieces - 1)
        x = conv.input[0]
        del conv.input[:]
        conv.input.extend([x, wn, bn])
        for r in readers:
            rw = numpy_helper.to_array(inits[r.input[1]])
            # plain: input column c -> columns c*k .. c*k+k-1; / k: the pieces are written k times
            # larger. Depthwise [C, 1, kh, kw] -> plain [C, C*k, kh, kw], block-diagonal
            nw = np.repeat(rw, pieces, axis=1) / pieces
            if graph.attribute(r, "group", 1) > 1:
                dense = np.zeros((rw.shape[0], rw.shape[0] * pieces, *rw.shape[2:]), rw.dtype)
                for c in range(rw.shape[0]):
                    dense[c, c * pieces:(c + 1) * pieces] = nw[c]
                nw = dense
                for a in r.attribute:
                    if a.name == "group":
                        a.i = 1
            name = f"{r.output[0]}_split_w"
            m.graph.initializer.extend([numpy_helper.from_array(nw.astype(rw.dtype), name)])
            r.input[1] = name
            rep.extra_weights += nw.size - rw.size
        rep.tensors.append(t)
        inits = {i.name: i for i in m.graph.initializer}
    _drop_unused(m)
    return m, rep


def _drop_unused(m: onnx.ModelProto) -> None:
    used = {i for n in m.graph.node for i in n.input}
    keep = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
