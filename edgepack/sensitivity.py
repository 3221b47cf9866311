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
from .modelinfo import WEIGHT_OPS


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
    producers = {o: n for n in fp32.graph.node for o in n.output}
    inits = {i.name: i for i in fp32.graph.initializer}
    qdq_tensors = {o for n in qdq.graph.node for o in n.output} | {i.name for i in qdq.graph.input}
    layers = [n for n in fp32.graph.node if n.op_type in WEIGHT_OPS]

    def ancestor(t: str) -> str | None:
        """Output of the nearest upstream weight layer (or the graph input) on the main path.

        Both ends of the difference are then pre-activation outputs of weight layers, measured
        the same way in both models (an activation that the QDQ model folded away, such as a
        ReLU6 Clip, is stepped over)."""
        for _ in range(16):
            p = producers.get(t)
            if p is None:
                return t if t in qdq_tensors else None
            if p.op_type in WEIGHT_OPS:
                return t if t in qdq_tensors else None
            if not p.input:
                return None
            t = p.input[0]
        return None

    plan = []
    for n in layers:
        out = n.output[0]
        if out not in qdq_tensors:
            continue
        src = ancestor(n.input[0])
        w = inits.get(n.input[1]) if len(n.input) > 1 else None
        params = int(np.prod(w.dims)) if w is not None else 0
        plan.append((n, out, src, params))
    names = list(dict.fromkeys([p[1] for p in plan] + [p[2] for p in plan if p[2]]))
    ref = dict(zip(names, _exposing_session(fp32, names, threads).run(names, feeds)))
    got = dict(zip(names, _exposing_session(qdq, names, threads).run(names, feeds)))

    def nsr(t: str | None) -> float:
        if t is None or t in feeds:
            return 0.0
        a, b = ref[t].astype(np.float64), got[t].astype(np.float64)
        return float(((a - b) ** 2).sum() / max((a ** 2).sum(), 1e-30))

    scores = [LayerScore(n.name, n.op_type, out, nsr(src), nsr(out), params) for n, out, src, params in plan]
    return sorted(scores, key=lambda s: s.score, reverse=True)
