"""Indexes over an ONNX graph that every quantize pass needs: who writes a tensor, who reads it.

Why one place: the passes (sensitivity ranking, float activations, weight folding, placement,
equalization, SmoothQuant) each walk producer/consumer edges; one helper keeps them reading the
graph the same way (a graph input or an initializer has no producer; a tensor nobody reads has
no consumers).
"""
from __future__ import annotations

import onnx

__all__ = ["attribute", "consumers", "is_depthwise", "producers"]


def producers(g: onnx.ModelProto | onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """``{tensor: the node that writes it}`` (graph inputs and initializers are absent)."""
    g = g.graph if isinstance(g, onnx.ModelProto) else g
    return {o: n for n in g.node for o in n.output}


def consumers(g: onnx.ModelProto | onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """``{tensor: the nodes that read it, in graph order}`` (a node reading it twice, twice)."""
    g = g.graph if isinstance(g, onnx.ModelProto) else g
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            out.setdefault(x, []).append(n)
    return out


def attribute(n: onnx.NodeProto, name: str, default=None):
    """The value of ``n``'s attribute ``name``, else ``default``."""
    a = next((a for a in n.attribute if a.name == name), None)
    return default if a is None else onnx.helper.get_attribute_value(a)


def is_depthwise(n: onnx.NodeProto | None) -> bool:
    """A grouped convolution (``group`` > 1): one filter per channel group."""
    return n is not None and n.op_type == "Conv" and attribute(n, "group", 1) > 1
