"""Runtime adapters: ONNX Runtime and LiteRT side by side; a missing accelerator is reported, never replaced."""
from __future__ import annotations

import numpy as np
import pytest

from agent_helpers import bundle, golden_for, init_board, make_onnx, make_pki, onnx_to_tflite, run_agent
from device_agent.agent_errors import AcceleratorUnavailable, HealthCheckFailed, RuntimeUnavailable
from device_agent.health import percentile
from device_agent.runtime import choose_runtime, installed, load_model

litert = pytest.mark.skipif(not installed("litert"), reason="ai-edge-litert not installed (pip install ai-edge-litert==2.3.0)")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    onnx_m = make_onnx(d / "mlp.onnx", seed=0)
    return d, onnx_m, golden_for(onnx_m, d / "g.npz")


@litert
def test_litert_matches_onnxruntime(models):
    d, onnx_m, _ = models
    tfl = onnx_to_tflite(onnx_m, d / "mlp.tflite")
    x = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
    a = load_model(onnx_m, "onnxruntime", threads=1)
    b = load_model(tfl, "litert", threads=1)
    assert b.provider == "XNNPACK" and b.inputs[0].name == "x"
    np.testing.assert_allclose(a.run({"x": x})[0], b.run({"x": x})[0], atol=1e-4)


@litert
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # LiteRT's Delegate.__del__ bug
def test_litert_bundle_installs_and_benches(tmp_path, models):
    d, onnx_m, g = models
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "t").mkdir()
    tfl = onnx_to_tflite(onnx_m, tmp_path / "t" / "mlp.tflite")
    b = bundle(pki, tmp_path / "r1.bundle", tfl, release=1, golden=g, settings={"runtime": "tflite", "threads": 1})
    a = init_board(tmp_path / "board", pki, runtimes=["onnxruntime", "litert"], threads=1, trial_in_process=True)
    r = a.install(b)
    assert r.status == "committed" and r.trial["runtime"] == "litert" and r.trial["provider"] == "XNNPACK"
    code, out, err = run_agent(tmp_path / "board", "bench", "--runs", "20")
    assert code == 0, err
    assert out["runtime"] == "litert" and out["provider"] == "XNNPACK" and out["latency"]["runs"] == 20
    code, out, err = run_agent(tmp_path / "board", "eval")
    assert code == 0 and out["comparison"]["top1_agreement"] == 1.0, err
    # the same board asked for a delegate it does not have: reported, trial fails, rollback
    a.sd.save_board(a.board().__class__(**{**a.board().__dict__, "accelerator": "libedgetpu_missing.so.1"}))
    b2 = bundle(pki, tmp_path / "r2.bundle", tfl, release=2, golden=g, settings={"runtime": "tflite"})
    with pytest.raises(HealthCheckFailed, match="delegate"):
        a.install(b2)
    assert a.sd.load().active == "a"
    with pytest.raises(AcceleratorUnavailable):
        load_model(tfl, "litert", accelerator="libedgetpu_missing.so.1")


def test_missing_runtime_and_provider_are_named(models):
    d, onnx_m, _ = models
    with pytest.raises(AcceleratorUnavailable, match="TensorrtExecutionProvider"):
        load_model(onnx_m, "onnxruntime", accelerator="TensorrtExecutionProvider")
    if not installed("openvino"):
        with pytest.raises(RuntimeUnavailable, match="openvino"):
            load_model(onnx_m, "openvino")
        with pytest.raises(RuntimeUnavailable):
            choose_runtime(onnx_m, ["openvino", "onnxruntime"], "openvino")
        assert choose_runtime(onnx_m, ["openvino", "onnxruntime"]) == "onnxruntime"  # preference skips it
        code, out, _ = run_agent(None, "bench", "--model", str(onnx_m), "--runtime", "openvino", "--runs", "2")
        assert code == 8 and out["error"]["type"] == "RuntimeUnavailable"


def test_bench_model_file_and_percentiles(models):
    d, onnx_m, _ = models
    code, out, err = run_agent(None, "bench", "--model", str(onnx_m), "--threads", "1", "--runs", "50", "--warmup", "5")
    assert code == 0, err
    assert out["threads"] == 1 and out["latency"]["runs"] == 50 and out["load_ms"] > 0
    assert out["rss_model_mb"] >= 0 and out["peak_rss_mb"] > out["rss_agent_mb"] > 0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 90) == 9.0
    assert percentile(list(map(float, range(1, 101))), 99) == 99.0
