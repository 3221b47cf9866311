"""The W8A8 / mixed model as an ONNX file: the placement's arithmetic written into the builder's
FP32 decoder, so the NPU variants have a size, a peak RSS and tokens/s on a CPU too, and their
perplexity is measured on the artifact, not only in PyTorch's fake quantization.

Per weight matmul of the builder graph (``/model/layers.N/attn/qkv_proj/MatMul`` fuses q/k/v,
as the NPU call does; ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``; ``/lm_head/MatMul``):

- ``npu-a8w8``: ``QuantizeLinear -> DequantizeLinear`` on the input with the static per-tensor
  scale from calibration (int8, zero point 0) and per-output-channel symmetric INT8 weights as
  ``DequantizeLinear(int8, scale[N], axis=1)``. ONNX Runtime's CPU provider fuses the pattern into
  integer matmuls, the way an INT8-matmul NPU runs it.
- ``npu-a16w8``: the same INT8 weights; the input rounded to a 16-bit grid with the static scale in
  float ops (``Clip(Round(x / s)) * s``): the numerics of int16 activations, without depending on
  the opset-21 int16 ``QuantizeLinear`` kernels.
- ``cpu-fp16``: weights stored as FP16 (``Cast`` to float at run time), the input rounded to FP16.
- ``fp32``: untouched.

The SmoothQuant migration is not done here: it is already in the weights of the source model
(the builder ran on the smoothed checkpoint), so ``stats`` must come from that same model.
Norms, rotary, attention and residual adds stay float (the board's CPU runs them in FP16).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import ModelError

_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul$")
_ORDER = {"fp32": 3, "cpu-fp16": 2, "npu-a16w8": 1, "npu-a8w8": 0}


def torch_names(node_name: str) -> list[str]:
    """The PyTorch linears (edgepack.llm.w8a8 names) one builder MatMul computes."""
    if node_name == "/lm_head/MatMul":
        return ["lm_head"]
    m = _NODE.match(node_name)
    if not m:
        return []
    i, part, proj = m.groups()
    if proj == "qkv_proj":
        return [f"layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    return [f"layers.{i}.{'self_attn' if part == 'attn' else 'mlp'}.{proj}"]


def fused_mode(names: list[str], modes: dict, lm_head: str) -> str:
    """One mode for a fused call: the most precise of its members' (a q/k/v call with k at A16
    runs all three at A16)."""
    got = [lm_head if n == "lm_head" else modes.get(n, "npu-a8w8") for n in names]
    return max(got, key=lambda m: _ORDER[m])


def _rewrite(model, node, mode: str, xmax: float, bits: int, added: list, inits: dict,
             rot: np.ndarray | None = None) -> list:
    """Rewire ``node`` in place; returns the nodes that must run just before it. ``rot``: rotate
    the input by this orthogonal matrix first (x R, with the weight taken as R^T W)."""
    from onnx import TensorProto, helper, numpy_helper

    wname = node.input[1]
    if wname not in inits:
        raise ModelError(f"{node.name}: weight {wname!r} is not an initializer")
    w = numpy_helper.to_array(inits[wname]).astype(np.float32)          # [K, N]
    model.graph.initializer.remove(inits.pop(wname))
    x, tag = node.input[0], node.name.strip("/").replace("/", "_")
    rot_nodes = []
    if rot is not None:
        w = (rot.T @ w).astype(np.float32)
        if "rotation_R" not in {a.name for a in added}:
            added.append(numpy_helper.from_array(rot.astype(np.float32), "rotation_R"))
        rot_nodes = [helper.make_node("MatMul", [x, "rotation_R"], [f"{tag}_xrot"], name=f"{tag}_rotate")]
        x = f"{tag}_xrot"
    if mode == "cpu-fp16":
        added += [numpy_helper.from_array(w.astype(np.float16), f"{wname}_fp16")]
        pre = ([
            helper.make_node("Cast", [f"{wname}_fp16"], [f"{wname}_w"], name=f"{tag}_wcast", to=TensorProto.FLOAT),
            helper.make_node("Cast", [x], [f"{tag}_x16"], name=f"{tag}_x16", to=TensorProto.FLOAT16),
            helper.make_node("Cast", [f"{tag}_x16"], [f"{tag}_xr"], name=f"{tag}_xr", to=TensorProto.FLOAT)])
        node.input[0], node.input[1] = f"{tag}_xr", f"{wname}_w"
        return rot_nodes + pre
    q = 2 ** (bits - 1) - 1
    ws = np.maximum(np.abs(w).max(0), 1e-12) / q                          # per output channel
    wq = np.clip(np.round(w / ws), -q, q).astype(np.int8)
    added += [numpy_helper.from_array(wq, f"{wname}_q"), numpy_helper.from_array(ws.astype(np.float32), f"{wname}_s"),
              numpy_helper.from_array(np.zeros_like(ws, np.int8), f"{wname}_z")]
    deq_w = helper.make_node("DequantizeLinear", [f"{wname}_q", f"{wname}_s", f"{wname}_z"], [f"{wname}_w"],
                             name=f"{tag}_wdq", axis=1)
    if mode == "npu-a8w8":
        s = np.float32(max(xmax, 1e-12) / 127.0)
        added += [numpy_helper.from_array(np.array(s), f"{tag}_xs"), numpy_helper.from_array(np.array(0, np.int8), f"{tag}_xz")]
        nodes = [helper.make_node("QuantizeLinear", [x, f"{tag}_xs", f"{tag}_xz"], [f"{tag}_xq"], name=f"{tag}_xq"),
                 helper.make_node("DequantizeLinear", [f"{tag}_xq", f"{tag}_xs", f"{tag}_xz"], [f"{tag}_xr"],
                                  name=f"{tag}_xdq")]
    else:  # npu-a16w8: a 16-bit grid in float ops
        s = np.float32(max(xmax, 1e-12) / 32767.0)
        added += [numpy_helper.from_array(np.array(s), f"{tag}_xs"),
                  numpy_helper.from_array(np.array(-32767, np.float32), f"{tag}_lo"),
                  numpy_helper.from_array(np.array(32767, np.float32), f"{tag}_hi")]
        nodes = [helper.make_node("Div", [x, f"{tag}_xs"], [f"{tag}_xd"], name=f"{tag}_xdiv"),
                 helper.make_node("Round", [f"{tag}_xd"], [f"{tag}_xround"], name=f"{tag}_xround"),
                 helper.make_node("Clip", [f"{tag}_xround", f"{tag}_lo", f"{tag}_hi"], [f"{tag}_xc"], name=f"{tag}_xclip"),
                 helper.make_node("Mul", [f"{tag}_xc", f"{tag}_xs"], [f"{tag}_xr"], name=f"{tag}_xmul")]
    node.input[0], node.input[1] = f"{tag}_xr", f"{wname}_w"
    return rot_nodes + [deq_w] + nodes


def write_w8a8_onnx(src: str | Path, dst: str | Path, tensor_max: dict, modes: dict,
                    lm_head: str = "cpu-fp16", weight_bits: int = 8,
                    down_rotation: np.ndarray | None = None) -> dict:
    """Write ``dst`` from the builder FP32 decoder ``src`` with each matmul in its placement mode.
    ``tensor_max``: calibrated max |x| per PyTorch linear name (ActStats.tensor_max of the same,
    possibly smoothed, weights; with ``down_rotation``, of the rotated down_proj inputs).
    ``down_rotation``: the orthogonal R of :func:`edgepack.llm.w8a8.rotation`, applied to every
    ``down_proj`` input (a float MatMul before it: the board's CPU does it as a fast transform).
    Returns the mode count per matmul kind."""
    import onnx

    from .weightonly import save_model, untie_embeddings

    model = onnx.load(str(src))
    untie_embeddings(model)      # the table stays float for the Gather; lm_head gets its own mode
    added, count, order = [], {}, []
    inits = {i.name: i for i in model.graph.initializer}
    for node in list(model.graph.node):
        names = torch_names(node.name) if node.op_type == "MatMul" else []
        mode = fused_mode(names, modes, lm_head) if names else "fp32"
        if names:
            count[mode] = count.get(mode, 0) + 1
        if mode != "fp32":
            missing = [n for n in names if n not in tensor_max]
            if missing and mode != "cpu-fp16":
                raise ModelError(f"no calibrated activation range for {missing[0]} ({node.name})")
            rot = down_rotation if down_rotation is not None and node.name.endswith("/down_proj/MatMul") else None
            order += _rewrite(model, node, mode, max(tensor_max.get(n, 0.0) for n in names), weight_bits, added,
                              inits, rot)
        order.append(node)
    if not count:
        raise ModelError(f"{src}: no builder-layout weight matmuls (/model/layers.N/.../MatMul) found")
    model.graph.initializer.extend(added)
    del model.graph.node[:]
    model.graph.node.extend(order)
    save_model(model, Path(dst), Path(src).parent)
    return count

