"""LiteRT on the host: the schema reader, the full-integer gate, the ONNX -> .tflite translation, the
int32 bias repair, bundling a .tflite as it is, analyze, and the CLI's one-line refusals.

Fixtures are real .tflite files written with LiteRT's own schema (tests/tflite_fixtures.py) and
run in the real LiteRT interpreter; no TensorFlow is needed. The quantizer itself (a subprocess
tool in .venv-tflite) is exercised in tests/test_tflite_quantize.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from tflite_fixtures import IN_SCALE, IN_ZP, OUT_SCALE, OUT_ZP, float_mlp, int8_mlp, weights

from edgepack.errors import ModelError
from edgepack.targets import load_target
from edgepack.tflite import read_tflite
from edgepack.tflite.gate import FloatOpsRefused, check_full_integer


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert import interpreter as tfl

    it = tfl.Interpreter(model_path=str(path))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def test_reader_reports_the_quantization_parameters_as_written(tmp_path):
    w, b = weights(8, 4)
    p = int8_mlp(tmp_path / "m.tflite", w, b)
    info = read_tflite(p)
    assert info.full_integer and info.op_counts == {"FULLY_CONNECTED": 1}
    (x,), (y,) = info.inputs, info.outputs
    assert (x.dtype, x.shape, x.zero_points) == ("int8", (1, 8), (IN_ZP,))
    assert x.scales[0] == pytest.approx(IN_SCALE, rel=1e-6)
    assert (y.dtype, y.zero_points) == ("int8", (OUT_ZP,)) and y.scales[0] == pytest.approx(OUT_SCALE, rel=1e-6)
    wt = next(t for t in info.tensors if t.name == "fc/w")
    assert wt.per_channel and wt.quantized_dimension == 0 and wt.constant
    np.testing.assert_allclose(wt.scales, np.abs(w).max(1) / 127, rtol=1e-6)
    bt = next(t for t in info.tensors if t.name == "fc/b")
    assert bt.dtype == "int32" and bt.zero_points == (0,) * 4
    np.testing.assert_allclose(bt.scales, IN_SCALE * np.abs(w).max(1) / 127, rtol=1e-6)
    assert info.ops[0].input_dtypes == ("int8", "int8", "int32") and info.ops[0].output_dtypes == ("int8",)
    # and the model computes what its parameters say (LiteRT, exact int8)
    xq = np.random.default_rng(0).integers(-128, 128, (1, 8)).astype(np.int8)
    ref = ((xq.astype(np.float32) - IN_ZP) * IN_SCALE) @ w.T + b
    got = (_run(p, xq).astype(np.float32) - OUT_ZP) * OUT_SCALE
    assert np.abs(got - ref).max() < 2 * OUT_SCALE + 0.02


def test_reader_refuses_what_is_not_a_tflite(tmp_path):
    (tmp_path / "x.tflite").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="not a TFLite model"):
        read_tflite(tmp_path / "x.tflite")
    w, b = weights()
    good = int8_mlp(tmp_path / "m.tflite", w, b).read_bytes()
    (tmp_path / "cut.tflite").write_bytes(good[:8] + b"\xff" * 40)  # identifier kept, tables pointing nowhere
    with pytest.raises(ModelError, match="damaged TFLite flatbuffer"):
        read_tflite(tmp_path / "cut.tflite")


def test_gate_refuses_a_float_op_on_an_int8_only_board_and_names_it(tmp_path):
    w, b = weights()
    mixed = read_tflite(int8_mlp(tmp_path / "mixed.tflite", w, b, float_tail=True))
    assert not mixed.full_integer
    assert [o.op for o in mixed.float_ops] == ["DEQUANTIZE", "SOFTMAX"]
    with pytest.raises(FloatOpsRefused) as e:
        check_full_integer(mixed, load_target("phone-npu-int8"))
    msg = str(e.value)
    assert "SOFTMAX#2" in msg and "DEQUANTIZE#1" in msg and "phone-npu-int8" in msg and "\n" not in msg
    check_full_integer(mixed, load_target("rpi4-2gb"))  # a CPU board that runs float: allowed
    check_full_integer(read_tflite(int8_mlp(tmp_path / "int8.tflite", w, b)), load_target("phone-npu-int8"))


def test_tflite_info_cli(tmp_path):
    w, b = weights()
    mixed = int8_mlp(tmp_path / "mixed.tflite", w, b, float_tail=True)
    r = run_cli("tflite-info", str(mixed), "--json", "--tensors")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["float_ops"] == ["DEQUANTIZE#1", "SOFTMAX#2"] and d["per_channel_tensors"] == 2
    assert next(t for t in d["tensors"] if t["name"] == "x")["zero_points"] == [IN_ZP]
    r = run_cli("tflite-info", str(mixed), "--target", "phone-npu-int8")
    assert r.returncode == 4 and "SOFTMAX#2" in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = run_cli("tflite-info", str(tmp_path / "missing.tflite"))
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_onnx_translation_matches_onnxruntime(tmp_path, tiny_model):
    import onnxruntime as ort

    from edgepack.tflite.from_onnx import onnx_to_float_tflite
    from edgepack.tflite.run import predict_tflite
    from edgepack.data import load_dataset

    p = onnx_to_float_tflite(tiny_model, tmp_path / "tiny.tflite")
    info = read_tflite(p)
    assert info.inputs[0].shape == (1, 8, 8, 1) and info.op_counts["CONV_2D"] == 2  # NHWC, Relu fused
    x = np.random.default_rng(2).normal(0, 1, (16, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", inputs=x)
    ref = ort.InferenceSession(str(tiny_model)).run(None, {"x": x})[0]
    got = predict_tflite(p, load_dataset(tmp_path / "x.npz"))
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_onnx_translation_names_an_unsupported_op(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgepack.tflite.from_onnx import onnx_to_float_tflite

    g = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"], name="sig")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "s.onnx"))
    with pytest.raises(ModelError, match="ONNX op Sigmoid .* no LiteRT translation"):
        onnx_to_float_tflite(tmp_path / "s.onnx", tmp_path / "s.tflite")
    assert not (tmp_path / "s.tflite").exists()


def test_bias_repair_widens_only_the_overflowing_channel(tmp_path):
    """A near-zero weight channel with a real bias: int32 bias = b / (s_in * s_w) overflows and wraps
    (what LiteRT's quantizer writes); the repair widens that channel's scale so the bias fits."""
    from edgepack.tflite.biasfix import INT32_LIMIT, fit_bias_scales

    w, b = weights(8, 4, seed=3)
    w[1] = 1e-9  # a dead channel
    b[1] = 0.5
    ws = np.abs(w).max(1) / 127
    wrapped = (np.round(b.astype(np.float64) / (IN_SCALE * ws))).astype(np.int64).astype(np.int32)  # C-style wrap
    fl = float_mlp(tmp_path / "f.tflite", w, b)
    bad = int8_mlp(tmp_path / "q.tflite", w, b, w_scale=ws, bias_q=wrapped)
    xq = np.random.default_rng(4).integers(-128, 128, (1, 8)).astype(np.int8)
    ref = ((xq.astype(np.float32) - IN_ZP) * IN_SCALE) @ w.T + b
    before = (_run(bad, xq).astype(np.float32) - OUT_ZP) * OUT_SCALE
    assert abs(before[0, 1] - ref[0, 1]) > 0.1  # the wrapped bias is wrong
    fixes = fit_bias_scales(bad, fl, tmp_path / "fixed.tflite")
    assert [(f.layer, f.channels) for f in fixes] == [("fc/w", 1)]
    info = read_tflite(tmp_path / "fixed.tflite")
    wt = next(t for t in info.tensors if t.name == "fc/w")
    bt = next(t for t in info.tensors if t.name == "fc/b")
    assert wt.scales[1] > ws[1] * 1e3 and np.allclose(np.delete(wt.scales, 1), np.delete(ws, 1), rtol=1e-6)
    assert abs(b[1] / bt.scales[1]) <= INT32_LIMIT * 1.001
    after = (_run(tmp_path / "fixed.tflite", xq).astype(np.float32) - OUT_ZP) * OUT_SCALE
    assert np.abs(after - ref).max() < 2 * OUT_SCALE + 0.02
    np.testing.assert_array_equal(np.delete(after, 1), np.delete(before, 1))  # other channels untouched


def test_bundle_carries_a_tflite_as_it_is(tmp_path):
    """`edgepack bundle` packages a .tflite byte for byte; the board's reader gets the same bytes."""
    from ota_helpers import build, make_pki

    from device_agent.bundle import extract, open_bundle
    from device_agent.trust import TrustRoot

    w, b = weights()
    m = int8_mlp(tmp_path / "m.tflite", w, b, float_tail=True)
    pki = make_pki(tmp_path / "pki")
    rep = build(pki, tmp_path / "r1.bundle", m, settings={"runtime": "litert", "threads": 1})
    vm = open_bundle(rep.path, TrustRoot.from_bytes(pki.root_doc))
    assert vm.file("model").path == "m.tflite"
    extract(vm, tmp_path / "x")
    assert (tmp_path / "x" / "m.tflite").read_bytes() == m.read_bytes()


def test_analyze_on_tflite(tmp_path):
    w, b = weights()
    mixed = int8_mlp(tmp_path / "mixed.tflite", w, b, float_tail=True)
    np.savez(tmp_path / "d.npz", inputs=np.zeros((4, 8), np.float32))
    r = run_cli("analyze", str(mixed), "--target", "phone-npu-int8", "--calib", str(tmp_path / "d.npz"),
                "--eval", str(tmp_path / "d.npz"), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["gate"].startswith("REFUSED") and "SOFTMAX#2" in d["gate"]
    assert d["placement"].startswith("1 of 3 ops integer (eligible for npu)") or "1 of 3 ops integer" in d["placement"]


def test_quantize_format_tflite_refusals(tmp_path, tiny_model, tiny_data):
    calib, ev = tiny_data
    out = tmp_path / "o.tflite"
    env_missing = {"EDGEPACK_TFLITE_PYTHON": str(tmp_path / "no-such-python")}
    import subprocess
    import sys
    base = [sys.executable, "-m", "edgepack.cli", "quantize", str(tiny_model), "--calib", str(calib), "--eval", str(ev),
            "-o", str(out), "--format", "tflite"]
    r = subprocess.run(base + ["--target", "rpi4-2gb"], capture_output=True, text=True, env={**os.environ, **env_missing},
                       timeout=300)
    errs = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert r.returncode == 3 and len(errs) == 1 and "scripts/setup-tflite.sh" in errs[0], r.stderr
    assert "Traceback" not in r.stderr and "candidate" not in r.stderr  # said before any work
    assert not out.exists()
    r = subprocess.run(base + ["--target", "intel-x86-openvino"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not LiteRT" in r.stderr and not out.exists(), r.stderr
    r = run_cli("quantize", str(tiny_model), "--calib", str(calib), "--eval", str(ev), "-o", str(out),
                "--format", "coreml", "--target", "rpi4-2gb")
    assert r.returncode == 2 and "--format must be onnx or tflite" in r.stderr
