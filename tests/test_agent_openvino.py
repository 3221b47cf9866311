"""OpenVINO as a board runtime: the real Fashion CNN (FP32 and QDQ INT8) installed, trialled, benched
and evaluated on a board whose target profile (targets/intel-x86-openvino.toml) puts OpenVINO first,
and its outputs checked against ONNX Runtime's on real Fashion-MNIST test images."""
from __future__ import annotations

import numpy as np
import pytest

from agent_helpers import bundle, init_board, make_pki, run_agent
from device_agent.agent_errors import AcceleratorUnavailable, HealthCheckFailed, ModelLoadError
from device_agent.runtime import installed, load_model
from edgepack.errors import TargetError
from edgepack.targets import load_target, parse_target

pytestmark = pytest.mark.skipif(not installed("openvino"), reason="openvino not installed "
                                "(pip install openvino==2026.4.1, the 'openvino' extra; scripts/setup.sh does it)")

TARGET = "intel-x86-openvino"
N_GOLDEN = 64


def _absent_device() -> str | None:
    """An OpenVINO device this machine does not have (the build machines have only the CPU)."""
    import openvino as ov
    have = {d.split(".", 1)[0] for d in ov.Core().available_devices}
    return next((d for d in ("NPU", "GPU") if d not in have), None)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory, assets):
    """FP32 Fashion CNN, its QDQ INT8 (plain ORT quantize_static, 64 calibration images) and golden
    data: 64 real test images, ORT's FP32 outputs as the reference, the true labels."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    d = tmp_path_factory.mktemp("ov")
    fp32 = d / "fashion-cnn.onnx"
    fp32.write_bytes(assets("models/fashion-cnn.onnx").read_bytes())
    name = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with np.load(assets("fashion-mnist/calib-x.npz")) as z:
        calib = z["inputs"][:64].astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {name: b}

    int8 = d / "fashion-cnn-int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    with np.load(assets("fashion-mnist/test-x.npz")) as z:
        x, labels = z["inputs"][:N_GOLDEN].astype(np.float32), z["labels"][:N_GOLDEN]
    s = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    out = s.get_outputs()[0].name
    ref = np.stack([s.run(None, {name: xi[None]})[0] for xi in x])  # (N, 1, 10): one batch-1 run per sample
    golden = d / "golden.npz"
    np.savez(golden, **{f"inputs_{name}": x, f"outputs_{out}": ref, "labels": labels})
    return {"fp32": fp32, "int8": int8, "golden": golden, "x": x, "ref": ref, "labels": labels, "input": name}


def _outputs(model, runtime: str, x: np.ndarray, name: str, **kw) -> tuple[np.ndarray, object]:
    s = load_model(model, runtime, threads=1, **kw)
    return np.stack([s.run({name: xi[None]})[0] for xi in x]), s


def _unfused_ort(model, x: np.ndarray, name: str) -> np.ndarray:
    """ORT with graph optimisations off: every DequantizeLinear in float, so integer arithmetic is exact."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return np.stack([s.run(None, {name: xi[None]})[0] for xi in x])


def _ov_int8_kernels(model) -> dict[str, int]:
    """Layer types OpenVINO's CPU plugin executes in u8/i8 (its runtime graph), by count."""
    import openvino as ov
    core = ov.Core()
    rm = core.compile_model(core.read_model(str(model)), "CPU", {"INFERENCE_NUM_THREADS": 1}).get_runtime_model()
    out: dict[str, int] = {}
    for op in rm.get_ordered_ops():
        ri = op.get_rt_info()
        if "runtimePrecision" in ri and ri["runtimePrecision"].astype(str) in ("u8", "i8"):
            t = ri["layerType"].astype(str)
            out[t] = out.get(t, 0) + 1
    return out


def test_openvino_matches_onnxruntime_on_golden_data(fashion):
    """FP32: OpenVINO's kernels give ONNX Runtime's logits. INT8: the same QDQ file in OpenVINO's own
    INT8 kernels agrees with ORT's FP32 reference and with ORT's INT8 on the real test images."""
    x, ref, name = fashion["x"], fashion["ref"], fashion["input"]
    ov32, s = _outputs(fashion["fp32"], "openvino", x, name)
    assert s.runtime == "openvino" and s.provider == "CPU" and s.providers == ["CPU"] and s.threads == 1
    assert s.inputs[0].name == name and s.inputs[0].dtype == "float32" and s.outputs[0].dtype == "float32"
    np.testing.assert_allclose(ov32, ref, rtol=1e-4, atol=1e-4)
    assert (ov32.argmax(-1) == ref.argmax(-1)).all()

    ov8, s8 = _outputs(fashion["int8"], "openvino", x, name)
    ort8, _ = _outputs(fashion["int8"], "onnxruntime", x, name)
    exact = _unfused_ort(fashion["int8"], x, name)
    assert s8.provider == "CPU"
    kernels = _ov_int8_kernels(fashion["int8"])
    assert kernels.get("Convolution", 0) >= 2 and kernels.get("FullyConnected", 0) >= 1, kernels  # INT8, not float
    assert not np.allclose(ov8, ov32, atol=1e-3), "the INT8 model must not compute the FP32 logits exactly"
    top = {k: v.reshape(len(x), -1).argmax(1) for k, v in (("ov8", ov8), ("ort8", ort8), ("exact", exact), ("ref", ref))}
    assert np.mean(top["ov8"] == top["ref"]) >= 0.95
    # ORT's own INT8 kernels are the other runtime's answer for the same file; on x86 without VNNI they
    # saturate u8 x s8 pairs, so the arbiter is the same QDQ graph run unfused (exact integer arithmetic)
    assert np.mean(top["ov8"] == top["exact"]) >= max(0.95, np.mean(top["ort8"] == top["exact"]))
    a, b = ov8.reshape(len(x), -1), ref.reshape(len(x), -1)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.mean() >= 0.98 and cos.min() >= 0.90
    # outputs are copies: a later inference does not overwrite an earlier result
    s = load_model(fashion["int8"], "openvino", threads=1)
    first = s.run({name: x[:1]})[0]
    keep = first.copy()
    s.run({name: x[1:2]})
    np.testing.assert_array_equal(first, keep)


def test_profile_chooses_openvino_install_trial_bench_eval(tmp_path, fashion):
    """A board set up from the Intel profile runs FP32 and INT8 releases in OpenVINO: installed with a
    trial in a child process (golden data vs ORT's reference), then bench and eval as real processes."""
    t = load_target(TARGET)
    assert t.runtimes == ("openvino", "onnxruntime") and t.compute[0].runtimes[0] == "openvino:CPU"
    pki = make_pki(tmp_path / "pki")
    for m in ("fp32", "int8"):
        (tmp_path / m).mkdir()
        (tmp_path / m / "model.onnx").write_bytes(fashion[m].read_bytes())
    b1 = bundle(pki, tmp_path / "r1.bundle", tmp_path / "fp32" / "model.onnx", release=1, golden=fashion["golden"],
                settings={"runtime": t.runtimes[0], "threads": t.threads}, targets=[TARGET])
    b2 = bundle(pki, tmp_path / "r2.bundle", tmp_path / "int8" / "model.onnx", release=2, golden=fashion["golden"],
                settings={"runtime": t.runtimes[0], "threads": t.threads}, targets=[TARGET])
    board = tmp_path / "board"
    a = init_board(board, pki, target=TARGET, runtimes=list(t.runtimes), threads=t.threads,
                   latency_budget_ms=t.latency_ms, trial_runs=5)
    expected_acc = float(np.mean(fashion["ref"].reshape(N_GOLDEN, -1).argmax(1) == fashion["labels"]))
    for rel, b in ((1, b1), (2, b2)):
        r = a.install(b)  # trial in a child process (the default): a runtime crash cannot take the agent down
        assert r.status == "committed" and r.release == rel, r.trial
        tr = r.trial
        assert tr["passed"] and tr["runtime"] == "openvino" and tr["provider"] == "CPU" and tr["threads"] == t.threads
        assert tr["comparison"]["samples"] == N_GOLDEN and tr["comparison"]["top1_agreement"] >= 0.95

        code, out, err = run_agent(board, "bench", "--runs", "20", "--warmup", "3")
        assert code == 0, err
        assert out["release"] == rel and out["runtime"] == "openvino" and out["provider"] == "CPU"
        assert out["threads"] == t.threads and out["latency"]["runs"] == 20 and out["latency"]["p50_ms"] > 0
        assert out["input"].startswith("golden sample 0") and out["rss_model_mb"] >= 0

        code, out, err = run_agent(board, "eval")
        assert code == 0, err
        c = out["comparison"]
        assert out["runtime"] == "openvino" and out["provider"] == "CPU" and c["samples"] == N_GOLDEN
        assert c["reference_accuracy"] == pytest.approx(expected_acc)
        if rel == 1:  # FP32 in OpenVINO = ORT's reference
            assert c["top1_agreement"] == 1.0 and c["max_abs_error"] < 1e-3 and c["accuracy"] == pytest.approx(expected_acc)
        else:
            assert c["top1_agreement"] >= 0.95 and 0.9 <= c["cosine_mean"] < 1.0 and c["max_abs_error"] > 1e-3
            assert abs(c["accuracy"] - expected_acc) <= 0.05
    assert a.sd.load().active is not None and a.status()["active"]["release"] == 2


def test_missing_device_is_named_never_replaced(tmp_path, fashion):
    dev = _absent_device()
    if dev is None:
        pytest.skip("this machine has both an Intel NPU and GPU")
    m = fashion["fp32"]
    with pytest.raises(AcceleratorUnavailable, match=f"OpenVINO device {dev} is not present.*has CPU"):
        load_model(m, "openvino", accelerator=dev)
    for virtual in ("AUTO", f"AUTO:{dev},CPU", f"HETERO:{dev},CPU", "MULTI:CPU"):
        with pytest.raises(AcceleratorUnavailable, match="name one device"):
            load_model(m, "openvino", accelerator=virtual)
    assert load_model(m, "openvino", accelerator="cpu").provider == "CPU"  # naming the CPU is fine
    code, out, _ = run_agent(None, "bench", "--model", str(m), "--runtime", "openvino", "--accelerator", dev,
                             "--runs", "2")
    assert code == 8 and out["error"]["type"] == "AcceleratorUnavailable" and dev in out["error"]["message"]

    # a board that must use the device: the trial fails, names it, and the board rolls back
    pki = make_pki(tmp_path / "pki")
    b1 = bundle(pki, tmp_path / "r1.bundle", m, release=1, golden=fashion["golden"], settings={"runtime": "openvino"},
                targets=[TARGET])
    a = init_board(tmp_path / "board", pki, target=TARGET, runtimes=["openvino"], threads=1, trial_runs=2)
    assert a.install(b1).status == "committed"
    a.sd.save_board(a.board().__class__(**{**a.board().__dict__, "accelerator": dev}))
    b2 = bundle(pki, tmp_path / "r2.bundle", m, release=2, golden=fashion["golden"], settings={"runtime": "openvino"},
                targets=[TARGET])
    with pytest.raises(HealthCheckFailed, match=dev):
        a.install(b2)
    st = a.sd.load()
    assert st.active == "a" and st.counter == 1


def test_bad_model_is_a_one_line_load_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="OpenVINO cannot load bad.onnx on CPU") as e:
        load_model(bad, "openvino")
    assert "\n" not in str(e.value)
    code, out, err = run_agent(None, "eval", "--model", str(bad), "--runtime", "openvino", "--data", str(bad))
    assert code == 8 and out["error"]["type"] == "ModelLoadError" and "Traceback" not in err


def test_profile_runtimes_are_validated():
    t = load_target(TARGET)
    assert t.arch == "x86_64" and t.quant.activation_dtype == "uint8" and not t.quant.allow_dynamic
    assert {"int8", "fp32"} <= set(t.compute[0].dtypes)
    d = {"name": "b", "arch": "x86_64", "ram_mb": 512, "storage_mb": 1024, "ota_budget_mb": 4.0,
         "compute": [{"name": "cpu", "kind": "cpu", "dtypes": ["int8", "fp32"], "runtimes": ["openvno:CPU"]}],
         "budgets": {"max_top1_drop": 1.0, "latency_ms": 10.0, "model_ram_mb": 64}}
    with pytest.raises(TargetError, match="compute\\[0\\].*unknown runtime 'openvno'"):
        parse_target(d)
    d["compute"][0]["runtimes"] = ["tflite:xnnpack", "openvino:NPU", "ort"]
    assert parse_target(d).runtimes == ("litert", "openvino", "onnxruntime")


def test_device_names_as_openvino_lists_them():
    """Device matching against an OpenVINO device list like an Intel board with two GPUs and an NPU
    reports (the pure selection logic; which device actually ran is checked after compiling)."""
    from device_agent.runtime import _ov_device
    board = ["CPU", "GPU.0", "GPU.1", "NPU"]
    assert _ov_device(None, board) == "CPU"
    assert _ov_device("npu", board) == "NPU" and _ov_device("GPU", board) == "GPU" and _ov_device("GPU.1", board) == "GPU.1"
    with pytest.raises(AcceleratorUnavailable, match="GPU.2 is not present.*GPU.0, GPU.1"):
        _ov_device("GPU.2", board)
    with pytest.raises(AcceleratorUnavailable, match="name one device"):
        _ov_device("BATCH:GPU", board)
    with pytest.raises(AcceleratorUnavailable, match="NPU is not present"):
        _ov_device("NPU", ["CPU"])
