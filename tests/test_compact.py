"""compact.py: merging value-identical initializers changes bytes, never what a board computes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgepack.quantize.compact import dedupe_file, dedupe_initializers
from edgepack.quantize.evaluate import session
from edgepack.quantize.numerics import exact_session


def _conv_stack(path, n=4, c=8):
    """n 3x3 convs of c channels (per-channel QDQ gives each its own all-zero zero-point vector)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(n):
        w = numpy_helper.from_array(rng.normal(0, 0.3, (c, c, 3, 3)).astype(np.float32), f"w{i}")
        b = numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), f"b{i}")
        inits += [w, b]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    g = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 12, 12])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, c, 12, 12])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _quantize(src, dst, c=8):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(1)

    class R(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": rng.normal(0, 1, (1, c, 12, 12)).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), R(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def test_dedupe_saves_bytes_and_keeps_every_output(tmp_path):
    _conv_stack(tmp_path / "f.onnx")
    q = tmp_path / "q.onnx"
    _quantize(tmp_path / "f.onnx", q)
    before = onnx.load(str(q))
    d = tmp_path / "d.onnx"
    d.write_bytes(q.read_bytes())
    saved = dedupe_file(d)
    after = onnx.load(str(d))
    assert saved > 0 and d.stat().st_size < q.stat().st_size
    assert len(after.graph.initializer) < len(before.graph.initializer)
    names = {t.name for t in after.graph.initializer}
    assert all(i in names or i == "" or any(i == o for n in after.graph.node for o in n.output) or i == "x"
               for n in after.graph.node for i in n.input)      # every input still resolves
    x = np.random.default_rng(2).normal(0, 1, (1, 8, 12, 12)).astype(np.float32)
    for optimize in (False, True):                              # exact (unfused) and the fused kernels
        a = session(q, 1, optimize=optimize).run(None, {"x": x})[0]
        b = session(d, 1, optimize=optimize).run(None, {"x": x})[0]
        assert np.array_equal(a, b)
    # ORT's exact mode on x86 (s8 -> u8 weight rewrite) loads it as written: no weight zero point is
    # shared (a shared one fails with "Attempt to replace the existing tensor"); the agent runs it so
    so = ort.SessionOptions()
    so.add_session_config_entry("session.x64quantprecision", "1")
    exact = ort.InferenceSession(str(d), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(exact, exact_session(q).run(None, {"x": x})[0])
    assert dedupe_file(d) == 0                                  # idempotent: nothing left to merge


def test_graph_inputs_and_subgraph_models_are_left_alone():
    z = numpy_helper.from_array(np.zeros(3, np.float32), "a")
    z2 = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])],   # overridable input
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [z, z2])
    m = helper.make_model(g)
    assert dedupe_initializers(m) == 0 and [t.name for t in m.graph.initializer] == ["a", "b"]
    then = helper.make_graph([helper.make_node("Identity", ["a"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])])
    g2 = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then)], "g2",
                           [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                           [numpy_helper.from_array(np.zeros(3, np.float32), "a"),
                            numpy_helper.from_array(np.zeros(3, np.float32), "a2")])
    m2 = helper.make_model(g2)
    assert dedupe_initializers(m2) == 0 and len(m2.graph.initializer) == 2
