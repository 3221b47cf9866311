"""`edgepack quantize --format tflite` end to end with LiteRT's quantizer (.venv-tflite, made by
scripts/setup.sh -> scripts/setup-tflite.sh): a real float CNN becomes a full-integer .tflite for an
INT8-only LiteRT board, its golden data passes the agent's trial, and the agent names XNNPACK."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

from edgepack.tflite import read_tflite
from edgepack.tflite.convert import ConverterMissing, converter_python


def _have_converter() -> bool:
    try:
        converter_python()
        return True
    except ConverterMissing:
        return False


needs_converter = pytest.mark.skipif(not _have_converter() and os.environ.get("EDGEPACK_REQUIRE_TFLITE") != "1",
                                     reason="no .venv-tflite (bash scripts/setup-tflite.sh); the other tflite tests "
                                            "do not need it")


@needs_converter
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # LiteRT's Delegate.__del__ bug
def test_full_integer_tflite_for_an_int8_only_board_installs(tmp_path, tiny_model, tiny_data):
    calib, ev = tiny_data
    out = tmp_path / "tiny-int8.tflite"
    r = subprocess.run([sys.executable, "-m", "edgepack.cli", "quantize", str(tiny_model), "--target", "phone-npu-int8",
                        "--format", "tflite", "--calib", str(calib), "--eval", str(ev), "-o", str(out),
                        "--max-drop", "5", "--threads", "1", "--max-evals", "4", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode in (0, 4), r.stderr[-2000:]
    rep = json.loads(r.stdout)
    info = read_tflite(out)
    assert info.full_integer and rep["full_integer"] and rep["float_ops"] == []
    assert info.inputs[0].dtype == "int8" and info.inputs[0].shape == (1, 8, 8, 1)
    weights = [t for t in info.tensors if t.constant and t.dtype == "int8"]
    assert weights and all(t.scales for t in weights)
    # the smallest candidate meeting the budget wins: on this tiny model that is the ONNX search's
    # plain per-tensor choice, carried over; LiteRT's quantizer candidates are per-channel
    meeting = [c for c in rep["candidates"] if c["search_drop"] <= rep["budget_points"]]
    assert rep["int8_size_bytes"] == min(c["size_bytes"] for c in meeting) or rep["int8_size_bytes"] < min(
        c["size_bytes"] for c in meeting) * 1.01
    assert any(c["name"] == "minmax" and c["size_bytes"] > rep["int8_size_bytes"] for c in rep["candidates"]) or \
        any(t.per_channel for t in weights)
    names = [c["name"] for c in rep["candidates"]]
    assert "minmax" in names and any(n.startswith("edgepack ONNX search") for n in names)
    assert rep["agreement"] >= 85.0 and rep["int8_size_bytes"] == out.stat().st_size
    assert rep["latency"][0]["threads"] == 1 and rep["latency"][0]["int8_ms"] > 0

    # the board: golden data computed on the host reproduces exactly in the agent's trial
    from agent_helpers import bundle, init_board, make_pki
    pki = make_pki(tmp_path / "pki")
    g = out.with_suffix(".golden.npz")
    with np.load(g) as z:
        assert z["inputs"].dtype == np.int8 and z["outputs"].dtype == np.int8
    b = bundle(pki, tmp_path / "r1.bundle", out, release=1, golden=g, settings={"runtime": "litert", "threads": 1},
               targets=("phone-npu-int8",))
    a = init_board(tmp_path / "board", pki, target="phone-npu-int8", runtimes=["litert"], threads=1,
                   trial_in_process=True)
    res = a.install(b)
    assert res.status == "committed" and res.trial["provider"] == "XNNPACK", res
