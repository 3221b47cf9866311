import json

import numpy as np
import onnx

from conftest import run_cli
from edgepack.quantize.analyze import analyze, placement_of, to_html
from edgepack.data import load_dataset
from edgepack.quantize.qdq import QDQBuilder
from edgepack.targets import load_target


def test_analyze_reports_every_view(tiny_model, tiny_data):
    r = analyze(tiny_model, load_target("phone-npu-int8"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
                sweep=(8, 16), top_float=2)
    names = {l.name for l in r.layers}
    assert names == {"conv1", "conv2", "fc"}
    assert [l.role for l in sorted(r.layers, key=lambda l: l.name)][0] == "first layer"  # conv1
    assert sum(l.float_gain is not None for l in r.layers) == 2
    assert [s["samples"] for s in r.size_sweep] == [8, 16, 32]
    assert r.tensor_sqnr and all(np.isfinite(t["sqnr_db"]) and t["sqnr_db"] > 0 for t in r.tensor_sqnr)
    assert 0.0 <= r.coverage_mean_outside <= 1.0 and r.coverage_worst
    assert r.placement.matmul_gemm_int8 == r.placement.matmul_gemm_total == 1
    html = to_html(r)
    assert html.startswith("<!doctype html>") and html.count("<svg") >= 4 and "<script" not in html


def test_placement_counts_cpu_islands(tmp_path, tiny_model, tiny_data):
    """Excluding a layer from INT8 on an INT8-only NPU leaves a CPU island with a transfer cost."""
    from edgepack.quantize.calibrate import collect
    from edgepack.modelinfo import load_model
    from edgepack.quantize.qdq import preprocess_model

    info = load_model(tiny_model)
    pre = preprocess_model(info, tmp_path)
    cal = collect(pre, load_dataset(tiny_data[0]), info.input_names)
    tgt = load_target("phone-npu-int8")
    b = QDQBuilder(tmp_path / "pre.onnx", cal, tgt, tmp_path, None)
    full = placement_of(onnx.load(str(b.build("minmax", []))), tgt)
    part = placement_of(onnx.load(str(b.build("minmax", ["conv2"]))), tgt)
    assert part.fallback_nodes > full.fallback_nodes and part.islands >= 1
    assert part.estimated_transfer_ms > 0 and "Conv" in part.fallback_ops


def test_analyze_cli_json_and_html(tmp_path, tiny_model, tiny_data):
    html = tmp_path / "a.html"
    r = run_cli("analyze", str(tiny_model), "--target", "phone-npu-int8", "--calib", str(tiny_data[0]),
                "--eval", str(tiny_data[1]), "--html", str(html), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert {"layers", "outliers", "placement", "size_sweep", "coverage_worst"} <= set(d)
    assert html.is_file() and "Per-layer sensitivity" in html.read_text()
