"""The accuracy budget a target sets (Target.accuracy_budget): top-1 drop with labels, the stated
agreement floor (``min_agreement``) on label-free data, ``--max-drop`` over both."""
from __future__ import annotations

import numpy as np
import pytest

from edgepack.data import load_dataset
from edgepack.errors import DataError, TargetError
from edgepack.quantize.pipeline import QuantizeOptions, quantize
from edgepack.targets import load_target, parse_target


def test_label_free_budget_is_the_agreement_floor():
    t = load_target("rpi4-2gb")
    assert t.min_agreement == 97.0 and t.max_top1_drop == 1.0
    pts, basis = t.accuracy_budget(labelled=False)
    assert pts == pytest.approx(3.0) and "agreement with FP32 >= 97 %" in basis
    assert t.accuracy_budget(labelled=True)[0] == 1.0
    assert t.accuracy_budget(labelled=False, max_drop=0.5) == (0.5, "drop <= 0.5 points (--max-drop)")
    # a target without the field keeps reading max_top1_drop as disagreement
    x = load_target("x86-avx2")
    assert x.min_agreement is None and x.accuracy_budget(labelled=False)[0] == x.max_top1_drop


def test_min_agreement_is_validated():
    d = {"name": "t", "arch": "aarch64", "ram_mb": 1, "storage_mb": 1, "ota_budget_mb": 1.0,
         "compute": [{"name": "c", "kind": "cpu", "dtypes": ["int8", "fp32"],
                      "runtimes": ["onnxruntime:CPUExecutionProvider"]}],
         "budgets": {"max_top1_drop": 1.0, "latency_ms": 1.0, "model_ram_mb": 1, "min_agreement": 150.0}}
    with pytest.raises(TargetError, match="min_agreement"):
        parse_target(d)
    d["budgets"]["min_agreement"] = "high"
    with pytest.raises(TargetError, match="min_agreement"):
        parse_target(d)


def test_quantize_applies_the_floor_on_label_free_data_and_reports_labelled_top1(tmp_path, tiny_model, tiny_data):
    ev = np.load(tiny_data[1])
    np.savez(tmp_path / "nolabels.npz", inputs=ev["inputs"])
    opts = QuantizeOptions(weight_rounding="nearest", latency_threads=(1,), methods=("minmax",), max_evals=3)
    r = quantize(tiny_model, load_target("rpi4-2gb"), load_dataset(tiny_data[0]), load_dataset(tmp_path / "nolabels.npz"),
                 tmp_path / "q.onnx", options=opts, top1_data=load_dataset(tiny_data[1]))
    assert r.budget_points == pytest.approx(3.0) and "min_agreement" in r.budget_basis
    assert r.budget_met == (r.agreement >= 97.0)
    lt = r.labelled_top1
    assert lt["n"] == len(ev["labels"]) and lt["fp32_top1"] == 100.0   # labels are the FP32 model's own
    assert 0 <= lt["int8_top1"] <= 100
    with pytest.raises(DataError, match="labelled"):
        quantize(tiny_model, load_target("rpi4-2gb"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
                 tmp_path / "q2.onnx", options=opts, top1_data=load_dataset(tmp_path / "nolabels.npz"))
