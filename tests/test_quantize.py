import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import ROOT, run_cli
from edgepack.data import load_dataset
from edgepack.errors import ModelError
from edgepack.modelinfo import load_model
from edgepack.quantize.pipeline import QuantizeOptions, quantize
from edgepack.targets import load_target


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:")
    return lines[0]


def test_tiny_model_library_api(tmp_path, tiny_model, tiny_data):
    out = tmp_path / "q.onnx"
    rep = quantize(tiny_model, load_target("x86-vnni"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
                   out, options=QuantizeOptions(weight_rounding="nearest", latency_threads=(1,), max_evals=5))
    m = load_model(out, allow_quantized=True)
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(m.ops)
    assert rep.evaluations <= 5 + 2          # + the plain per-tensor/per-channel baselines
    assert rep.holdout_samples + rep.search_samples == 64
    assert rep.calibration_method in ("minmax", "percentile", "entropy")
    assert {c.method for c in rep.candidates} >= {"minmax", "percentile", "entropy"}
    assert rep.latency and rep.latency[0].runs >= 20
    d = json.loads(rep.to_json())
    assert d["metric"] == "top-1 accuracy" and d["fp32_top1"] == 100.0  # labels are the FP32 argmax
    assert m.metadata["edgepack.quantized_for"] == "x86-vnni"


def test_int8_only_target_never_keeps_float(tmp_path, tiny_model, tiny_data):
    out = tmp_path / "q.onnx"
    rep = quantize(tiny_model, load_target("phone-npu-int8"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
                   out, options=QuantizeOptions(max_drop=0.0, weight_rounding="nearest", latency_threads=(1,)))
    assert rep.float_layers == []
    q = onnx.load(str(out))
    convs = [n for n in q.graph.node if n.op_type in ("Conv", "Gemm")]
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    assert all(producers.get(n.input[0]) == "DequantizeLinear" for n in convs)  # every weight op in INT8
    if not rep.budget_met:
        assert any("INT8 only" in w for w in rep.warnings)


def test_mixed_precision_search_on_a_float_target(tmp_path, tiny_model, tiny_data):
    """A zero budget forces the sensitivity search; at most max_evals evaluations, and the
    report names the ranked layers."""
    rep = quantize(tiny_model, load_target("rpi4-2gb"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
                   tmp_path / "q.onnx", options=QuantizeOptions(max_drop=-1.0, weight_rounding="nearest",
                                                                latency_threads=(1,), max_evals=6))
    assert rep.evaluations <= 6 + 2 and not rep.budget_met   # + the two plain baselines
    assert {s["name"] for s in rep.sensitive_layers} <= {"conv1", "conv2", "fc"}
    assert any(c.float_layers for c in rep.candidates)
    assert any("budget not met" in w for w in rep.warnings)


def test_cli_table_json_and_report(tmp_path, tiny_model, tiny_data):
    out = tmp_path / "q.onnx"
    r = run_cli("quantize", str(tiny_model), "--target", "x86-vnni", "--calib", str(tiny_data[0]), "--eval",
                str(tiny_data[1]), "-o", str(out), "--rounding", "nearest", "--threads", "1", "--json")
    assert r.returncode in (0, 4), r.stderr
    d = json.loads(r.stdout)
    assert d["output"] == str(out) and out.is_file()
    assert json.loads((tmp_path / "q.json").read_text())["int8_size_bytes"] == out.stat().st_size


@pytest.mark.parametrize("case", ["not-onnx", "unknown-target", "empty-calib", "wrong-shape", "quantized", "no-preprocess"])
def test_cli_bad_input_one_line_nonzero_nothing_written(tmp_path, tiny_model, tiny_data, case):
    calib, ev = tiny_data
    model, target = str(tiny_model), "x86-vnni"
    if case == "not-onnx":
        (tmp_path / "m.onnx").write_text("hello, I am not a model")
        model = str(tmp_path / "m.onnx")
    elif case == "unknown-target":
        target = "toaster"
    elif case == "empty-calib":
        np.save(tmp_path / "e.npy", np.zeros((0, 1, 8, 8), np.float32))
        calib = tmp_path / "e.npy"
    elif case == "wrong-shape":
        np.save(tmp_path / "w.npy", np.zeros((4, 3, 8, 8), np.float32))
        calib = tmp_path / "w.npy"
    elif case == "quantized":
        quantize(tiny_model, load_target("x86-vnni"), load_dataset(calib), load_dataset(ev), tmp_path / "q0.onnx",
                 options=QuantizeOptions(weight_rounding="nearest", latency_threads=(1,), max_evals=2))
        model = str(tmp_path / "q0.onnx")
    elif case == "no-preprocess":
        (tmp_path / "imgs").mkdir()
        from PIL import Image
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
        calib = tmp_path / "imgs"
    out = tmp_path / "out.onnx"
    r = run_cli("quantize", model, "--target", target, "--calib", str(calib), "--eval", str(ev), "-o", str(out),
                "--rounding", "nearest", "--threads", "1")
    line = _one_error_line(r)
    assert r.returncode != 0
    expected = {"not-onnx": "is not an ONNX model", "unknown-target": "unknown target 'toaster'",
                "empty-calib": "contains no samples", "wrong-shape": "does not fit model input",
                "quantized": "already quantized", "no-preprocess": "no preprocessing is declared"}[case]
    assert expected in line
    assert not out.exists() and not list(tmp_path.glob(".out.onnx*"))


def test_tflite_file_is_named(tmp_path):
    p = tmp_path / "m.tflite"
    p.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64)
    with pytest.raises(ModelError, match="TFLite"):
        load_model(p)


def test_fashion_cnn_real_model(tmp_path, assets):
    """The real Fashion-MNIST CNN: INT8 within 0.3 points on 5,000 real test images, >= 3.5x smaller."""
    model = assets("models/fashion-cnn.onnx")
    calib = load_dataset(assets("fashion-mnist/calib-x.npz"), limit=256)
    search = load_dataset(assets("fashion-mnist/search-x.npz"), limit=2000)
    test = load_dataset(assets("fashion-mnist/test-x.npz"))
    test = test.subset(np.arange(0, 10000, 2))
    rep = quantize(model, load_target("rpi4-2gb"), calib, test, tmp_path / "f.onnx", search=search,
                   options=QuantizeOptions(latency_threads=(1,)))
    assert rep.metric == "top-1 accuracy" and rep.holdout_samples == 5000
    assert rep.fp32_top1 > 90.0
    assert rep.drop_points <= 0.3, rep.to_json()
    assert rep.size_ratio >= 3.5
    assert rep.budget_met


def test_missing_asset_names_the_command(tmp_path, monkeypatch):
    from edgepack.assets import asset
    from edgepack.errors import AssetMissing

    monkeypatch.setenv("EDGEPACK_ASSETS", str(tmp_path))
    with pytest.raises(AssetMissing, match="python scripts/assets.py"):
        asset("models/efficientnet-lite0.onnx")


def test_dynamic_candidate_for_matmul_models_where_the_board_allows_it(tmp_path):
    """An MLP (MatMul-dominated): dynamic PTQ is measured as a candidate on a float-capable board,
    never on an INT8-only NPU."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (32, 5)).astype(np.float32), "w2")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], [w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "mlp.onnx"))
    x = rng.normal(0, 1, (80, 16)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "mlp.onnx")).run(None, {"x": x})[0].argmax(1)
    np.savez(tmp_path / "c.npz", inputs=x[:20])
    np.savez(tmp_path / "e.npz", inputs=x[20:], labels=y[20:])
    opts = QuantizeOptions(weight_rounding="nearest", latency_threads=(1,), max_evals=6)
    rep = quantize(tmp_path / "mlp.onnx", load_target("x86-vnni"), load_dataset(tmp_path / "c.npz"),
                   load_dataset(tmp_path / "e.npz"), tmp_path / "q.onnx", options=opts)
    assert "dynamic" in {c.method for c in rep.candidates}
    rep = quantize(tmp_path / "mlp.onnx", load_target("phone-npu-int8"), load_dataset(tmp_path / "c.npz"),
                   load_dataset(tmp_path / "e.npz"), tmp_path / "q2.onnx", options=opts)
    assert "dynamic" not in {c.method for c in rep.candidates}


def test_sensitivity_ranks_layers_followed_by_folded_activations(tmp_path, tiny_model, tiny_data):
    """conv1 and conv2 are followed by a ReLU that the QDQ model folds away; they must still be
    ranked, measured after the activation on both sides (SQNR positive, noise injected >= 0)."""
    from edgepack.quantize.calibrate import collect
    from edgepack.quantize.qdq import QDQBuilder, preprocess_model
    from edgepack.quantize.sensitivity import rank_layers

    info = load_model(tiny_model)
    pre = preprocess_model(info, tmp_path)
    cal = collect(pre, load_dataset(tiny_data[0]), info.input_names)
    q = QDQBuilder(tmp_path / "pre.onnx", cal, load_target("x86-vnni"), tmp_path, None).build("minmax", [])
    _, feeds = next(load_dataset(tiny_data[1]).feeds(16, info.input_names))
    ranking = rank_layers(pre, onnx.load(str(q)), feeds)
    assert {r.name for r in ranking} == {"conv1", "conv2", "fc"}
    assert all(r.sqnr_db > 10 for r in ranking) and all(r.score >= 0 for r in ranking)


def test_budget_is_measured_against_the_reference_model(tmp_path, tiny_model, tiny_data):
    """QAT quantizes its fine-tuned export but the user's budget is against the original FP32:
    ``reference`` makes every comparison (search and held-out) use that model's outputs."""
    from onnx import numpy_helper

    m = onnx.load(str(tiny_model))
    for t in m.graph.initializer:                     # a "different FP32": every weight scaled and shifted
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.size > 1:
            t.CopyFrom(numpy_helper.from_array((a * -1.0 + 0.05).astype(np.float32), t.name))
    other = tmp_path / "other.onnx"
    onnx.save(m, str(other))
    opts = dict(weight_rounding="nearest", latency_threads=(1,), max_evals=3, max_drop=100.0)
    own = quantize(tiny_model, load_target("x86-vnni"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
                   tmp_path / "a.onnx", options=QuantizeOptions(**opts))
    vs = quantize(tiny_model, load_target("x86-vnni"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
                  tmp_path / "b.onnx", options=QuantizeOptions(reference=other, **opts))
    assert own.fp32_top1 == 100.0                     # the labels are this model's own argmax
    assert vs.fp32_top1 < own.fp32_top1 and vs.agreement < own.agreement
    bad = tmp_path / "bad.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["z"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 8, 8])])), str(bad))
    with pytest.raises(ModelError, match="reference model .* takes inputs"):
        quantize(tiny_model, load_target("x86-vnni"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
                 tmp_path / "c.onnx", options=QuantizeOptions(reference=bad, **opts))
    assert not (tmp_path / "c.onnx").exists()
