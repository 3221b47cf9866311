"""Run a ``.tflite`` on the host in LiteRT, as the board does: float samples in the ONNX model's
layout (NCHW) are moved to the ``.tflite``'s NHWC, quantized with the input tensor's own scale
and zero point when the model takes integers, and outputs are dequantized back to float logits.

LiteRT's XNNPACK int8 kernels accumulate int8 x int8 products exactly in int32 (no 16-bit
saturating pair sums, unlike ONNX Runtime's u8 x s8 AVX2 path), so what this host computes is
what an ARM board with XNNPACK computes: the figure needs no emulation (edgepack.quantize.numerics).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..data import Dataset


class TfliteRunner:
    """One LiteRT interpreter over one model; ``xnnpack=False`` runs LiteRT's builtin kernels."""

    def __init__(self, path: str | Path, *, threads: int = 1, xnnpack: bool = True):
        from ai_edge_litert import interpreter as tfl

        kw: dict[str, Any] = {"model_path": str(path), "num_threads": threads or None}
        if not xnnpack:
            kw["experimental_op_resolver_type"] = tfl.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.it = tfl.Interpreter(**kw)
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]
        self.out = self.it.get_output_details()[0]

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """One sample (no batch axis, ONNX layout) -> the interpreter's input tensor."""
        x = np.asarray(x, np.float32)
        want = tuple(self.inp["shape"][1:])
        if x.shape != want and x.ndim == 3 and (x.shape[1], x.shape[2], x.shape[0]) == want:
            x = x.transpose(1, 2, 0)  # CHW -> HWC
        x = x[None]
        dt = np.dtype(self.inp["dtype"])
        if dt.kind in "iu":
            s, z = self.inp["quantization"]
            info = np.iinfo(dt)
            x = np.clip(np.round(x / s) + z, info.min, info.max).astype(dt)
        return x

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.it.set_tensor(self.inp["index"], x)
        self.it.invoke()
        y = self.it.get_tensor(self.out["index"])
        if np.dtype(self.out["dtype"]).kind in "iu":
            s, z = self.out["quantization"]
            y = (y.astype(np.float32) - z) * s
        return y.reshape(-1).astype(np.float32)


def predict_tflite(path: str | Path, data: Dataset, *, threads: int = 1, xnnpack: bool = True,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Logits (N, classes) of the ``.tflite`` for every sample of ``data``, in order."""
    r = TfliteRunner(path, threads=threads, xnnpack=xnnpack)
    outs = []
    for i in range(len(data)):
        s = data.loader(i)
        if isinstance(s, dict):
            if len(s) != 1:
                raise ValueError("the LiteRT runner takes single-input models")
            s = next(iter(s.values()))
        outs.append(r(r.prepare(s)))
        if progress:
            progress(1)
    return np.stack(outs)


def calibration_array(data: Dataset, shape: tuple[int, ...]) -> np.ndarray:
    """``data`` stacked in the ``.tflite``'s input layout (``shape`` without the batch axis), float32."""
    xs = []
    for i in range(len(data)):
        x = data.loader(i)
        if isinstance(x, dict):
            x = next(iter(x.values()))
        x = np.asarray(x, np.float32)
        if x.shape != tuple(shape) and x.ndim == 3 and (x.shape[1], x.shape[2], x.shape[0]) == tuple(shape):
            x = x.transpose(1, 2, 0)
        xs.append(x)
    return np.stack(xs)


__all__ = ["TfliteRunner", "predict_tflite", "calibration_array", "interleaved_any"]


def interleaved_any(models: dict[str, str | Path], sample: np.ndarray, *, threads: int, rounds: int = 10,
                    per_round: int = 10, warmup: int = 5) -> dict[str, Any]:
    """Batch-1 latency of ``.tflite`` (LiteRT, XNNPACK) and ``.onnx`` (ONNX Runtime) models on the
    same sample and thread count, timed in alternating rounds (edgepack.quantize.latency's method) so load
    on a shared machine hits them all alike. Returns LatencyStats per name."""
    import time

    from ..quantize.evaluate import session
    from ..quantize.latency import LatencyStats

    calls = {}
    for k, m in models.items():
        if str(m).endswith(".tflite"):
            r = TfliteRunner(m, threads=threads)
            x = r.prepare(sample)
            calls[k] = (lambda r=r, x=x: r(x))
        else:
            s = session(Path(m), threads)
            feed = {s.get_inputs()[0].name: np.asarray(sample, np.float32)[None]}
            calls[k] = (lambda s=s, feed=feed: s.run(None, feed))
    for f in calls.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            for _ in range(per_round):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: LatencyStats.of(threads, v) for k, v in times.items()}
