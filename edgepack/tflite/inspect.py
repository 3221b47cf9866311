"""Read a ``.tflite`` file's graph and quantization parameters through LiteRT's own flatbuffer
schema (``ai_edge_litert.schema_py_generated``), without loading it in an interpreter.

Why the schema and not ``Interpreter.get_tensor_details()``: the interpreter applies its
delegates and may drop or fuse tensors, and it needs every op's kernel to be linked in; the file
is what is shipped, so the file is what is reported (scales, zero points, the quantized axis,
every op's input and output dtypes). A file that is not a TFLite flatbuffer, or whose tables point
outside it, is refused with one line: the bytes may come from anywhere.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError

FLOAT_TYPES = ("float32", "float16", "float64", "bfloat16")


@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    constant: bool                       # backed by a non-empty buffer (weights, biases, shapes)
    scales: tuple[float, ...] = ()
    zero_points: tuple[int, ...] = ()
    quantized_dimension: int = 0

    @property
    def per_channel(self) -> bool:
        return len(self.scales) > 1


@dataclass(frozen=True)
class OpInfo:
    index: int
    op: str                              # BuiltinOperator name (CONV_2D, ...) or CUSTOM:<code>
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    input_dtypes: tuple[str, ...]
    output_dtypes: tuple[str, ...]

    @property
    def is_float(self) -> bool:
        """Computes in float: a float tensor among its inputs or outputs (QUANTIZE from float and
        DEQUANTIZE to float count: they are where the float part of a graph begins or ends)."""
        return any(d in FLOAT_TYPES for d in self.input_dtypes + self.output_dtypes)


@dataclass
class TfliteInfo:
    path: str
    size_bytes: int
    version: int
    description: str
    tensors: list[TensorInfo]
    ops: list[OpInfo]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    subgraphs: int = 1
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def float_ops(self) -> list[OpInfo]:
        return [o for o in self.ops if o.is_float]

    @property
    def float_tensors(self) -> list[TensorInfo]:
        return [t for t in self.tensors if t.dtype in FLOAT_TYPES]

    @property
    def full_integer(self) -> bool:
        """No float tensor and no float op anywhere, integer inputs and outputs included."""
        return not self.float_ops and not self.float_tensors

    def to_dict(self, *, tensors: bool = False) -> dict[str, Any]:
        d = {"path": self.path, "size_bytes": self.size_bytes, "version": self.version,
             "description": self.description, "subgraphs": self.subgraphs, "op_counts": self.op_counts,
             "full_integer": self.full_integer,
             "float_ops": [f"{o.op}#{o.index}" for o in self.float_ops],
             "inputs": [asdict(t) for t in self.inputs], "outputs": [asdict(t) for t in self.outputs],
             "dtype_counts": dict(Counter(t.dtype for t in self.tensors)),
             "per_channel_tensors": sum(t.per_channel for t in self.tensors)}
        if tensors:
            d["tensors"] = [asdict(t) for t in self.tensors]
            d["ops"] = [asdict(o) for o in self.ops]
        return d


def _names(cls: type) -> dict[int, str]:
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


def read_tflite(path: str | Path) -> TfliteInfo:
    """Parse ``path`` (every subgraph; ops and tensors of the first, the one that is invoked)."""
    p = Path(path)
    try:
        buf = p.read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read {p}: {e.strerror or e}") from None
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ModelError(f"{p} is not a TFLite model (no TFL3 flatbuffer identifier); pass a .tflite file")
    try:
        return _parse(p, buf)
    except ModelError:
        raise
    except Exception as e:  # a truncated or hostile flatbuffer: offsets outside the file, bad vectors
        raise ModelError(f"{p} is a damaged TFLite flatbuffer ({type(e).__name__}); re-export it") from None


def _parse(p: Path, buf: bytes) -> TfliteInfo:
    from ai_edge_litert import schema_py_generated as S

    types, opnames = _names(S.TensorType), _names(S.BuiltinOperator)
    m = S.Model.GetRootAs(buf, 0)
    if m.SubgraphsLength() < 1:
        raise ModelError(f"{p} has no subgraph")
    codes = []
    for i in range(m.OperatorCodesLength()):
        oc = m.OperatorCodes(i)
        code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
        name = opnames.get(code, f"OP_{code}")
        if name == "CUSTOM":
            name = f"CUSTOM:{(oc.CustomCode() or b'').decode('utf-8', 'replace')[:60]}"
        codes.append(name)
    g = m.Subgraphs(0)

    def buffer_nonempty(bi: int) -> bool:
        if bi <= 0 or bi >= m.BuffersLength():
            return False
        b = m.Buffers(bi)
        return b.DataLength() > 0 or b.Size() > 0

    tensors = []
    for i in range(g.TensorsLength()):
        t = g.Tensors(i)
        q = t.Quantization()
        scales: tuple[float, ...] = ()
        zps: tuple[int, ...] = ()
        qd = 0
        if q is not None and q.ScaleLength():
            scales = tuple(float(x) for x in q.ScaleAsNumpy())
            zps = tuple(int(x) for x in q.ZeroPointAsNumpy()) if q.ZeroPointLength() else (0,) * len(scales)
            qd = int(q.QuantizedDimension())
        shape = tuple(int(x) for x in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        tensors.append(TensorInfo(index=i, name=(t.Name() or b"").decode("utf-8", "replace"),
                                  dtype=types.get(t.Type(), f"type{t.Type()}").lower(), shape=shape,
                                  constant=buffer_nonempty(t.Buffer()), scales=scales, zero_points=zps,
                                  quantized_dimension=qd))

    def dt(ix: int) -> str:
        return tensors[ix].dtype if 0 <= ix < len(tensors) else "none"

    ops = []
    for i in range(g.OperatorsLength()):
        o = g.Operators(i)
        ins = tuple(int(x) for x in o.InputsAsNumpy()) if o.InputsLength() else ()
        outs = tuple(int(x) for x in o.OutputsAsNumpy()) if o.OutputsLength() else ()
        idx = o.OpcodeIndex()
        ops.append(OpInfo(index=i, op=codes[idx] if idx < len(codes) else f"OPCODE_{idx}", inputs=ins, outputs=outs,
                          input_dtypes=tuple(dt(x) for x in ins if x >= 0),
                          output_dtypes=tuple(dt(x) for x in outs if x >= 0)))
    gin = [tensors[int(x)] for x in (g.InputsAsNumpy() if g.InputsLength() else ())]
    gout = [tensors[int(x)] for x in (g.OutputsAsNumpy() if g.OutputsLength() else ())]
    return TfliteInfo(path=str(p), size_bytes=len(buf), version=int(m.Version()),
                      description=(m.Description() or b"").decode("utf-8", "replace")[:200], tensors=tensors,
                      ops=ops, inputs=gin, outputs=gout, subgraphs=int(m.SubgraphsLength()),
                      op_counts=dict(Counter(o.op for o in ops)))


__all__ = ["TensorInfo", "OpInfo", "TfliteInfo", "read_tflite", "FLOAT_TYPES"]
