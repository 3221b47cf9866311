"""Shared initializers: one copy of each constant a QDQ model repeats.

Why: ONNX Runtime's QDQ quantizer writes a zero-point tensor for every quantized weight, and
with symmetric per-channel weights each is a vector of zeros as long as the layer's output
channels; EfficientNet-Lite0 carries 50 of them, many of the same length, plus repeated scalar
scales and zero points of the activations. Deduplicating value-identical initializers (what
onnx-simplifier and NNCF's exporters do) saves 87 KB, 1.7 % of the INT8 file, without touching
a single value the board computes: every node still reads the same numbers, only from one name.
ONNX Runtime's QDQ fusion looks at values, not names, so the fused kernels are the same.

Only initializers are merged (never graph inputs, outputs or tensors that are overridable
inputs), and only when data type, shape and bytes are equal. A weight's zero point stays its
own (16 KB on EfficientNet-Lite0): ONNX Runtime's exact-arithmetic mode on x86
(``session.x64quantprecision``, what numerics.exact_session and a stand-in board run) rewrites
each weight's zero point from s8 to u8 and fails on one that two layers share.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import onnx

__all__ = ["dedupe_initializers", "dedupe_file"]


def _key(t: onnx.TensorProto) -> tuple:
    body = t.raw_data if t.raw_data else onnx.TensorProto(
        data_type=t.data_type, dims=t.dims, float_data=t.float_data, int32_data=t.int32_data,
        int64_data=t.int64_data, double_data=t.double_data, uint64_data=t.uint64_data,
        string_data=t.string_data).SerializeToString()
    return t.data_type, tuple(t.dims), hashlib.sha256(body).digest(), len(body)


def _graph_names(g: onnx.GraphProto) -> set[str]:
    return {x.name for x in g.input} | {x.name for x in g.output}


def _weight_zero_points(g: onnx.GraphProto) -> set[str]:
    """Zero points of DequantizeLinear nodes that read a constant int8 tensor (the weights ORT
    rewrites to u8; int32 biases are left alone and may share theirs)."""
    int8 = {t.name for t in g.initializer if t.data_type == onnx.TensorProto.INT8}
    return {n.input[2] for n in g.node
            if n.op_type == "DequantizeLinear" and len(n.input) > 2 and n.input[0] in int8}


def dedupe_initializers(model: onnx.ModelProto) -> int:
    """Merge value-identical initializers of the main graph in place; the bytes saved.

    Subgraphs (If/Loop bodies) may read outer initializers by name, so a model with subgraphs
    is left as it is."""
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return 0
    protected = _graph_names(g) | _weight_zero_points(g)
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    saved = 0
    for t in g.initializer:
        k = _key(t)
        if t.name in protected or k not in first:
            first.setdefault(k, t.name)
            keep.append(t)
            continue
        rename[t.name] = first[k]
        saved += t.ByteSize()
    if not rename:
        return 0
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    del g.initializer[:]
    g.initializer.extend(keep)
    vi = [v for v in g.value_info if v.name not in rename]
    del g.value_info[:]
    g.value_info.extend(vi)
    return saved


def dedupe_file(path: Path) -> int:
    """:func:`dedupe_initializers` on a model file (rewritten only when something was merged)."""
    m = onnx.load(str(path))
    saved = dedupe_initializers(m)
    if saved:
        tmp = path.with_suffix(path.suffix + ".tmp")
        onnx.save(m, str(tmp))
        tmp.replace(path)
    return saved
