"""Which layers hurt most when quantized: a one-pass noise-injection ranking.

Quantizing one layer at a time costs a model build and an evaluation per layer (minutes for a
50-layer CNN). Instead, the fully quantized QDQ model and the FP32 model run side by side on a
few samples with every weight layer's output exposed (graph optimizations off, so the QDQ model
computes exactly its simulated arithmetic). A layer's output noise-to-signal ratio (NSR) is the
noise it received from upstream plus the noise it adds; its score is the NSR increase over its
input's NSR. Ranking by that increase finds the layers that *inject* error rather than the late
layers that merely carry it; the mixed-precision search then confirms with full evaluations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .calibrate import _exposing_session
from . import graph
from ..modelinfo import WEIGHT_OPS


@dataclass
class LayerScore:
    name: str
    op: str
    output: str
    nsr_in: float
    nsr_out: float
    params: int

    @property
    def score(self) -> float:
        return max(self.nsr_out - self.nsr_in, 0.0)

    @property
    def sqnr_db(self) -> float:
        return float(10 * np.log10(1 / max(self.nsr_out, 1e-12)))


def rank_layers(fp32: onnx.ModelProto, qdq: onnx.ModelProto, feeds: dict[str, np.ndarray],
                threads: int = 0) -> list[LayerScore]:
    """Weight layers of ``fp32`` sorted by injected quantization noise, worst first."""
    producers, consumers = graph.producers(fp32), graph.consumers(fp32)
    inits = {i.name: i for i in fp32.graph.initializer}
    qdq_tensors = {o for n in qdq.graph.node for o in n.output} | {i.name for i in qdq.graph.input}
    qdq_nodes = {n.name for n in qdq.graph.node}
    layers = [n for n in fp32.graph.node if n.op_type in WEIGHT_OPS]

    def seen(t: str) -> tuple[str, str] | None:
        """(FP32 tensor, QDQ tensor) holding what the next layer sees of ``t``.

        The QDQ model folds a ReLU/ReLU6 that follows a layer into that layer's output
        quantization (the tensor names move), so the comparison is made after the activation,
        and on the QDQ side after dequantization: like against like."""
        cs = consumers.get(t, [])
        if len(cs) == 1 and cs[0].op_type in ("Relu", "Clip") and cs[0].name not in qdq_nodes:
            t = cs[0].output[0]
        q = f"{t}_DequantizeLinear_Output"
        q = q if q in qdq_tensors else t
        return (t, q) if q in qdq_tensors else None

    def ancestor(t: str) -> str | None:
        """Output of the nearest upstream weight layer (or the graph input) on the main path."""
        for _ in range(16):
            p = producers.get(t)
            if p is None or p.op_type in WEIGHT_OPS:
                return t
            if not p.input:
                return None
            t = p.input[0]
        return None

    plan = []
    for n in layers:
        out = seen(n.output[0])
        if out is None:
            continue
        a = ancestor(n.input[0])
        src = None if a is None or a in feeds else seen(a)
        w = inits.get(n.input[1]) if len(n.input) > 1 else None
        params = int(np.prod(w.dims)) if w is not None else 0
        plan.append((n, out, src, params))
    pairs = list(dict.fromkeys([p[1] for p in plan] + [p[2] for p in plan if p[2]]))
    f_names, q_names = [a for a, _ in pairs], [b for _, b in pairs]
    ref = dict(zip(pairs, _exposing_session(fp32, f_names, threads).run(f_names, feeds)))
    got = dict(zip(pairs, _exposing_session(qdq, q_names, threads).run(q_names, feeds)))

    def nsr(t: tuple[str, str] | None) -> float:
        if t is None:
            return 0.0
        a, b = ref[t].astype(np.float64), got[t].astype(np.float64)
        return float(((a - b) ** 2).sum() / max((a ** 2).sum(), 1e-30))

    scores = [LayerScore(n.name, n.op_type, out[0], nsr(src), nsr(out), params) for n, out, src, params in plan]
    return sorted(scores, key=lambda s: s.score, reverse=True)
