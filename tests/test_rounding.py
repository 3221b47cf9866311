"""GPTQ / bias-correction weight rounding on tiny hand-built ONNX models (no assets needed)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.quantize import rounding
from edgepack.quantize.rounding import check_quantized_weights, optimize_weight_rounding


def _smooth_images(rng: np.random.Generator, n: int, c: int, hw: int) -> np.ndarray:
    """Spatially and cross-channel correlated non-negative inputs (like post-ReLU feature maps),
    so that H = E[x xᵀ] is far from diagonal and GPTQ has something to exploit."""
    z = rng.standard_normal((n, 3, hw + 2, hw + 2)).astype(np.float32)
    z = (z[:, :, :-2, :-2] + z[:, :, 1:-1, 1:-1] + z[:, :, 2:, 2:] + z[:, :, 1:-1, :-2]) / 2
    mix = rng.standard_normal((c, 3)).astype(np.float32)
    x = np.einsum("cd,ndhw->nchw", mix, z) + 0.3 * rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    return np.maximum(x + 0.5, 0).astype(np.float32)


def _conv_model(rng, cin, cout, k, *, group=1, stride=1, pads=(0, 0, 0, 0), dil=1, hw=10, bias=True,
                dead_channel=False):
    w = (rng.standard_normal((cout, cin // group, k, k)) * 0.3).astype(np.float32)
    if dead_channel:  # what BN folding leaves behind: ~zero weights, a normal bias
        w[0] = 1e-9
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "B"))
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", group=group, kernel_shape=[k, k],
                            strides=[stride, stride], pads=list(pads), dilations=[dil, dil])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", cin, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), _smooth_images(rng, 24, cin, hw)


def _gemm_model(rng, k=48, n=20, trans_b=1):
    w = (rng.standard_normal((n, k) if trans_b else (k, n)) * 0.2).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "B")]
    node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="fc", transB=trans_b)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    z = rng.standard_normal((256, 6)).astype(np.float32)
    x = np.maximum(z @ rng.standard_normal((6, k)).astype(np.float32) + 0.2 * rng.standard_normal((256, k)), 0)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), x.astype(np.float32)


def _matmul_model(rng, k=32, n=12):
    w = (rng.standard_normal((k, n)) * 0.2).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "W")])
    z = rng.standard_normal((64, 4, 5)).astype(np.float32)
    x = z @ rng.standard_normal((5, k)).astype(np.float32) + 0.1 * rng.standard_normal((64, 4, k))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), x.astype(np.float32)


CASES = {
    "conv1x1": lambda r: _conv_model(r, 16, 24, 1),
    "conv1x1_stride2": lambda r: _conv_model(r, 16, 8, 1, stride=2),
    "depthwise3x3_s2_pads": lambda r: _conv_model(r, 12, 12, 3, group=12, stride=2, pads=(0, 0, 1, 1)),
    "depthwise5x5_sym": lambda r: _conv_model(r, 8, 8, 5, group=8, pads=(2, 2, 2, 2)),
    "conv3x3": lambda r: _conv_model(r, 6, 10, 3, pads=(1, 1, 1, 1)),
    "grouped3x3_dil2": lambda r: _conv_model(r, 8, 6, 3, group=2, pads=(2, 2, 2, 2), dil=2, bias=False),
    "gemm": lambda r: _gemm_model(r),
    "gemm_notrans": lambda r: _gemm_model(r, trans_b=0),
}


def _ort_qdq(model, x, overrides) -> onnx.ModelProto:
    """ONNX Runtime's static QDQ quantizer (per-channel int8 weights, uint8 activations) with the
    rounding pass's scale overrides, calibrated on ``x``."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(_batches(x))

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        onnx.save(model, f"{d}/f.onnx")
        quantize_static(f"{d}/f.onnx", f"{d}/q.onnx", Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"TensorQuantOverrides": overrides})
        return onnx.load(f"{d}/q.onnx")


def _batches(x, bs=8):
    return [{"x": x[i:i + bs]} for i in range(0, len(x), bs)]


def _run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith(("conv", "depthwise", "grouped"))])
def test_im2col_matches_ort_conv(case):
    """The patches H is built from must reproduce the convolution exactly (strides, pads, groups)."""
    model, x = CASES[case](np.random.default_rng(0))
    lay = rounding._find_layers(model, None, {})[0]
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float32)
    P = rounding._conv_patches(lay, x[:3])  # (G, K, M)
    wg = lay.weight_grk(w)  # (G, R, K)
    y = np.matmul(wg, P)  # (G, R, M)
    ref = _run(model, x[:3])
    if len(model.graph.initializer) > 1:
        ref = ref - numpy_helper.to_array(model.graph.initializer[1])[None, :, None, None]
    n, c, ho, wo = ref.shape
    ref = ref.reshape(n, lay.groups, c // lay.groups, ho * wo).transpose(1, 2, 0, 3).reshape(y.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_gptq_beats_rtn_and_reproduces_through_ort(case):

    rng = np.random.default_rng(1)
    model, x = CASES[case](rng)
    new, overrides, report = optimize_weight_rounding(model, _batches(x), bias_correction=False)
    (lay,) = report.layers
    assert lay.err_opt < lay.err_rtn  # strictly better on correlated data
    # ... and the model-level output error agrees with the per-layer estimate
    rtn, _, _ = optimize_weight_rounding(model, _batches(x), method="rtn", bias_correction=False)
    y = _run(model, x)
    assert np.mean((_run(new, x) - y) ** 2) < np.mean((_run(rtn, x) - y) ** 2)

    # integers stay in range and ORT reproduces them exactly from the overrides
    w_new = numpy_helper.to_array(next(t for t in new.graph.initializer if t.name == "W"))
    scale = np.array([c["scale"] for c in overrides["W"]], np.float32)
    shape = [1] * w_new.ndim
    shape[overrides["W"][0]["axis"]] = -1
    q = np.rint(w_new / scale.reshape(shape))
    assert np.abs(q).max() <= 127 and np.allclose(q * scale.reshape(shape), w_new, rtol=0, atol=0)

    qdq = _ort_qdq(new, x, overrides)
    assert check_quantized_weights(qdq, new, overrides) == {}
    q_ort = numpy_helper.to_array(next(t for t in qdq.graph.initializer if t.name == "W_quantized"))
    assert q_ort.dtype == np.int8 and np.array_equal(q_ort.astype(np.int64), q.astype(np.int64))


def test_dead_channel_scale_survives_ort_bias_adjustment():
    """A BN-folded channel with ~0 weights and a real bias: ORT would raise its weight scale to keep
    the int32 bias in range (changing our integers); the pass floors that scale up front."""

    rng = np.random.default_rng(2)
    model, x = _conv_model(rng, 8, 8, 3, group=8, pads=(1, 1, 1, 1), dead_channel=True)
    new, overrides, report = optimize_weight_rounding(model, _batches(x))
    assert report.layers[0].floored_channels == 1

    qdq = _ort_qdq(new, x, overrides)
    assert check_quantized_weights(qdq, new, overrides) == {}


@pytest.mark.parametrize("case", ["depthwise3x3_s2_pads", "conv3x3", "grouped3x3_dil2", "gemm"])
def test_bias_correction_reduces_mean_output_error(case):
    rng = np.random.default_rng(3)
    model, x = CASES[case](rng)
    y = _run(model, x)
    axes = (0, 2, 3) if y.ndim == 4 else (0,)
    errs = {}
    for bc in (False, True):
        new, _, report = optimize_weight_rounding(model, _batches(x), method="rtn", bits=4, bias_correction=bc)
        assert report.layers[0].bias_corrected == bc
        errs[bc] = np.abs((_run(new, x) - y).mean(axis=axes)).mean()
    assert errs[True] < 0.5 * errs[False]


def test_matmul_low_bits_node_selection_and_one_shot_iterator():
    rng = np.random.default_rng(4)
    model, x = _matmul_model(rng)
    calls = []
    new, overrides, report = optimize_weight_rounding(
        model, (b for b in _batches(x)), bits=4, nodes=["mm", "nope"], progress=lambda d, t: calls.append((d, t)))
    assert report.skipped == {"nope": "no such node"}
    assert report.samples == len(x) and report.layers[0].err_opt < report.layers[0].err_rtn
    assert not report.layers[0].bias_corrected  # MatMul has no bias to correct
    w = numpy_helper.to_array(new.graph.initializer[0])
    s = np.array([c["scale"] for c in overrides["W"]], np.float32)
    assert overrides["W"][0]["axis"] == 1 and np.abs(np.rint(w / s[None, :])).max() <= 7
    assert [t for _, t in calls] == [0] * len(calls) and len(calls) == len(_batches(x)) + 1  # no len(): total 0
    assert model.graph.initializer[0].raw_data != new.graph.initializer[0].raw_data  # input model untouched
    assert "rel. output err" in report.summary()


def test_nodes_none_selects_nothing_else_and_unsupported_are_reported():
    rng = np.random.default_rng(5)
    model, x = _conv_model(rng, 4, 4, 1)
    new, overrides, report = optimize_weight_rounding(model, _batches(x), nodes=[])
    assert overrides == {} and report.layers == []
    with pytest.raises(ValueError):
        optimize_weight_rounding(model, _batches(x), method="adaround")


@pytest.mark.parametrize("case", ["conv3x3"])   # a 3x3 depthwise (K = 9) gains nothing measurable
def test_input_compensation_lowers_the_int8_output_error(case):
    """With the QDQ model's own input quantizer (``quantized=``, local compensation) the rounding
    targets the FP32 output from the input the INT8 model computes with: the quantized model's
    output error, run unfused as an exact board computes, goes down."""
    rng = np.random.default_rng(4)
    model, x = CASES[case](rng)
    y = _run(model, x)
    plain, ov, _ = optimize_weight_rounding(model, _batches(x))
    q_plain = _ort_qdq(plain, x, ov)
    comp, ov2, rep = optimize_weight_rounding(model, _batches(x), quantized=q_plain)
    assert rep.method == "gptq+local-compensation"
    q_comp = _ort_qdq(comp, x, ov2)
    assert check_quantized_weights(q_comp, comp, ov2) == {}

    def exact(m):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    e_plain, e_comp = np.mean((exact(q_plain) - y) ** 2), np.mean((exact(q_comp) - y) ** 2)
    assert e_comp < e_plain, (e_comp, e_plain)
    with pytest.raises(ValueError, match="compensation"):
        optimize_weight_rounding(model, _batches(x), quantized=q_plain, compensation="global")
