"""Carry the ONNX path's quantization decisions into a full-integer ``.tflite``.

`edgepack quantize` (ONNX) searches calibration rules, GPTQ weight rounding and float layers,
judged in the board's exact arithmetic; LiteRT's quantizer knows none of that. Both formats
describe the same arithmetic (int8 per-channel symmetric weights, int32 biases with scale
``input_scale * weight_scale``, affine 8-bit activations: ONNX's uint8 zero point z is LiteRT's
int8 zero point z - 128 on the same grid), so the chosen QDQ model's integers and scales can be
written into the ``.tflite`` LiteRT's quantizer laid out: one search, two formats, and since
LiteRT's XNNPACK int8 kernels are exact, the ``.tflite`` computes what the ONNX model was judged on.

Ops are matched by the ONNX node that produced each tensor (the translation names ``.tflite``
tensors after ONNX outputs); an op with no quantized counterpart keeps what LiteRT's quantizer
gave it, and is reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .biasfix import _arr, load_model_t, save_model_t


@dataclass
class TransplantReport:
    ops: int = 0                       # conv/FC ops whose weights, bias and output grid came from ONNX
    activations: int = 0               # activation tensors given the ONNX grid
    kept: list[str] = field(default_factory=list)   # ops left as LiteRT's quantizer made them


def _qdq_index(qdq):
    """QDQ model lookups: node by name, Q params of a tensor, and DQ'd initializer of a tensor."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    dq_of, q_after = {}, {}
    for n in qdq.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            dq_of[n.output[0]] = (inits[n.input[0]], inits[n.input[1]], inits[n.input[2]] if len(n.input) > 2 else None)
        if n.op_type == "QuantizeLinear":
            q_after[n.input[0]] = (float(inits[n.input[1]]), int(inits[n.input[2]]) if len(n.input) > 2 else 0,
                                   inits[n.input[2]].dtype if len(n.input) > 2 else np.uint8)
    nodes = {n.name: n for n in qdq.graph.node if n.name}
    return nodes, q_after, dq_of


def float_layer_tensors(fp32_onnx: str | Path, layers: list[str]) -> list[str]:
    """The ``.tflite`` tensor names (ONNX output names) of the ONNX node names kept in float."""
    import onnx

    fp = onnx.load(str(fp32_onnx), load_external_data=False)
    by = {n.name: n.output[0] for n in fp.graph.node}
    return [by[n] for n in layers if n in by]


def transplant(aeq_tflite: str | Path, fp32_onnx: str | Path, qdq_onnx: str | Path, out: str | Path, *,
               float_tflite: str | Path) -> TransplantReport:
    """Rewrite ``aeq_tflite`` (LiteRT's quantizer's output for ``float_tflite``, the translation of
    ``fp32_onnx``) with the integers and scales of ``qdq_onnx`` (edgepack's INT8 QDQ model of the
    same network). Biases of ops left as they were are re-quantized for their new input grid."""
    import onnx
    from ai_edge_litert import schema_py_generated as S

    fp = onnx.load(str(fp32_onnx), load_external_data=False)
    qdq = onnx.load(str(qdq_onnx))
    producer = {o: n.name for n in fp.graph.node for o in n.output}  # fp32 tensor -> node name
    # a Relu/Clip fused into its conv: the .tflite tensor is named after the conv's output
    for n in fp.graph.node:
        if n.op_type in ("Relu", "Clip") and n.input[0] in producer:
            producer[n.output[0]] = producer[n.input[0]]
    nodes, q_after, dq_of = _qdq_index(qdq)
    m = load_model_t(aeq_tflite)
    g = m.subgraphs[0]
    names = {v: k for k, v in vars(S.BuiltinOperator).items() if isinstance(v, int)}
    rep = TransplantReport()
    flattened: dict[int, list[int]] = {}     # tensor -> the NHWC shape a RESHAPE flattened into it

    def grid(qdq_tensor: str):
        if qdq_tensor not in q_after:
            return None
        s, z, dt = q_after[qdq_tensor]
        return s, (z - 128 if np.dtype(dt) == np.uint8 else z)

    def set_grid(t, sz) -> None:
        if t.type != S.TensorType.INT8 or t.quantization is None or sz is None:
            return
        t.quantization.scale, t.quantization.zeroPoint = [float(sz[0])], [int(sz[1])]
        rep.activations += 1

    def name_of(t) -> str:
        return t.name.decode() if isinstance(t.name, bytes) else str(t.name)

    # the model input
    for i in g.inputs:
        set_grid(g.tensors[i], grid(fp.graph.input[0].name))
    for op in g.operators:
        oc = m.operatorCodes[op.opcodeIndex]
        kind = names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "")
        if not op.outputs:
            continue
        ot = g.tensors[op.outputs[0]]
        if kind == "RESHAPE" and len(g.tensors[op.inputs[0]].shape) == 4:
            flattened[op.outputs[0]] = list(g.tensors[op.inputs[0]].shape)
        if kind == "QUANTIZE":  # after an op kept in float: the grid ONNX put on that op's output
            src = nodes.get(producer.get(name_of(g.tensors[op.inputs[0]]), ""))
            set_grid(ot, grid(src.output[0]) if src is not None else None)
            continue
        if kind == "RESHAPE" and g.tensors[op.inputs[0]].quantization is not None and ot.type == S.TensorType.INT8:
            qi = g.tensors[op.inputs[0]].quantization  # LiteRT's int8 RESHAPE copies: same grid in and out
            ot.quantization.scale, ot.quantization.zeroPoint = list(qi.scale), list(qi.zeroPoint)
            continue
        node = nodes.get(producer.get(name_of(ot), ""))
        if node is None:
            if kind not in ("QUANTIZE", "DEQUANTIZE"):
                rep.kept.append(f"{kind} {name_of(ot)}")
            continue
        set_grid(ot, grid(node.output[0]))
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") and len(op.inputs) >= 3:
            w_t, b_t = g.tensors[op.inputs[1]], g.tensors[op.inputs[2]]
            wq = dq_of.get(node.input[1])
            bq = dq_of.get(node.input[2]) if len(node.input) > 2 else None
            if wq is None or bq is None or w_t.type != S.TensorType.INT8:
                rep.kept.append(f"{kind} {name_of(ot)} (float in the ONNX model)")
                continue
            q, s, _ = wq
            if kind == "CONV_2D":
                q = q.transpose(0, 2, 3, 1)
            elif kind == "DEPTHWISE_CONV_2D":
                q = q.transpose(1, 2, 3, 0)
            else:  # FULLY_CONNECTED: [out, in], columns in the order the translation flattened them
                if not (node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)):
                    q = q.T                     # MatMul, or Gemm without transB: [in, out]
                q = _hwc_columns(q, flattened.get(op.inputs[0]))
            old = _arr(m, w_t, np.int8)
            if old is None or tuple(old.shape) != tuple(q.shape):
                rep.kept.append(f"{kind} {name_of(ot)} (weight layout differs)")
                continue
            m.buffers[w_t.buffer].data = np.frombuffer(np.ascontiguousarray(q, np.int8).tobytes(), np.uint8).copy()
            w_t.quantization.scale = [float(v) for v in np.atleast_1d(s)]
            w_t.quantization.zeroPoint = [0] * len(w_t.quantization.scale)
            w_t.quantization.quantizedDimension = 3 if kind == "DEPTHWISE_CONV_2D" else 0
            bqi, bs, _ = bq
            m.buffers[b_t.buffer].data = np.frombuffer(np.ascontiguousarray(bqi, np.int32).tobytes(), np.uint8).copy()
            b_t.quantization.scale = [float(v) for v in np.atleast_1d(bs)]
            b_t.quantization.zeroPoint = [0] * len(b_t.quantization.scale)
            rep.ops += 1
    _rescale_biases(m, load_model_t(float_tflite), rep)
    save_model_t(m, out)
    return rep


def _hwc_columns(q: np.ndarray, nhwc: list[int] | None) -> np.ndarray:
    """A fully connected weight after a flatten: ONNX flattened its input C,H,W, the ``.tflite``
    flattens H,W,C (from_onnx permuted the float weight's columns the same way)."""
    if nhwc is None or q.shape[1] != nhwc[1] * nhwc[2] * nhwc[3]:
        return q
    _, h, w, c = nhwc
    return q.reshape(q.shape[0], c, h, w).transpose(0, 2, 3, 1).reshape(q.shape[0], -1)


def _rescale_biases(m, f, rep: TransplantReport) -> None:
    """Every int32 bias on the grid input_scale * weight_scale of its op, as LiteRT's kernels assume;
    one that is not (its input's grid changed) is re-quantized from the float model."""
    from ai_edge_litert import schema_py_generated as S

    g = m.subgraphs[0]
    fb = {t.name: t for t in f.subgraphs[0].tensors}
    for op in g.operators:
        if len(op.inputs) < 3 or op.inputs[2] < 0:
            continue
        x, w, b = (g.tensors[i] for i in op.inputs[:3])
        if b.type != S.TensorType.INT32 or x.quantization is None or w.quantization is None or not x.quantization.scale:
            continue
        want = float(x.quantization.scale[0]) * np.asarray(w.quantization.scale, np.float64)
        have = np.asarray(b.quantization.scale, np.float64)
        if have.shape == want.shape and np.allclose(have, want, rtol=1e-6, atol=0):
            continue
        src = fb.get(b.name)
        bf = _arr(f, src, np.float32) if src is not None else None
        if bf is None:
            continue
        want = np.broadcast_to(want, bf.shape)
        bq = np.clip(np.round(bf / want), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        m.buffers[b.buffer].data = np.frombuffer(bq.tobytes(), np.uint8).copy()
        b.quantization.scale, b.quantization.zeroPoint = [float(v) for v in want], [0] * len(want)


__all__ = ["transplant", "TransplantReport", "float_layer_tensors"]
