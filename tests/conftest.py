"""Shared fixtures. Real assets come from `python scripts/assets.py`; a missing one fails with
that command in the message (never a silent skip)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
# The embedded default fleet gains the emulated Pi 4 when scripts/arm-board.sh built it; the tests
# of the default fleet stay on the local board unless they ask for it (tests/test_emulated_board.py).
os.environ.setdefault("EDGEPACK_EMULATED_BOARD", "0")


@pytest.fixture(scope="session")
def assets():
    from edgepack.assets import asset

    def get(rel: str) -> Path:
        return asset(rel)  # raises AssetMissing naming `python scripts/assets.py`

    return get


def small_cnn(path: Path, seed: int = 0) -> Path:
    """A real (tiny) float CNN: Conv-Relu-Conv-Relu-GAP-Gemm, 1x8x8 input, 4 classes."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b2")
    wf = numpy_helper.from_array(rng.normal(0, 0.5, (4, 8)).astype(np.float32), "wf")
    bf = numpy_helper.from_array(np.zeros(4, np.float32), "bf")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    g = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                          [w1, b1, w2, b2, wf, bf])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    return small_cnn(tmp_path / "tiny.onnx")


@pytest.fixture
def tiny_data(tmp_path, tiny_model):
    """Calibration/eval arrays for the tiny CNN, labelled by the FP32 model itself."""
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (96, 1, 8, 8)).astype(np.float32)
    y = ort.InferenceSession(str(tiny_model)).run(None, {"x": x})[0].argmax(1)
    np.savez(tmp_path / "calib.npz", inputs=x[:32])
    np.savez(tmp_path / "eval.npz", inputs=x[32:], labels=y[32:])
    return tmp_path / "calib.npz", tmp_path / "eval.npz"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600)
