"""Cross-layer equalization with bias absorption (edgepack.quantize.equalize) on a real
depthwise block: conv -> act -> depthwise conv -> act -> 1x1 conv, run in ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.data import Dataset
from edgepack.quantize.equalize import equalize, find_pairs
from edgepack.quantize.evaluate import session


def _block(act: str, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    spread = np.exp(rng.uniform(-3, 3, 8)).astype(np.float32)        # channel ranges over ~400x
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32) * spread[:, None, None, None]
    b1 = (np.abs(rng.normal(0, 2, 8)) * spread + 4 * spread).astype(np.float32)   # high biases
    wd = rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32) / spread[:, None, None, None]
    bd = (20 + rng.normal(0, 0.1, 8)).astype(np.float32)                 # a high bias: absorbable
    w3 = rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32)
    b3 = np.zeros(4, np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (wd, "wd"), (bd, "bd"),
                                                         (w3, "w3"), (b3, "b3"))]
    inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]

    def a(x, y, name):
        return (helper.make_node("Relu", [x], [y], name=name) if act == "relu"
                else helper.make_node("Clip", [x, "lo", "hi"], [y], name=name))

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             a("c1", "a1", "act1"),
             helper.make_node("Conv", ["a1", "wd", "bd"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=8),
             a("c2", "a2", "act2"),
             helper.make_node("Conv", ["a2", "w3", "b3"], ["y"], name="proj")]
    g = helper.make_graph(nodes, "blk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(m.SerializeToString()).run(None, {"x": x})[0]


def _weight_spread(m: onnx.ModelProto, name: str) -> float:
    w = next(numpy_helper.to_array(i) for i in m.graph.initializer if i.name == name)
    r = np.abs(w.reshape(w.shape[0], -1)).max(1)
    return float(r.max() / r.min())


def test_pairs_found_through_relu6_and_into_a_depthwise_conv():
    pairs = find_pairs(_block("relu6"))
    assert [(p.a.name, p.b.name, p.b_depthwise) for p in pairs] == [("conv1", "dw", True), ("dw", "proj", False)]


def test_relu_block_is_equalized_without_changing_its_function():
    m = _block("relu")
    x = np.random.default_rng(1).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    eq, rep = equalize(m, "relu")
    assert rep.pairs == 2 and rep.relu6_replaced == 0
    np.testing.assert_allclose(_run(eq, x), _run(m, x), rtol=1e-4, atol=1e-4)
    assert _weight_spread(m, "w1") > 50 and _weight_spread(eq, "w1") < _weight_spread(m, "w1") / 5
    assert rep.max_range_ratio_after < rep.max_range_ratio_before


def test_bias_absorption_is_exact_on_the_calibration_data_and_narrows_the_range():
    m = _block("relu")
    x = np.random.default_rng(2).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    data = Dataset("cal", lambda i: x[i], len(x))
    eq, rep = equalize(m, "relu", calib=data, input_names=["x"])
    # into the 1x1 projection only (the depthwise conv pads, so nothing is absorbed into it)
    np.testing.assert_allclose(_run(eq, x), _run(m, x), rtol=1e-4, atol=1e-4)
    if rep.absorbed_channels == 0:
        pytest.fail("the depthwise outputs of this block never reach 0: some channel must be absorbed")


def test_relu6_modes():
    m = _block("relu6")
    x = np.random.default_rng(3).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    relu, r1 = equalize(m, "relu")
    kept, r2 = equalize(m, "relu6")
    assert r1.relu6_replaced == 2 and r2.relu6_replaced == 0
    assert [n.op_type for n in relu.graph.node].count("Relu") == 2
    assert [n.op_type for n in kept.graph.node].count("Clip") == 2
    # neither is the ReLU6 function any more wherever a channel was rescaled (the docstring's point)
    assert not np.allclose(_run(relu, x), _run(m, x), atol=1e-3)
    with pytest.raises(ValueError, match="mode"):
        equalize(m, "relu7")


def test_range_equalization_keeps_relu6_exact_on_calibration_data_and_fills_the_clip():
    m = _block("relu6")
    x = np.random.default_rng(5).normal(0, 0.05, (16, 3, 8, 8)).astype(np.float32)   # small: below the clip
    data = Dataset("cal", lambda i: x[i], len(x))
    eq, rep = equalize(m, "range", calib=data, input_names=["x"])
    assert rep.pairs == 1 and rep.max_range_ratio_after < rep.max_range_ratio_before
    np.testing.assert_allclose(_run(eq, x), _run(m, x), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="calibration"):
        equalize(m, "range")
