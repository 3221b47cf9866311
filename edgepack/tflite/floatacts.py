"""Selective float for LiteRT boards that run float: which activations to leave unquantized.

EfficientNet-Lite0's INT8 error sits in a few activation tensors whose 8-bit grid is stretched by
rare large values (the stem's and early blocks' ReLU6 outputs, project-conv outputs feeding the
residual sums; issue 11's exploration on the ONNX path), not in weights. In a ``.tflite`` a tensor
is float only when the op that writes it and every op that reads it run in float: keeping one op
float (LiteRT's quantizer's ``NO_QUANTIZE``) still quantizes its output for the next op, so it
removes no activation rounding. So the unit kept float here is a tensor's *island*: its producer
and its consumers, with LiteRT's quantizer inserting QUANTIZE/DEQUANTIZE at the island's edges.

Ranking: the noise-to-signal ratio of each activation's own int8 grid on the float model's values
(one float pass per sample in LiteRT's builtin kernels, every intermediate kept): cheap, and the
candidates it proposes are then judged in LiteRT on the selection split, so a poor ranking costs
accuracy choices, never a wrong figure.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import Dataset
from .inspect import TfliteInfo, read_tflite


def _all_tensors(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    from ai_edge_litert import interpreter as tfl

    it = tfl.Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=tfl.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    out = {}
    for t in it.get_tensor_details():
        try:
            out[t["name"]] = np.asarray(it.get_tensor(t["index"]), np.float64)
        except ValueError:
            continue
    return out


def activation_noise(float_tfl: str | Path, int8_tfl: str | Path, data: Dataset, n: int = 4) -> list[tuple[str, float]]:
    """(activation tensor name, noise-to-signal of its int8 grid), worst first, over ``n`` samples of
    ``data``. Noise: the float model's values rounded and clipped to the INT8 model's grid for the
    same tensor, against the values themselves."""
    from .run import TfliteRunner

    info = read_tflite(int8_tfl)
    grids = {t.name: (t.scales[0], t.zero_points[0] if t.zero_points else 0, t.dtype) for t in info.tensors
             if not t.constant and t.dtype in ("int8", "uint8", "int16") and t.scales}
    io = {t.name for t in info.inputs + info.outputs}
    sig: dict[str, float] = {}
    err: dict[str, float] = {}
    prep = TfliteRunner(float_tfl, xnnpack=False)
    for i in range(min(n, len(data))):
        s = data.loader(i)
        s = next(iter(s.values())) if isinstance(s, dict) else s
        for name, a in _all_tensors(Path(float_tfl), prep.prepare(s)).items():
            if name not in grids or name in io:
                continue
            scale, zp, dt = grids[name]
            lo, hi = np.iinfo(np.dtype(dt)).min, np.iinfo(np.dtype(dt)).max
            r = (np.clip(np.round(a / scale) + zp, lo, hi) - zp) * scale
            sig[name] = sig.get(name, 0.0) + float((a ** 2).sum())
            err[name] = err.get(name, 0.0) + float(((a - r) ** 2).sum())
    return sorted(((k, err[k] / max(sig[k], 1e-30)) for k in sig), key=lambda t: -t[1])


def float_island(info: TfliteInfo, tensor: str) -> list[str]:
    """Output tensor names of the ops that write or read ``tensor`` (``info``: the float model):
    LiteRT's quantizer's handle for leaving those ops, and so ``tensor``, in float."""
    idx = {t.name: t.index for t in info.tensors}.get(tensor)
    if idx is None:
        return []
    ops = [o for o in info.ops if idx in o.outputs or idx in o.inputs]
    return list(dict.fromkeys(info.tensors[o.outputs[0]].name for o in ops if o.outputs))


def islands(info: TfliteInfo, tensors: list[str]) -> tuple[str, ...]:
    """The union of the islands of ``tensors``, in order, each op once."""
    out: list[str] = []
    for t in tensors:
        out += float_island(info, t)
    return tuple(dict.fromkeys(out))


def float_cost(info: TfliteInfo, tensors: list[str], already: tuple[str, ...] = ()) -> int:
    """Bytes the islands of ``tensors``, with the ops ``already`` float (island outputs), add
    over INT8 (``info``: the float model): their ops' float32 weights at 4 bytes instead of 1,
    biases at 4 as before."""
    return ops_cost(info, (*already, *islands(info, tensors)))


def ops_cost(info: TfliteInfo, outputs: tuple[str, ...] | list[str]) -> int:
    """Bytes over INT8 of keeping the ops that write ``outputs`` float (their weights, once each)."""
    outs = set(outputs)
    seen: set[int] = set()
    extra = 0
    for o in info.ops:
        if o.outputs and info.tensors[o.outputs[0]].name in outs:
            for i in o.inputs[1:2]:  # the weight operand; biases cost the same in int32
                t = info.tensors[i] if i >= 0 else None
                if t is not None and t.constant and t.index not in seen:
                    seen.add(t.index)
                    extra += 3 * int(np.prod(t.shape))
    return extra


def within_cost(info: TfliteInfo, ranked: list[str], max_bytes: int, already: tuple[str, ...] = ()) -> list[str]:
    """The ranked tensors, in order, whose islands fit together, with the ops ``already`` float,
    in ``max_bytes`` over INT8: a board that runs float still has a size budget (an island
    around a late expand conv costs MBs)."""
    keep: list[str] = []
    for t in ranked:
        if float_cost(info, keep + [t], already) <= max_bytes:
            keep.append(t)
    return keep


__all__ = ["activation_noise", "float_island", "islands", "float_cost", "ops_cost", "within_cost"]
