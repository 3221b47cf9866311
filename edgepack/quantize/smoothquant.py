"""SmoothQuant-style scale migration on an ONNX graph (Xiao et al., 2023), without extra ops.

Transformer activations have a few channels with ranges tens of times the others (LayerNorm
outputs especially); a per-tensor INT8 scale then wastes most of its levels on them. For a
MatMul ``Y = X W`` the identity ``X W = (X / s) (s W)`` moves that difficulty into the weights,
which are quantized per output channel and absorb it well: ``s_j = max|X_j|^a / max|W_j|^(1-a)``.

The division by ``s`` is folded into the LayerNormalization that produces ``X`` (its scale and
bias) when the MatMuls are its only consumers; where the LayerNorm output also feeds something
else (post-LN BERT's next residual Add), one elementwise Mul by ``1/s`` goes in front of the
MatMuls alone. Consumers of one X share one ``s`` (the max over their weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .calibrate import _exposing_session
from . import graph
from ..data import Dataset


@dataclass
class SmoothReport:
    tensors: int            # activation tensors smoothed
    matmuls: int            # MatMul/Gemm weights rescaled
    max_ratio_before: float  # worst channel-range ratio (max/median) among the smoothed tensors
    max_ratio_after: float


def channel_absmax(model: onnx.ModelProto, names: list[str], data: Dataset, input_names: list[str],
                   max_samples: int = 64) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of the named tensors over up to ``max_samples`` samples."""
    sess = _exposing_session(model, names, 0)
    out: dict[str, np.ndarray] = {}
    n = 0
    for idx, feed in data.feeds(16, input_names):
        for name, y in zip(names, sess.run(names, feed)):
            a = np.abs(y.reshape(-1, y.shape[-1])).max(0)
            out[name] = a if name not in out else np.maximum(out[name], a)
        n += len(idx)
        if n >= max_samples:
            break
    return out


def smooth(model: onnx.ModelProto, data: Dataset, input_names: list[str], alpha: float = 0.5,
           ) -> tuple[onnx.ModelProto, SmoothReport]:
    """Return a copy of ``model`` with scales migrated from LayerNorm outputs into the MatMul
    weights that consume them. The function the model computes is unchanged (up to float
    rounding); only where INT8 puts its resolution changes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    consumers = graph.consumers(m)
    init_users = {}
    for n in m.graph.node:
        for i in n.input:
            if i in inits:
                init_users[i] = init_users.get(i, 0) + 1

    candidates = []
    for ln in m.graph.node:
        if ln.op_type != "LayerNormalization" or len(ln.input) < 3:
            continue
        x = ln.output[0]
        users = consumers.get(x, [])
        mms = [u for u in users if u.op_type == "MatMul" and u.input[0] == x and u.input[1] in inits]
        if not mms:
            continue
        # Fold 1/s into LayerNorm's gamma/beta when the MatMuls are its only consumers and the
        # parameters are private to it; otherwise (post-LN BERT: the output also feeds the next
        # residual Add) put one Mul by 1/s in front of the MatMuls alone.
        fold = len(mms) == len(users) and all(init_users.get(ln.input[k], 0) == 1 for k in (1, 2))
        if any(init_users.get(u.input[1], 0) != 1 for u in mms):
            continue
        candidates.append((ln, x, mms, fold))
    if not candidates:
        return m, SmoothReport(0, 0, 1.0, 1.0)
    amax = channel_absmax(m, [x for _, x, _, _ in candidates], data, input_names)
    before, after, n_mm = [], [], 0
    for ln, x, mms, fold in candidates:
        a = np.maximum(amax[x], 1e-5)
        ws = [numpy_helper.to_array(inits[u.input[1]]).astype(np.float32) for u in mms]
        wmax = np.maximum(np.max([np.abs(w).max(1) for w in ws], axis=0), 1e-5)  # per input row
        s = (a ** alpha) / (wmax ** (1 - alpha))
        s = np.clip(s, 1e-2, 1e2).astype(np.float32)
        if fold:
            for k in (1, 2):
                t = inits[ln.input[k]]
                t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) / s).astype(np.float32), t.name))
        else:
            inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{x}_smooth_inv_scale")
            m.graph.initializer.append(inv)
            xs = f"{x}_smoothed"
            m.graph.node.append(helper.make_node("Mul", [x, inv.name], [xs], name=f"{ln.name}_smooth"))
            for u in mms:
                u.input[0] = xs
        for u, w in zip(mms, ws):
            t = inits[u.input[1]]
            t.CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), t.name))
            n_mm += 1
        before.append(float(a.max() / np.median(a)))
        a2 = a / s
        after.append(float(a2.max() / np.median(a2)))
    _toposort(m)
    return m, SmoothReport(len(candidates), n_mm, round(max(before), 2), round(max(after), 2))


def _toposort(m: onnx.ModelProto) -> None:
    """Appended Mul nodes must come before their consumers in the node list."""
    known = {i.name for i in m.graph.input} | {i.name for i in m.graph.initializer}
    nodes, out = list(m.graph.node), []
    while nodes:
        rest = []
        for n in nodes:
            if all(i == "" or i in known for i in n.input):
                out.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(nodes):
            out += rest  # a cycle or an input we cannot see: leave the rest as they were
            break
        nodes = rest
    del m.graph.node[:]
    m.graph.node.extend(out)
