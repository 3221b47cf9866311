import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgepack.data import Dataset
from edgepack.quantize.smoothquant import smooth


def _ln_mm_model(shared_output: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.ones(8, np.float32), "g"), numpy_helper.from_array(np.zeros(8, np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.2, (8, 6)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.2, (8, 6)).astype(np.float32), "w2")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln", axis=-1),
             helper.make_node("MatMul", ["ln", "w1"], ["q"], name="mm1"),
             helper.make_node("MatMul", ["ln", "w2"], ["k"], name="mm2"),
             helper.make_node("Add", ["q", "k"], ["y"], name="add")]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared_output:  # post-LN: the LayerNorm output also feeds a residual
        nodes.append(helper.make_node("Add", ["ln", "ln"], ["r"], name="resid"))
        outs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _data(n=16):
    x = np.random.default_rng(1).normal(0, 1, (n, 4, 8)).astype(np.float32)
    x[..., 3] *= 40  # an outlier channel, as in transformer activations
    return Dataset("d", lambda i: x[i], n), x


def test_smoothing_keeps_the_function_and_flattens_the_outlier():
    for shared in (False, True):
        m = _ln_mm_model(shared)
        ds, x = _data()
        sm, rep = smooth(m, ds, ["x"], alpha=0.5)
        assert rep.tensors == 1 and rep.matmuls == 2
        assert rep.max_ratio_after < rep.max_ratio_before
        ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})
        got = ort.InferenceSession(sm.SerializeToString()).run(None, {"x": x})
        for a, b in zip(ref, got):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        ops = [n.op_type for n in sm.graph.node]
        assert ("Mul" in ops) == shared  # folded into LayerNorm when it can be, a Mul otherwise
