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
    input_name: str
    input_shape: tuple  # ints or dim names
    output_name: str
    ops: Counter
    size_bytes: int
    metadata: dict

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
    if len(inputs) != 1:
        raise ModelError(f"{p}: expected one input tensor, found {len(inputs)} "
                         f"({', '.join(i.name for i in inputs)})")
    i0 = inputs[0]
    if i0.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelError(f"{p}: input {i0.name!r} is not float32")
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                  for d in i0.type.tensor_type.shape.dim)
    meta = {pr.key: pr.value for pr in m.metadata_props}
    for n in m.graph.node:  # node names are how layers are reported and excluded
        if not n.name:
            n.name = f"{n.op_type}_{id(n) & 0xFFFFFF:x}"
    return ModelInfo(p, m, i0.name, shape, m.graph.output[0].name, ops, p.stat().st_size, meta)


def check_sample_shape(info: ModelInfo, sample: np.ndarray, what: str) -> None:
    """The model's input without its batch axis must match one data sample."""
    want = info.input_shape[1:]
    got = tuple(sample.shape)
    ok = len(want) == len(got) and all(not isinstance(w, int) or w in (0, g) for w, g in zip(want, got))
    if not ok:
        raise DataError(f"{what} sample shape {got} does not fit model input {info.input_name!r} "
                        f"{tuple(info.input_shape)} (batch axis first)")
    if sample.dtype.kind not in "fiu":
        raise DataError(f"{what} samples must be numeric, got {sample.dtype}")
