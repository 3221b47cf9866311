"""Activation calibration in bounded memory, once, for every calibration method.

ONNX Runtime's calibrators keep every intermediate output of every calibration sample in memory
before reducing them (2.8 GB for EfficientNet-Lite0 with Entropy, see ../shared/ASSETS.md), and
each method needs its own pass. Here one streaming collector keeps, per tensor, the running
min/max (pass 1) and a fixed-edge 2048-bin histogram (pass 2), so memory is bounded by one batch
of activations, and MinMax, Percentile and Entropy ranges all come from the same statistics.
The ranges are handed to ONNX Runtime's QDQ quantizer through its calibration cache, so every
candidate model (per method, per set of float layers) is built without re-running calibration.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..data import Dataset
from ..errors import DataError

METHODS = ("minmax", "percentile", "entropy")      # the default candidates, each measured
ALL_METHODS = METHODS + ("mse",)                  # "mse": opt-in (quantize --method mse)
# Attention masks add -inf or float32's lowest (-3.4e38) to masked scores. Such sentinels carry
# "never" rather than a magnitude: they are kept out of the statistics and left to saturate.
SENTINEL = 1e9
SATURATING = {"Clip", "Relu6", "Sigmoid", "Tanh", "Softmax", "HardSigmoid", "HardSwish"}
BINS = 2048


@dataclass
class TensorStats:
    lo: float = np.inf
    hi: float = -np.inf
    hist: np.ndarray | None = None  # BINS counts over [-absmax, absmax]
    neg_inf: bool = False           # the tensor carries -inf (an attention mask, say)
    pos_inf: bool = False

    @property
    def absmax(self) -> float:
        lo = self.lo if np.isfinite(self.lo) else 0.0
        hi = self.hi if np.isfinite(self.hi) else 0.0
        return max(abs(lo), abs(hi), 1e-12)


@dataclass
class Calibration:
    """Per-tensor statistics of one calibration run, and the ranges each method derives."""

    stats: dict[str, TensorStats]
    samples: int
    seconds: float = 0.0
    percentile: float = 99.99
    bounded: frozenset[str] = frozenset()  # outputs of saturating ops: never clipped further
    _cache: dict = field(default_factory=dict, repr=False)

    def ranges(self, method: str) -> dict[str, tuple[float, float]]:
        if method not in ALL_METHODS:
            raise ValueError(f"calibration method must be one of {ALL_METHODS}")
        if method not in self._cache:
            f = {"minmax": _minmax, "percentile": lambda s: _percentile(s, self.percentile),
                 "entropy": _entropy, "mse": _mse}[method]
            # A saturating op (ReLU6 = Clip, Sigmoid, Tanh, Softmax) already bounds its output and
            # the values piled up at the bound carry signal; statistical clipping inside that
            # bound cuts them off (Entropy on EfficientNet-Lite's ReLU6 outputs: 3 % agreement).
            # MSE weighs that pile-up like any other value, so it may clip bounded tensors too.
            self._cache[method] = {k: _widen(s, _minmax(s) if k in self.bounded and method != "mse" else f(s))
                                   for k, s in self.stats.items()}
        return self._cache[method]

    def write_ort_cache(self, method: str, path: Path) -> Path:
        """Write ranges in ONNX Runtime's calibration-cache format (read by quantize_static)."""
        from onnxruntime.quantization.calibrate import (CalibrationMethod, TensorData, TensorsData,
                                                         save_tensors_data)

        data = {k: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
                for k, (lo, hi) in self.ranges(method).items()}
        # The cache is labelled MinMax: it holds final ranges, whichever method chose them.
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)
        return path


def _widen(s: TensorStats, r: tuple[float, float]) -> tuple[float, float]:
    """Infinities and mask sentinels (masked attention scores) cannot be represented; quantization saturates them to
    the range's end. Widening that end by one range width makes the saturated value at least
    one full range below (above) every real value, so a softmax still gives it ~exp(-2 * range).""" 
    lo, hi = r
    width = hi - lo
    if width < 1e-3:
        # a pure mask (every real value equal, e.g. 0 or -inf): the sentinel must stay far below
        # anything it is added to, so it keeps a representable -1e4 (exact at INT8's end).
        width = 1e4
    return (lo - width if s.neg_inf else lo), (hi + width if s.pos_inf else hi)


def _minmax(s: TensorStats) -> tuple[float, float]:
    lo = s.lo if np.isfinite(s.lo) else 0.0
    hi = s.hi if np.isfinite(s.hi) else 0.0
    return float(min(lo, 0.0)), float(max(hi, 0.0))


def _edges(s: TensorStats) -> np.ndarray:
    return np.linspace(-s.absmax, s.absmax, BINS + 1)


def _percentile(s: TensorStats, pct: float) -> tuple[float, float]:
    """Clip (100 - pct)/2 % of the mass from each tail; never widen beyond min/max."""
    if s.hist is None or s.hist.sum() == 0:
        return _minmax(s)
    c = np.cumsum(s.hist) / s.hist.sum()
    tail = (100.0 - pct) / 200.0
    e = _edges(s)
    lo = e[int(np.searchsorted(c, tail, side="left"))]
    hi = e[min(int(np.searchsorted(c, 1 - tail, side="left")) + 1, BINS)]
    return float(min(max(lo, s.lo), 0.0)), float(max(min(hi, s.hi), 0.0))


def _entropy(s: TensorStats) -> tuple[float, float]:
    """TensorRT-style KL threshold on |x|: the clip that best preserves the distribution."""
    if s.hist is None or s.hist.sum() == 0:
        return _minmax(s)
    half = BINS // 2
    absh = (s.hist[half:] + s.hist[:half][::-1]).astype(np.float64)  # |x| histogram, BINS/2 bins
    levels = 255 if s.lo >= 0 else 127
    width = s.absmax / half
    best, best_i = np.inf, half
    start = min(levels + 1, half)
    for i in range(start, half + 1, max(1, (half - start) // 64)):
        p = absh[:i].copy()
        p[-1] += absh[i:].sum()
        nz = p > 0
        # quantize the first i bins into `levels` buckets, spreading each bucket over its non-empty bins
        idx = (np.arange(i) * levels // i)
        bucket_sum = np.bincount(idx, weights=absh[:i], minlength=levels)
        bucket_cnt = np.bincount(idx, weights=nz.astype(np.float64), minlength=levels)
        q = np.where(nz, bucket_sum[idx] / np.maximum(bucket_cnt[idx], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if qs == 0:
            continue
        pn, qn = p[nz] / ps, q[nz] / qs
        kl = float(np.sum(pn * np.log(pn / np.maximum(qn, 1e-12))))
        if kl < best:
            best, best_i = kl, i
    t = best_i * width
    return float(min(max(s.lo, -t), 0.0)), float(max(min(s.hi, t), 0.0))


def _mse(s: TensorStats, levels: int = 255, steps: int = 48) -> tuple[float, float]:
    """The clipping range with the least expected squared error, clipping plus rounding.

    For a range [t·lo, t·hi] (t on a grid in (0, 1]) the error of the histogram's mass is
    ``(x - clip(x))²`` outside and ``step²/12`` inside. Unlike Percentile and Entropy it weighs
    magnitudes: a ReLU6 output whose mass sits near 0 with a few values at 6 is clipped where
    the rounding it saves outweighs the clipping it costs, not at a fixed tail mass."""
    if s.hist is None or s.hist.sum() == 0:
        return _minmax(s)
    lo0, hi0 = _minmax(s)
    e = _edges(s)
    c = (e[:-1] + e[1:]) / 2
    h = s.hist.astype(np.float64)
    best, best_r = np.inf, (lo0, hi0)
    for t in np.geomspace(0.02, 1.0, steps):
        lo, hi = lo0 * t, hi0 * t
        step = (hi - lo) / levels
        if step <= 0:
            continue
        clipped = np.clip(c, lo, hi)
        inside = (c >= lo) & (c <= hi)
        err = float((h * ((c - clipped) ** 2)).sum() + h[inside].sum() * step * step / 12)
        if err < best:
            best, best_r = err, (float(lo), float(hi))
    return best_r


def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """Graph inputs and node outputs that carry activations (not weights or constants)."""
    inits = {i.name for i in model.graph.initializer}
    const_out = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names = [i.name for i in model.graph.input if i.name not in inits]
    for n in model.graph.node:
        if n.op_type in ("Constant", "Shape", "Size", "ConstantOfShape"):
            continue
        names += [o for o in n.output if o and o not in const_out]
    return list(dict.fromkeys(names))


def _exposing_session(model: onnx.ModelProto, names: list[str], threads: int) -> ort.InferenceSession:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_empty_tensor_value_info(n))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as td:  # >2 GB protobufs cannot go through bytes
        p = Path(td) / "m.onnx"
        onnx.save(m, str(p))
        return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])


def collect(model: onnx.ModelProto, data: Dataset, input_names: list[str], *, batch_size: int = 8,
            threads: int = 0, percentile: float = 99.99,
            progress: Callable[[int, int], None] | None = None) -> Calibration:
    """Two streaming passes over ``data``: running min/max, then histograms with fixed edges."""
    import time

    if len(data) == 0:
        raise DataError("calibration set is empty")
    t0 = time.perf_counter()
    names = activation_tensors(model)
    sess = _exposing_session(model, names, threads)
    out_names = [o.name for o in sess.get_outputs()]
    stats: dict[str, TensorStats] = {}
    total = 2 * len(data)
    done = 0
    for pass_no in (1, 2):
        for idx, feed in data.feeds(batch_size, input_names):
            outs = sess.run(out_names, feed)
            for name, y in zip(out_names, outs):
                if not isinstance(y, np.ndarray) or y.dtype not in (np.float32, np.float16) or y.size == 0:
                    continue
                s = stats.setdefault(name, TensorStats())
                fin = np.abs(y) < SENTINEL
                if not fin.all():
                    s.neg_inf |= bool((y <= -SENTINEL).any())
                    s.pos_inf |= bool((y >= SENTINEL).any())
                    y = y[fin]
                    if y.size == 0:
                        continue
                if pass_no == 1:
                    s.lo, s.hi = min(s.lo, float(y.min())), max(s.hi, float(y.max()))
                else:
                    a = s.absmax
                    b = np.clip(((y.ravel() + a) * (BINS / (2 * a))).astype(np.int64), 0, BINS - 1)
                    h = np.bincount(b, minlength=BINS)
                    s.hist = h if s.hist is None else s.hist + h
            done += len(idx)
            if progress:
                progress(done, total)
    bounded = frozenset(o for n in model.graph.node if n.op_type in SATURATING for o in n.output)
    return Calibration(stats, len(data), time.perf_counter() - t0, percentile, bounded)
