"""Tiny real .tflite models written with LiteRT's own flatbuffer schema (no TensorFlow needed).

``int8_mlp`` is a full-integer FULLY_CONNECTED model exactly as LiteRT's quantizer writes one
(int8 input/output with scale and zero point, per-channel int8 weights, int32 bias with scale
input_scale * weight_scale); ``float_tail=True`` appends DEQUANTIZE + a float SOFTMAX, the
shape of a model whose converter left the last op in float. ``float_mlp`` is the float model the
int8 one approximates. Every model here runs in the real LiteRT interpreter.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _model(S):
    m = S.ModelT()
    m.version = 3
    m.description = "edgepack test fixture"
    m.buffers = [S.BufferT()]
    m.operatorCodes = []
    sg = S.SubGraphT()
    sg.tensors, sg.operators = [], []
    m.subgraphs = [sg]
    return m, sg


def _tensor(S, m, sg, name, shape, ttype, data=None, scale=None, zp=None, axis=0):
    t = S.TensorT()
    t.name, t.shape, t.type, t.buffer = name, np.array(shape, np.int32), ttype, 0
    if data is not None:
        b = S.BufferT()
        b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
        m.buffers.append(b)
        t.buffer = len(m.buffers) - 1
    if scale is not None:
        q = S.QuantizationParametersT()
        q.scale = [float(s) for s in np.atleast_1d(scale)]
        q.zeroPoint = [int(z) for z in np.atleast_1d(zp if zp is not None else 0)]
        q.quantizedDimension = axis
        t.quantization = q
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _op(S, m, sg, code, ins, outs, otype=0, opt=None):
    idx = next((i for i, c in enumerate(m.operatorCodes) if c.builtinCode == code), None)
    if idx is None:
        oc = S.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
        m.operatorCodes.append(oc)
        idx = len(m.operatorCodes) - 1
    o = S.OperatorT()
    o.opcodeIndex, o.inputs, o.outputs = idx, list(ins), list(outs)
    o.builtinOptionsType, o.builtinOptions = otype, opt
    sg.operators.append(o)


def _save(m, sg, ins, outs, path: Path) -> Path:
    import flatbuffers
    from ai_edge_litert import schema_py_generated as S

    sg.inputs, sg.outputs = ins, outs
    sig = S.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    sig.inputs, sig.outputs = [], []
    for lst, ts in ((sig.inputs, ins), (sig.outputs, outs)):
        for i in ts:
            tm = S.TensorMapT()
            tm.name, tm.tensorIndex = sg.tensors[i].name, i
            lst.append(tm)
    m.signatureDefs = [sig]
    b = flatbuffers.Builder(1 << 16)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    path.write_bytes(bytes(b.Output()))
    return path


def weights(n_in: int = 8, n_out: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.5, (n_out, n_in)).astype(np.float32), rng.normal(0, 0.2, n_out).astype(np.float32)


def float_mlp(path: Path, w: np.ndarray, b: np.ndarray) -> Path:
    from ai_edge_litert import schema_py_generated as S

    m, sg = _model(S)
    x = _tensor(S, m, sg, "x", [1, w.shape[1]], S.TensorType.FLOAT32)
    wt = _tensor(S, m, sg, "fc/w", list(w.shape), S.TensorType.FLOAT32, w)
    bt = _tensor(S, m, sg, "fc/b", [w.shape[0]], S.TensorType.FLOAT32, b)
    y = _tensor(S, m, sg, "y", [1, w.shape[0]], S.TensorType.FLOAT32)
    _op(S, m, sg, S.BuiltinOperator.FULLY_CONNECTED, [x, wt, bt], [y], S.BuiltinOptions.FullyConnectedOptions,
        S.FullyConnectedOptionsT())
    return _save(m, sg, [x], [y], path)


IN_SCALE, IN_ZP, OUT_SCALE, OUT_ZP = 2.0 / 255, -1, 4.0 / 255, 3


def int8_mlp(path: Path, w: np.ndarray, b: np.ndarray, *, float_tail: bool = False,
             w_scale: np.ndarray | None = None, bias_q: np.ndarray | None = None) -> Path:
    """Full-integer FC: y = FC(x) with per-channel symmetric int8 weights (axis 0)."""
    from ai_edge_litert import schema_py_generated as S

    m, sg = _model(S)
    ws = np.abs(w).max(1) / 127 if w_scale is None else w_scale
    wq = np.clip(np.round(w / ws[:, None]), -127, 127).astype(np.int8)
    bq = np.round(b / (IN_SCALE * ws)).astype(np.int32) if bias_q is None else bias_q
    x = _tensor(S, m, sg, "x", [1, w.shape[1]], S.TensorType.INT8, scale=IN_SCALE, zp=IN_ZP)
    wt = _tensor(S, m, sg, "fc/w", list(w.shape), S.TensorType.INT8, wq, scale=ws, zp=np.zeros(len(ws)), axis=0)
    bt = _tensor(S, m, sg, "fc/b", [w.shape[0]], S.TensorType.INT32, bq, scale=IN_SCALE * ws, zp=np.zeros(len(ws)))
    y = _tensor(S, m, sg, "y", [1, w.shape[0]], S.TensorType.INT8, scale=OUT_SCALE, zp=OUT_ZP)
    _op(S, m, sg, S.BuiltinOperator.FULLY_CONNECTED, [x, wt, bt], [y], S.BuiltinOptions.FullyConnectedOptions,
        S.FullyConnectedOptionsT())
    outs = [y]
    if float_tail:
        yf = _tensor(S, m, sg, "y_float", [1, w.shape[0]], S.TensorType.FLOAT32)
        _op(S, m, sg, S.BuiltinOperator.DEQUANTIZE, [y], [yf])
        p = _tensor(S, m, sg, "probs", [1, w.shape[0]], S.TensorType.FLOAT32)
        opt = S.SoftmaxOptionsT()
        opt.beta = 1.0
        _op(S, m, sg, S.BuiltinOperator.SOFTMAX, [yf], [p], S.BuiltinOptions.SoftmaxOptions, opt)
        outs = [p]
    return _save(m, sg, [x], outs, path)


def int32_add(path: Path) -> Path:
    """An int32 ADD: a model LiteRT runs but XNNPACK takes no op of (no int32 kernels)."""
    from ai_edge_litert import schema_py_generated as S

    m, sg = _model(S)
    a = _tensor(S, m, sg, "a", [1, 4], S.TensorType.INT32)
    c = _tensor(S, m, sg, "c", [1, 4], S.TensorType.INT32, np.arange(4, dtype=np.int32).reshape(1, 4))
    y = _tensor(S, m, sg, "y", [1, 4], S.TensorType.INT32)
    _op(S, m, sg, S.BuiltinOperator.ADD, [a, c], [y], S.BuiltinOptions.AddOptions, S.AddOptionsT())
    return _save(m, sg, [a], [y], path)
