"""Float ONNX CNN/MLP -> float ``.tflite``, written with LiteRT's own flatbuffer schema.

Why not TensorFlow's converter: it needs TensorFlow (about 600 MB, and onnx2tf pins an older one)
for a graph of a dozen op kinds. The translation covers what edge CNNs/MLPs are made of (Conv
incl. depthwise, Relu, Clip(0,6), Add, MaxPool, GlobalAveragePool, Flatten/Reshape-to-2D, Gemm,
MatMul) and refuses anything else with one line naming the op; other graphs come in as a float
``.tflite`` made by onnx2tf or litert-torch (``scripts/setup-tflite.sh`` installs them). NCHW
becomes NHWC, as every LiteRT vision model is; Relu is fused into the preceding Conv / FC, as the
TF converter does. Its float outputs agree with ONNX Runtime's (tests/test_tflite.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError

SIGNATURE = "serving_default"
SUPPORTED_OPS = ("Conv", "Relu", "Clip(0,6)", "Add", "MaxPool", "GlobalAveragePool", "ReduceMean(H,W)", "Flatten",
                 "Reshape", "Gemm", "MatMul")


def onnx_to_tflite(onnx_path: Path, out: Path) -> Path:
    """Translate a float ONNX CNN/MLP (Conv incl. depthwise, Relu, Clip(0,6), Add, MaxPool,
    GlobalAveragePool, Flatten/Reshape-to-2D, Gemm, MatMul) with static shapes to .tflite.
    Constant-fold dynamic shape/pad arithmetic first (see fold_for_tflite).

    Written with LiteRT's own flatbuffer schema (ai_edge_litert.schema_py_generated): no
    TensorFlow converter needed. NCHW becomes NHWC (the tflite input is NHWC); Relu is fused into
    the preceding Conv / FullyConnected, as the TF converter would do.
    """
    import flatbuffers
    import onnx
    from ai_edge_litert import schema_py_generated as S
    from onnx import helper as oh, numpy_helper

    try:
        m = onnx.load(str(onnx_path))
    except Exception as e:
        raise ModelError(f"{onnx_path} is not a readable ONNX model ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    g = m.graph
    if len(g.input) != 1 or len(g.output) != 1:
        raise ModelError(f"{Path(onnx_path).name}: the LiteRT translation takes one input and one output "
                         f"(has {len(g.input)} and {len(g.output)})")
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    model = S.ModelT()
    model.version = 3
    model.description = "edgepack.tflite.from_onnx"
    model.buffers = [S.BufferT()]
    model.operatorCodes = []
    sg = S.SubGraphT()
    sg.tensors, sg.operators = [], []
    tid: dict[str, int] = {}
    shape: dict[str, list[int]] = {}
    codes: dict[int, int] = {}

    def tensor(name: str, shp: list[int], data: np.ndarray | None = None) -> int:
        t = S.TensorT()
        t.name, t.shape, t.type = name, np.array(shp, np.int32), S.TensorType.FLOAT32
        t.buffer = 0
        if data is not None:
            b = S.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data, np.float32).tobytes(), np.uint8)
            model.buffers.append(b)
            t.buffer = len(model.buffers) - 1
        sg.tensors.append(t)
        tid[name] = len(sg.tensors) - 1
        shape[name] = list(shp)
        return tid[name]

    def op(code: int, ins: list[int], outs: list[int], opt_type: int = 0, opt: Any = None) -> S.OperatorT:
        if code not in codes:
            oc = S.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
            model.operatorCodes.append(oc)
            codes[code] = len(model.operatorCodes) - 1
        o = S.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = codes[code], ins, outs
        o.builtinOptionsType, o.builtinOptions = opt_type, opt
        sg.operators.append(o)
        return o

    inp = g.input[0]
    dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    nhwc = len(dims) == 4
    tensor(inp.name, [dims[0], dims[2], dims[3], dims[1]] if nhwc else dims)
    sg.inputs = [tid[inp.name]]
    alias: dict[str, str] = {}
    chw_of_flat: dict[str, tuple[int, int, int]] = {}
    last: dict[str, S.OperatorT] = {}
    for n in g.node:
        a = {x.name: oh.get_attribute_value(x) for x in n.attribute}
        x = alias.get(n.input[0], n.input[0]) if n.input else None
        o = n.output[0]
        if n.op_type in ("Relu", "Clip") and x in last:
            act = S.ActivationFunctionType.RELU
            if n.op_type == "Clip":
                lo = float(inits[n.input[1]]) if len(n.input) > 1 and n.input[1] else float(a.get("min", -np.inf))
                hi = float(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] else float(a.get("max", np.inf))
                if (lo, hi) != (0.0, 6.0):
                    raise ModelError(f"{Path(onnx_path).name}: Clip({lo}, {hi}) has no fused LiteRT activation "
                                     "(only ReLU6 = Clip(0, 6))")
                act = S.ActivationFunctionType.RELU6
            last[x].builtinOptions.fusedActivationFunction = act
            alias[o] = x
            continue
        if n.op_type == "Conv":
            w = inits[n.input[1]]
            b = inits[n.input[2]] if len(n.input) > 2 else np.zeros(w.shape[0], np.float32)
            N, H, W, C = shape[x]
            s = a.get("strides", [1, 1])
            kh, kw = w.shape[2], w.shape[3]
            pads = list(a.get("pads", [0, 0, 0, 0]))  # top, left, bottom, right

            def same(i: int, k: int, st: int) -> tuple[int, int]:
                tot = max((-(-i // st) - 1) * st + k - i, 0)
                return tot // 2, tot - tot // 2

            (pt, pb), (pl, pr) = same(H, kh, s[0]), same(W, kw, s[1])
            if pads == [pt, pl, pb, pr]:
                padding, oh_, ow = S.Padding.SAME, -(-H // s[0]), -(-W // s[1])
            else:
                if any(pads):  # explicit PAD op, then a VALID conv
                    pv = tensor(o + "/pads", [4, 2], None)
                    sg.tensors[pv].type = S.TensorType.INT32
                    bb = S.BufferT()
                    bb.data = np.frombuffer(np.array([[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]],
                                                     np.int32).tobytes(), np.uint8)
                    model.buffers.append(bb)
                    sg.tensors[pv].buffer = len(model.buffers) - 1
                    H, W = H + pads[0] + pads[2], W + pads[1] + pads[3]
                    padded = tensor(o + "/padded", [N, H, W, C])
                    op(S.BuiltinOperator.PAD, [tid[x], pv], [padded], S.BuiltinOptions.PadOptions, S.PadOptionsT())
                    x = o + "/padded"
                padding, oh_, ow = S.Padding.VALID, (H - kh) // s[0] + 1, (W - kw) // s[1] + 1
            group = a.get("group", 1)
            bt = tensor(o + "/b", [w.shape[0]], b)
            if group == 1 or (group != C and w.shape[1] * group == C):
                # plain, or grouped: LiteRT's CONV_2D takes the groups from input / filter channels
                wt = tensor(o + "/w", [w.shape[0], kh, kw, w.shape[1]], w.transpose(0, 2, 3, 1))
                opt = S.Conv2DOptionsT()
                code, otype = S.BuiltinOperator.CONV_2D, S.BuiltinOptions.Conv2DOptions
            else:
                if not (group == C and w.shape[1] == 1):
                    raise ModelError(f"{Path(onnx_path).name}: grouped Conv {n.name!r}: its "
                                     "weight does not match the input's channels")
                wt = tensor(o + "/w", [1, kh, kw, w.shape[0]], w.transpose(1, 2, 3, 0))
                opt = S.DepthwiseConv2DOptionsT()
                opt.depthMultiplier = w.shape[0] // C
                code, otype = S.BuiltinOperator.DEPTHWISE_CONV_2D, S.BuiltinOptions.DepthwiseConv2DOptions
            opt.padding = padding
            opt.strideH, opt.strideW, opt.dilationHFactor, opt.dilationWFactor = s[0], s[1], 1, 1
            last[o] = op(code, [tid[x], wt, bt], [tensor(o, [N, oh_, ow, w.shape[0]])], otype, opt)
        elif n.op_type == "Add":
            y = alias.get(n.input[1], n.input[1])
            last[o] = op(S.BuiltinOperator.ADD, [tid[x], tid[y]], [tensor(o, shape[x])], S.BuiltinOptions.AddOptions,
                         S.AddOptionsT())
        elif n.op_type in ("GlobalAveragePool", "ReduceMean"):
            N, H, W, C = shape[x]
            keep = n.op_type == "GlobalAveragePool" or bool(a.get("keepdims", 1))
            axes = a.get("axes") if len(n.input) < 2 or not n.input[1] else inits.get(n.input[1])
            if n.op_type == "ReduceMean" and sorted(int(v) % 4 for v in np.ravel(axes if axes is not None else [])) != [2, 3]:
                raise ModelError(f"{Path(onnx_path).name}: ReduceMean {n.name!r} over axes {axes}: the LiteRT "
                                 "translation takes the mean over height and width only (a global average pool)")
            ax = tensor(o + "/axes", [2], None)
            sg.tensors[ax].type = S.TensorType.INT32
            bb = S.BufferT()
            bb.data = np.frombuffer(np.array([1, 2], np.int32).tobytes(), np.uint8)
            model.buffers.append(bb)
            sg.tensors[ax].buffer = len(model.buffers) - 1
            opt = S.ReducerOptionsT()
            opt.keepDims = keep
            op(S.BuiltinOperator.MEAN, [tid[x], ax], [tensor(o, [N, 1, 1, C] if keep else [N, C])],
               S.BuiltinOptions.ReducerOptions, opt)
        elif n.op_type == "MaxPool":
            N, H, W, C = shape[x]
            k, s = a["kernel_shape"], a.get("strides", [1, 1])
            opt = S.Pool2DOptionsT()
            opt.padding, opt.strideH, opt.strideW, opt.filterHeight, opt.filterWidth = S.Padding.VALID, s[0], s[1], k[0], k[1]
            last[o] = op(S.BuiltinOperator.MAX_POOL_2D, [tid[x]], [tensor(o, [N, (H - k[0]) // s[0] + 1, (W - k[1]) // s[1] + 1, C])],
                         S.BuiltinOptions.Pool2DOptions, opt)
        elif n.op_type in ("Flatten", "Reshape"):
            N, H, W, C = shape[x]
            opt = S.ReshapeOptionsT()
            opt.newShape = [N, H * W * C]
            st = tensor(o + "/shape", [2], None)
            sg.tensors[st].type = S.TensorType.INT32
            bb = S.BufferT()
            bb.data = np.frombuffer(np.array([N, H * W * C], np.int32).tobytes(), np.uint8)
            model.buffers.append(bb)
            sg.tensors[st].buffer = len(model.buffers) - 1
            op(S.BuiltinOperator.RESHAPE, [tid[x], st], [tensor(o, [N, H * W * C])], S.BuiltinOptions.ReshapeOptions, opt)
            chw_of_flat[o] = (C, H, W)
        elif n.op_type in ("Gemm", "MatMul"):
            w = inits[n.input[1]]
            w = w if (n.op_type == "Gemm" and a.get("transB", 0)) else w.T  # -> [out, in]
            if x in chw_of_flat:  # ONNX flattened CHW, we flattened HWC: permute the weight columns
                C, H, W = chw_of_flat[x]
                w = w.reshape(w.shape[0], C, H, W).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
            b = inits[n.input[2]] if n.op_type == "Gemm" and len(n.input) > 2 else np.zeros(w.shape[0], np.float32)
            wt, bt = tensor(o + "/w", list(w.shape), w), tensor(o + "/b", [w.shape[0]], b)
            opt = S.FullyConnectedOptionsT()
            last[o] = op(S.BuiltinOperator.FULLY_CONNECTED, [tid[x], wt, bt], [tensor(o, [shape[x][0], w.shape[0]])],
                         S.BuiltinOptions.FullyConnectedOptions, opt)
        else:
            raise ModelError(f"{Path(onnx_path).name}: ONNX op {n.op_type} (node {n.name or o!r}) has no LiteRT "
                             f"translation in edgepack (supported: {', '.join(SUPPORTED_OPS)}); convert the "
                             "model with onnx2tf or litert-torch and pass the float .tflite")
    outname = alias.get(g.output[0].name, g.output[0].name)
    sg.outputs = [tid[outname]]
    sg.name = "main"
    model.subgraphs = [sg]
    # one signature, as TensorFlow's converter writes it: LiteRT's quantizer calibrates through it
    sig = S.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = SIGNATURE, 0
    sig.inputs, sig.outputs = [], []
    for nm, ti in ((inp.name, tid[inp.name]),):
        tm = S.TensorMapT()
        tm.name, tm.tensorIndex = nm, ti
        sig.inputs.append(tm)
    tm = S.TensorMapT()
    tm.name, tm.tensorIndex = g.output[0].name, tid[outname]
    sig.outputs.append(tm)
    model.signatureDefs = [sig]
    b = flatbuffers.Builder(1 << 20)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    out.write_bytes(bytes(b.Output()))
    return out


def fold_for_tflite(src: Path, out: Path) -> Path:
    """Batch 1 + ONNX Runtime's basic graph optimisations (constant folding): turns exporter
    shape/pad arithmetic (Shape/Slice/Concat/Pad chains) into plain Conv pads, which
    onnx_to_tflite can translate. The weights are unchanged."""
    import onnx
    import onnxruntime as ort
    m = onnx.load(str(src))
    d0 = m.graph.input[0].type.tensor_type.shape.dim[0]
    d0.ClearField("dim_param")
    d0.dim_value = 1
    b1 = out.with_suffix(".b1.onnx")
    onnx.save(m, str(b1))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(b1), so, providers=["CPUExecutionProvider"])
    b1.unlink()
    return out


def onnx_to_float_tflite(onnx_path: str | Path, out: str | Path) -> Path:
    """Batch-1, constant-folded translation of ``onnx_path`` to ``out`` (a float ``.tflite``)."""
    import tempfile

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="edgepack-tfl-") as td:
        try:
            folded = fold_for_tflite(Path(onnx_path), Path(td) / "folded.onnx")
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"{Path(onnx_path).name}: ONNX Runtime cannot constant-fold it "
                             f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            onnx_to_tflite(folded, tmp)
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


__all__ = ["onnx_to_tflite", "fold_for_tflite", "onnx_to_float_tflite", "SIGNATURE", "SUPPORTED_OPS"]
