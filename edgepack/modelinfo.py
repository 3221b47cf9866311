"""Checks on an input model before any work is done: is it ONNX, float, and shaped as the data."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import DataError, ModelError

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
                 "ConvInteger", "DynamicQuantizeLinear", "MatMulNBits", "QGemm", "QLinearAdd"}
WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


@dataclass
class ModelInfo:
    path: Path
    model: onnx.ModelProto
    input_names: list[str]
    input_shapes: dict[str, tuple]  # ints or dim names
    input_kinds: dict[str, str]     # numpy dtype kind per input: "f" float, "i" integer
    output_name: str
    ops: Counter
    size_bytes: int
    metadata: dict
    input_dtypes: dict[str, str] = None   # numpy dtype name per input ("float32", "int64", ...)

    @property
    def input_name(self) -> str:
        return self.input_names[0]

    @property
    def input_shape(self) -> tuple:
        return self.input_shapes[self.input_names[0]]

    @property
    def weight_nodes(self) -> list[str]:
        return [n.name for n in self.model.graph.node if n.op_type in WEIGHT_OPS]


def load_model(path: str | Path, *, allow_quantized: bool = False) -> ModelInfo:
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model {p}: no such file")
    head = p.read_bytes()[:4]
    if p.suffix == ".tflite" or head[:4] == b"TFL3" or (len(head) >= 4 and p.read_bytes()[4:8] == b"TFL3"):
        raise ModelError(f"{p} is a TFLite model; `edgepack quantize` takes ONNX (convert it first)")
    try:
        m = onnx.load(str(p))
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelError(f"{p} is not an ONNX model ({e.__class__.__name__})") from None
    if not m.graph.node:
        raise ModelError(f"{p} is not an ONNX model (no graph nodes)")
    ops = Counter(n.op_type for n in m.graph.node)
    q = sorted(set(ops) & QUANTIZED_OPS)
    if q and not allow_quantized:
        raise ModelError(f"{p} is already quantized (has {', '.join(q)}); pass the FP32 model")
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if not inputs:
        raise ModelError(f"{p}: the graph has no inputs")
    kinds = {}
    shapes = {}
    dtypes = {}
    for i in inputs:
        et = i.type.tensor_type.elem_type
        if et in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            kinds[i.name] = "f"
            dtypes[i.name] = "float32" if et == onnx.TensorProto.FLOAT else "float16"
        elif et in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            kinds[i.name] = "i"
            dtypes[i.name] = "int64" if et == onnx.TensorProto.INT64 else "int32"
        else:
            raise ModelError(f"{p}: input {i.name!r} has element type {et}; expected float or integer ids")
        shapes[i.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                               for d in i.type.tensor_type.shape.dim)
    meta = {pr.key: pr.value for pr in m.metadata_props}
    for n in m.graph.node:  # node names are how layers are reported and excluded
        if not n.name:
            n.name = f"{n.op_type}_{id(n) & 0xFFFFFF:x}"
    return ModelInfo(p, m, [i.name for i in inputs], shapes, kinds, m.graph.output[0].name, ops,
                     p.stat().st_size, meta, dtypes)


def check_sample_shape(info: ModelInfo, sample, what: str) -> None:
    """Each model input without its batch axis must match one data sample."""
    if not isinstance(sample, dict):
        if len(info.input_names) != 1:
            raise DataError(f"{what} samples are single arrays but the model takes {len(info.input_names)} "
                            f"inputs ({', '.join(info.input_names)}): store them as named arrays in an .npz")
        sample = {info.input_name: sample}
    if set(sample) != set(info.input_names):
        raise DataError(f"{what} arrays {sorted(sample)} do not match the model inputs {sorted(info.input_names)}")
    for name, arr in sample.items():
        want = info.input_shapes[name][1:]
        got = tuple(np.shape(arr))
        ok = len(want) == len(got) and all(not isinstance(w, int) or w in (0, g) for w, g in zip(want, got))
        if not ok:
            raise DataError(f"{what} sample shape {got} does not fit model input {name!r} "
                            f"{tuple(info.input_shapes[name])} (batch axis first)")
        kind = np.asarray(arr).dtype.kind
        if kind not in "fiu" or (info.input_kinds[name] == "i" and kind == "f"):
            raise DataError(f"{what} input {name!r} has dtype {np.asarray(arr).dtype}; the model wants "
                            f"{'integers' if info.input_kinds[name] == 'i' else 'floats'}")
        if info.input_kinds[name] == "f" and kind in "iu":
            raise DataError(f"{what} input {name!r} has integer dtype {np.asarray(arr).dtype} but the model takes "
                            "floats: store the preprocessed float values (or declare --preprocess for images)")
        want_dt = (info.input_dtypes or {}).get(name)
        if kind in "iu" and want_dt and np.asarray(arr).dtype != np.dtype(want_dt):
            raise DataError(f"{what} input {name!r} has dtype {np.asarray(arr).dtype} but the model input takes "
                            f"{want_dt}: store the arrays as {want_dt}")
        if kind == "f" and not np.isfinite(arr).all():
            raise DataError(f"{what} input {name!r} holds NaN or Inf values: clean the data before quantizing")


def _dtypes(sample) -> dict[str, str]:
    return {k: str(np.asarray(v).dtype) for k, v in (sample.items() if isinstance(sample, dict) else [("", sample)])}


def check_samples(info: ModelInfo, data, what: str, limit: int = 64) -> dict[str, str]:
    """Shape, dtype and finiteness before any work starts: a NaN or a wrong dtype deep in a data
    set must not cost a whole calibration run. Arrays in memory are checked whole (cheap); image
    folders on their first ``limit`` samples (each one is a decode). Returns the samples' dtypes."""
    n = len(data) if getattr(data, "in_memory", False) else min(len(data), limit)
    first = None
    for i in range(n):
        sample = data.loader(i)
        check_sample_shape(info, sample, what)
        dt = _dtypes(sample)
        if first is None:
            first = dt
        elif dt != first:
            raise DataError(f"{what} sample {i} has dtype {_fmt(dt)} but sample 0 has {_fmt(first)}: "
                            "give every sample the same dtype")
    return first or {}


def check_same_dtypes(checked: dict[str, dict[str, str]]) -> None:
    """Every split (calibration, search, evaluation) carries the same dtypes: a split in another
    dtype was preprocessed another way, and its figures would not describe the others."""
    items = [(w, d) for w, d in checked.items() if d]
    for w, d in items[1:]:
        if d != items[0][1]:
            raise DataError(f"{w} data has dtype {_fmt(d)} but {items[0][0]} data has {_fmt(items[0][1])}: "
                            "preprocess every split the same way")


def _fmt(d: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" if k else v for k, v in d.items())
