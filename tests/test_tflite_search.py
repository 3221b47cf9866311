"""The LiteRT-side search: float islands (a tensor is float only when its writer and readers are),
percentile/MSE ranges written into the quantizer's INT8 model, several variants from one
calibration, and the search keeping float only where the target allows it. Real LiteRT, tiny CNN."""
from __future__ import annotations

import numpy as np
import pytest

from edgepack.tflite import read_tflite
from edgepack.tflite.floatacts import float_cost, float_island, islands, within_cost
from edgepack.tflite.from_onnx import onnx_to_float_tflite
from test_tflite_quantize import needs_converter


@pytest.fixture
def float_tfl(tmp_path, tiny_model):
    return onnx_to_float_tflite(tiny_model, tmp_path / "tiny-float.tflite")


def _calib(float_tfl, n=24):
    shape = read_tflite(float_tfl).inputs[0].shape[1:]
    return np.random.default_rng(0).normal(0, 1, (n, *shape)).astype(np.float32)


def _qerr(v, lo, hi):
    from edgepack.tflite.ranges import _grid

    s, z = _grid(lo, hi)
    return float((((np.clip(np.round(v / s) + z, -128, 127) - z) * s - v) ** 2).mean())


def test_island_is_the_writer_and_every_reader(float_tfl):
    info = read_tflite(float_tfl)
    conv1 = info.tensors[info.ops[0].outputs[0]].name
    isl = float_island(info, conv1)
    assert isl[0] == conv1 and len(isl) == 2  # conv1 writes it, conv2 reads it
    assert isl[1] == info.tensors[info.ops[1].outputs[0]].name
    assert float_island(info, "no such tensor") == []
    assert islands(info, [conv1, conv1]) == tuple(isl)  # each op once
    # the island's float weights: conv1's 8x1x3x3 and conv2's 8x8x3x3 at 4 bytes instead of 1
    assert float_cost(info, [conv1]) == 3 * (8 * 9 + 64 * 9)
    assert within_cost(info, [conv1], 3 * (8 * 9 + 64 * 9)) == [conv1] and within_cost(info, [conv1], 100) == []
    # ops already float count against the same cap, once: conv2 already float leaves conv1's 216 bytes
    conv2 = (isl[1],)
    assert float_cost(info, [conv1], already=conv2) == 3 * (8 * 9 + 64 * 9)
    assert within_cost(info, [conv1], 3 * 8 * 9, already=conv2) == []
    assert within_cost(info, [conv1], 3 * (8 * 9 + 64 * 9), already=conv2) == [conv1]


def test_percentile_and_mse_ranges_clip_inside_min_max(float_tfl):
    from edgepack.tflite.ranges import activation_samples, choose_ranges

    smp = activation_samples(float_tfl, _calib(float_tfl))
    assert smp, "no activation recorded"
    for rule in ("percentile", "mse"):
        rg = choose_ranges(smp, rule)
        for name, (lo, hi) in rg.items():
            _, mn, mx = smp[name]
            assert min(mn, 0) - 1e-6 <= lo <= 0 <= hi <= mx + 1e-6
        if rule == "percentile":
            assert any(hi < smp[n][2] - 1e-6 for n, (_, hi) in rg.items()), "percentile clipped nothing"
        else:  # never worse than min/max on the stored values: it is one of the clippings tried
            for name, (lo, hi) in rg.items():
                v, mn, mx = smp[name]
                assert _qerr(v, lo, hi) <= _qerr(v, mn, mx) * (1 + 1e-4)
    with pytest.raises(ValueError, match="unknown range rule"):
        choose_ranges(smp, "median")


@needs_converter
def test_variants_share_one_calibration_and_regrid_keeps_bias_scales(tmp_path, float_tfl):
    from edgepack.tflite.convert import quantize_variants
    from edgepack.tflite.ranges import activation_samples, choose_ranges, regrid
    from edgepack.tflite.run import TfliteRunner

    info = read_tflite(float_tfl)
    conv1 = info.tensors[info.ops[0].outputs[0]].name
    x = _calib(float_tfl)
    full, mixed = tmp_path / "full.tflite", tmp_path / "mixed.tflite"
    quantize_variants(float_tfl, x, [(full, ()), (mixed, islands(info, [conv1]))], calibration="minmax")
    fi, mi = read_tflite(full), read_tflite(mixed)
    assert fi.full_integer and not mi.full_integer
    assert conv1 in {mi.tensors[i].name for o in mi.float_ops for i in o.outputs}
    assert {o.op for o in mi.ops} >= {"QUANTIZE", "DEQUANTIZE"}  # the island's edges

    out = tmp_path / "pct.tflite"
    rg = choose_ranges(activation_samples(float_tfl, x), "percentile")
    assert regrid(full, float_tfl, rg, out) > 0
    ri = read_tflite(out)
    changed = [t for t, u in zip(ri.tensors, fi.tensors) if t.scales != u.scales and not t.constant]
    assert changed
    for o in ri.ops:  # LiteRT's kernels take bias scale = input scale x weight scale
        if o.op in ("CONV_2D", "FULLY_CONNECTED") and len(o.inputs) > 2:
            xs, w, b = (ri.tensors[i] for i in o.inputs[:3])
            np.testing.assert_allclose(b.scales, xs.scales[0] * np.asarray(w.scales), rtol=1e-5)
    r = TfliteRunner(out)
    y = r(r.prepare(x[0].transpose(2, 0, 1)))
    assert np.isfinite(y).all() and y.shape == (4,)


@needs_converter
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("target, float_expected", [("rpi4-2gb", True), ("phone-npu-int8", False)])
def test_search_keeps_float_only_where_the_target_allows(tmp_path, tiny_model, tiny_data, target, float_expected):
    from edgepack.data import load_dataset
    from edgepack.targets import load_target
    from edgepack.tflite.pipeline import TfliteOptions, quantize_tflite

    calib, ev = (load_dataset(p) for p in tiny_data)
    opts = TfliteOptions(max_drop=-1.0, calibrations=("minmax",), onnx_search=False, latency_threads=(1,),
                         latency_rounds=1, golden_samples=2, float_steps=(1, 2))  # an unreachable budget
    r = quantize_tflite(tiny_model, load_target(target), calib, ev, tmp_path / "m.tflite", options=opts)
    floated = [c for c in r.candidates if c.float_ops]
    assert bool(floated) is float_expected
    if float_expected:  # two growing island sets, from one calibration
        assert len({tuple(c.float_ops) for c in floated}) == 2
        assert len(floated[0].float_ops) < len(floated[1].float_ops)
    else:
        assert r.full_integer and r.float_ops == []


def _flatten_cnn(path):
    """Conv-Relu-Flatten-Gemm over a 4x8x8 map: ONNX flattens C,H,W, a .tflite H,W,C."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.2, (4, 256)).astype(np.float32), "wf"),
             numpy_helper.from_array(np.zeros(4, np.float32), "bf")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Flatten", ["r1"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "flat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _flatten_case(tmp_path, *, seed: int, n: int, n_calib: int):
    """The flatten CNN, its first ``n_calib`` of ``n`` random inputs to calibrate, the rest
    labelled with the FP32 model's own top-1 to judge."""
    import onnxruntime as ort

    from edgepack.data import load_dataset

    model = _flatten_cnn(tmp_path / "flat.onnx")
    x = np.random.default_rng(seed).normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
    y = ort.InferenceSession(str(model)).run(None, {"x": x})[0].argmax(1)
    np.savez(tmp_path / "calib.npz", inputs=x[:n_calib])
    np.savez(tmp_path / "eval.npz", inputs=x[n_calib:], labels=y[n_calib:])
    return model, load_dataset(tmp_path / "calib.npz"), load_dataset(tmp_path / "eval.npz")


@needs_converter
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_carried_over_search_maps_flatten_gemm_columns(tmp_path):
    """The ONNX search's integers carried into the .tflite compute what LiteRT's own quantizer's
    candidate computes to within INT8 noise: a Gemm after a spatial Flatten gets its weight columns
    in H,W,C order (a C,H,W copy scored chance on the Fashion CNN, 10.6 %)."""
    from edgepack.targets import load_target
    from edgepack.tflite.pipeline import TfliteOptions, quantize_tflite

    model, calib, ev = _flatten_case(tmp_path, seed=4, n=160, n_calib=32)
    opts = TfliteOptions(max_drop=100.0, calibrations=("minmax",), latency_threads=(1,), latency_rounds=1,
                         golden_samples=2)
    r = quantize_tflite(model, load_target("rpi4-2gb"), calib, ev, tmp_path / "m.tflite", options=opts)
    by = {c.name.split(" (")[0]: c for c in r.candidates}
    carried = by["edgepack ONNX search, carried over"]
    assert carried.search_agreement >= 90.0 and carried.search_agreement >= by["minmax"].search_agreement - 5, \
        [(c.name, c.search_agreement) for c in r.candidates]
    assert not any("weight layout" in w for w in r.warnings)


@needs_converter
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_litert_search_chooses_by_the_onnx_searchs_rule(tmp_path):
    """Label-free: most accurate = highest output SQNR, and the floor is cleared by a margin of
    standard errors (edgepack.quantize.selection), as in the ONNX search. A tiny CNN whose
    calibration holds two outlier samples, so the calibration rules disagree."""
    from conftest import small_cnn
    from edgepack.data import load_dataset
    from edgepack.quantize import selection
    from edgepack.targets import load_target
    from edgepack.tflite.pipeline import TfliteOptions, quantize_tflite

    model = small_cnn(tmp_path / "cnn.onnx", seed=2)
    x = np.random.default_rng(1).normal(0, 1, (96, 1, 8, 8)).astype(np.float32)
    c = x[:32].copy()
    c[:2] *= 12
    np.savez(tmp_path / "calib.npz", inputs=c)
    np.savez(tmp_path / "unlabelled.npz", inputs=x[32:])
    calib, ev = load_dataset(tmp_path / "calib.npz"), load_dataset(tmp_path / "unlabelled.npz")
    base = dict(calibrations=("minmax", "moving-average", "mse"), onnx_search=False, latency_threads=(1,),
                latency_rounds=1, golden_samples=2, float_steps=(1,))
    target = load_target("rpi4-2gb")
    r = quantize_tflite(model, target, calib, ev, tmp_path / "a.tflite",
                        options=TfliteOptions(max_drop=100.0, selection_margin=0.0, **base))
    top = max(r.candidates, key=lambda c: (c.output_sqnr_db, -c.search_drop))
    assert not any(c.float_ops for c in r.candidates) and r.calibration == top.calibration
    # a floor the most accurate candidate clears by less than one standard error: not met, so
    # the float search runs from it (the old rule took it as met); the choice is then the
    # fewest float ops among the candidates that clear the floor by the margin
    best = min(r.candidates, key=lambda c: selection.accuracy_rank(c, labelled=False))
    assert best.search_se > 0, "the CNN agrees on every selection sample: no margin to test"
    budget = best.search_drop + best.search_se / 2
    r2 = quantize_tflite(model, target, calib, ev, tmp_path / "b.tflite",
                         options=TfliteOptions(max_drop=budget, **base))
    assert any(c.float_ops for c in r2.candidates)
    cleared = [c for c in r2.candidates if selection.meets(c, budget, labelled=False, margin=1.0)]
    assert cleared, "no candidate clears the floor: the choice among them is not tested"
    want = min(cleared, key=lambda c: (len(c.float_ops), *selection.accuracy_rank(c, labelled=False), c.size_bytes))
    assert (r2.calibration, bool(r2.float_ops)) == (want.calibration, bool(want.float_ops))


@needs_converter
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_litert_choice_stays_within_the_ota_budget(tmp_path, tiny_model, tiny_data):
    """A float island costs float weights; over the board's OTA budget it is not chosen while an
    all-integer candidate fits (the ONNX search's rule, edgepack.quantize.selection.fitting)."""
    from dataclasses import replace

    from edgepack.data import load_dataset
    from edgepack.targets import load_target
    from edgepack.tflite.pipeline import TfliteOptions, quantize_tflite

    calib, ev = (load_dataset(p) for p in tiny_data)
    opts = TfliteOptions(max_drop=-1.0, calibrations=("minmax",), onnx_search=False, latency_threads=(1,),
                         latency_rounds=1, golden_samples=2, float_steps=(1, 2))  # unreachable: float is tried
    r = quantize_tflite(tiny_model, load_target("rpi4-2gb"), calib, ev, tmp_path / "a.tflite", options=opts)
    ints = [c for c in r.candidates if not c.float_ops]
    floats = [c for c in r.candidates if c.float_ops]
    assert ints and floats and max(c.size_bytes for c in ints) < min(c.size_bytes for c in floats)
    small = replace(load_target("rpi4-2gb"), ota_budget_mb=max(c.size_bytes for c in ints) / 1e6)
    r2 = quantize_tflite(tiny_model, small, calib, ev, tmp_path / "b.tflite", options=opts)
    assert r2.full_integer and r2.int8_size_bytes <= small.ota_budget_mb * 1e6


@needs_converter
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_full_integer_search_also_judges_the_grid_fine_tuned_model(tmp_path):
    """With ``finetune_steps`` the carried-over QDQ model is fine-tuned on its own INT8 grid (real
    PyTorch, edgepack.quantize.qat_grid) and carried over as one more candidate: same graph and
    size (a learned grid is a scale of its own), full integer, judged in LiteRT; the distillation does not lose signal on held-out
    samples of the same distribution."""
    pytest.importorskip("torch")
    from edgepack.targets import load_target
    from edgepack.tflite.pipeline import TfliteOptions, quantize_tflite

    model, calib, ev = _flatten_case(tmp_path, seed=5, n=192, n_calib=64)
    opts = TfliteOptions(max_drop=100.0, calibrations=("minmax",), latency_threads=(1,), latency_rounds=1,
                         golden_samples=2, full_integer=True, finetune_steps=30)
    r = quantize_tflite(model, load_target("rpi4-2gb"), calib, ev, tmp_path / "m.tflite", options=opts)
    by = {c.name: c for c in r.candidates}
    plain = by["edgepack ONNX search, carried over"]
    tuned = by["edgepack ONNX search, carried over, fine-tuned on its grid (30 steps)"]
    assert abs(tuned.size_bytes - plain.size_bytes) <= 0.02 * plain.size_bytes and tuned.float_ops == []
    assert tuned.output_sqnr_db >= plain.output_sqnr_db - 0.5, (tuned, plain)
    assert r.full_integer and not any("carried over from the ONNX model except" in w for w in r.warnings)


def test_finetune_of_a_float_tflite_is_refused_before_any_work(tmp_path, float_tfl):
    """Fine-tuning needs the ONNX search's QDQ model and a step count: a float .tflite source or
    negative steps say so at once."""
    from edgepack.data import load_dataset
    from edgepack.errors import DataError, ModelError
    from edgepack.targets import load_target
    from edgepack.tflite.pipeline import TfliteOptions, quantize_tflite

    np.savez(tmp_path / "c.npz", inputs=np.zeros((2, 1, 8, 8), np.float32))
    d = load_dataset(tmp_path / "c.npz")
    with pytest.raises(ModelError, match="give the FP32 .onnx"):
        quantize_tflite(float_tfl, load_target("rpi4-2gb"), d, d, tmp_path / "m.tflite",
                        options=TfliteOptions(finetune_steps=10))
    with pytest.raises(DataError, match="steps >= 0"):
        quantize_tflite(float_tfl, load_target("rpi4-2gb"), d, d, tmp_path / "m.tflite",
                        options=TfliteOptions(finetune_steps=-1))
    assert not (tmp_path / "m.tflite").exists()
