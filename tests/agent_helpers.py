"""Helpers for the device-agent tests: boards in tmp dirs, bundles of tiny real models, CLI runs.

Keys and bundle builders come from tests/ota_helpers.py (helper-1's fixtures); this adds golden
data computed with the real runtime, multi-file bundles (many crash boundaries) and a way to
run ``edgepack-agent`` as a real process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.durable import utc_now
from ota_helpers import Pki, build, make_onnx, make_pki  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]
TARGET = "rpi4-2gb"


def golden_for(model: Path, out: Path, n: int = 8, seed: int = 3, labels: bool = True) -> Path:
    """Golden inputs + the model's own outputs (the reference) + labels = the reference's top-1."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
    y = np.stack([sess.run(None, {inp.name: xi})[0] for xi in x])
    arrays: dict[str, Any] = {f"inputs_{inp.name}": x, f"outputs_{sess.get_outputs()[0].name}": y}
    if labels:
        arrays["labels"] = y.reshape(n, -1).argmax(1)
    np.savez(out, **arrays)
    return out


def write_trust(pki: Pki) -> tuple[Path, Path]:
    root, rk = pki.dir / "root.json", pki.dir / "release-keys.json"
    root.write_text(json.dumps(pki.root_doc))
    rk.write_text(json.dumps(pki.rk_doc))
    return root, rk


def bundle(pki: Pki, out: Path, model: Path, *, release: int, golden: Path | None = None,
           settings: dict[str, Any] | None = None, **kw: Any) -> Path:
    build(pki, out, model, release=release, golden=golden, now=utc_now(),
          settings=settings if settings is not None else {"runtime": "onnxruntime", "threads": 1}, **kw)
    return out


def multi_file_bundle(pki: Pki, out: Path, model: Path, *, release: int, golden: Path | None, extras: int,
                      extra_bytes: int = 512, seed: int = 0, same_extras: bool = False) -> Path:
    """A full bundle with ``extras`` small role=extra files (labels, configs): many write boundaries."""
    import datetime as dt
    import tempfile

    from edgepack.ota import bundle as B
    now = utc_now()
    items = [(model.name, "model", model)]
    with tempfile.TemporaryDirectory() as td:
        tdp = Path(td)
        s = tdp / "settings.json"
        s.write_text(json.dumps({"runtime": "onnxruntime", "threads": 1, "model": model.name}))
        items.append(("settings.json", "settings", s))
        if golden is not None:
            items.append(("golden.npz", "golden", golden))
        rng = np.random.default_rng(seed if same_extras else seed + release)  # same: delta = base-copy
        for i in range(extras):
            p = tdp / f"extra-{i:03d}.bin"
            p.write_bytes(rng.bytes(extra_bytes))
            items.append((p.name, "extra", p))
        frames = []
        for i, (name, role, src) in enumerate(items):
            spool = tdp / f"frame-{i}.zst"
            with open(spool, "wb") as f:
                n, h, tn, th = B.compress_file(src, f)
            frames.append(B.Frame(B.FileEntry(path=name, role=role, length=n, sha256=h, encoding="zstd",
                                              transport_length=tn, transport_sha256=th), spool))
        manifest = B.make_manifest(kind="full", model="mlp", release=release, version=f"1.{release}.0",
                                   targets=[TARGET], created=now, expires=now + dt.timedelta(days=30),
                                   min_agent_version="0.1.0", entries=[fr.entry for fr in frames])
        B.write_container(out, trust_section=B.trust_section(pki.rk_doc, [pki.root_doc]), manifest=manifest,
                          signers=[pki.release[0]], frames=frames)
    return out


def init_board(state: Path, pki: Pki, **cfg: Any):
    """A board state dir (in-process Agent). cfg: BoardConfig fields."""
    from device_agent.install import Agent
    from device_agent.state import BoardConfig
    root, rk = write_trust(pki)
    a = Agent(state)
    a.init(BoardConfig(target=cfg.pop("target", TARGET), **cfg), root)
    return a


def agent_cmd(state: Path | None, *args: str) -> list[str]:
    return [sys.executable, "-m", "device_agent", *(["--state", str(state)] if state else []), *args]


def run_agent(state: Path | None, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
              ) -> tuple[int, dict[str, Any], str]:
    """Run the agent as a real process: (exit code, parsed JSON stdout, stderr)."""
    e = {**os.environ, **(env or {})}
    r = subprocess.run(agent_cmd(state, *args), capture_output=True, text=True, env=e, timeout=timeout, cwd=ROOT)
    try:
        out = json.loads(r.stdout) if r.stdout.strip() else {}
    except ValueError:
        out = {"_raw": r.stdout}
    return r.returncode, out, r.stderr


def active_ok(state: Path) -> tuple[int, str]:
    """Assert the board's invariant: state parses, active slot hash-verifies and its model runs.

    Returns (release, slot). Runs recover() first, as the next agent start would.
    """
    from device_agent.install import Agent
    from device_agent.runtime import load_model
    from device_agent.health import smoke_feed
    a = Agent(state)
    a.recover()
    st = a.sd.load()
    assert st.active is not None, "no active release"
    info = a.slots.verify(st.active)  # hash-verified
    sess = load_model(info.model_path, "onnxruntime", threads=1)
    out = sess.run(smoke_feed(sess))
    assert np.all(np.isfinite(out[0]))
    assert st.trial is None and st.writing is None
    return info.release, st.active


# --------------------------------------------------------------------------- LiteRT models without TensorFlow
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

    m = onnx.load(str(onnx_path))
    g = m.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    model = S.ModelT()
    model.version = 3
    model.description = "edgepack test model"
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
                assert (lo, hi) == (0.0, 6.0), f"Clip({lo}, {hi}) is not ReLU6"
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
            if group == 1:
                wt = tensor(o + "/w", [w.shape[0], kh, kw, w.shape[1]], w.transpose(0, 2, 3, 1))
                opt = S.Conv2DOptionsT()
                code, otype = S.BuiltinOperator.CONV_2D, S.BuiltinOptions.Conv2DOptions
            else:
                assert group == C and w.shape[1] == 1, "only depthwise grouped convs"
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
        elif n.op_type == "GlobalAveragePool":
            N, H, W, C = shape[x]
            ax = tensor(o + "/axes", [2], None)
            sg.tensors[ax].type = S.TensorType.INT32
            bb = S.BufferT()
            bb.data = np.frombuffer(np.array([1, 2], np.int32).tobytes(), np.uint8)
            model.buffers.append(bb)
            sg.tensors[ax].buffer = len(model.buffers) - 1
            opt = S.ReducerOptionsT()
            opt.keepDims = True
            op(S.BuiltinOperator.MEAN, [tid[x], ax], [tensor(o, [N, 1, 1, C])], S.BuiltinOptions.ReducerOptions, opt)
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
            raise NotImplementedError(f"onnx_to_tflite: op {n.op_type}")
    outname = alias.get(g.output[0].name, g.output[0].name)
    sg.outputs = [tid[outname]]
    model.subgraphs = [sg]
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
