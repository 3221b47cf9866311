"""The quantize search (edgepack.quantize.remedies): a registry ordered by cost, one Search owning the
evaluation budget, stopping once the budget is met, and the float-activations remedy
(edgepack.quantize.actprec) that keeps INT8 weights (no size cost). Real ONNX Runtime, real models."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgepack.data import load_dataset
from edgepack.quantize.evaluate import session
from edgepack.quantize.pipeline import QuantizeOptions, quantize
from edgepack.quantize.remedies import REGISTRY, CandidateResult, Search
from edgepack.targets import load_target


def test_registry_is_ordered_by_cost_and_complete():
    order = [r.name for r in sorted(REGISTRY.values(), key=lambda r: r.cost)]
    assert order == ["calibration", "plain", "dynamic", "smoothquant", "split-activations", "float-activations",
                     "float-layers"]
    assert all(r.description and callable(r.applies) and callable(r.apply) for r in REGISTRY.values())
    # float layers (size cost) come after everything that keeps the size
    assert REGISTRY["float-layers"].cost > max(r.cost for n, r in REGISTRY.items() if n != "float-layers")


def test_search_stops_when_the_budget_is_met(tmp_path, tiny_model, tiny_data):
    rep = quantize(tiny_model, load_target("rpi4-2gb"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
                   tmp_path / "q.onnx", options=QuantizeOptions(max_drop=100.0, weight_rounding="nearest",
                                                                latency_threads=(1,)))
    assert rep.budget_met and rep.remedies_tried == ["calibration", "plain"]
    assert not rep.float_layers and not rep.float_activations
    # 3 methods + the plain per-tensor/per-channel baselines + held-out
    assert {c.remedy for c in rep.candidates} == {"calibration", "plain"} and rep.evaluations == 6


def test_float_activations_keep_int8_weights_and_size(tmp_path, tiny_model, tiny_data):
    """An unreachable budget on a float-capable board: float activations are tried before float
    layers, each such candidate is as small as the all-INT8 one but for the float weights of the
    small convs that then compute in float (actprec.fold_float_conv_weights), and the budget is respected."""
    rep = quantize(tiny_model, load_target("rpi4-2gb"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
                   tmp_path / "q.onnx", options=QuantizeOptions(max_drop=-1.0, weight_rounding="nearest",
                                                                latency_threads=(1,), max_evals=8))
    assert rep.remedies_tried[:1] == ["calibration"] and "float-activations" in rep.remedies_tried
    assert rep.remedies_tried.index("float-activations") < rep.remedies_tried.index("float-layers")
    assert rep.evaluations <= 8 + 2          # the two plain baselines come on top of max_evals
    base = min(c.size_bytes for c in rep.candidates if c.remedy == "calibration")
    fa = [c for c in rep.candidates if c.float_activations]
    conv_weights = 8 * 1 * 9 + 8 * 8 * 9 + 2 * 8          # the tiny CNN's two convs and their biases
    assert fa and all(c.size_bytes <= base * 1.02 + 4 * conv_weights for c in fa)
    fl = [c for c in rep.candidates if c.float_layers]
    assert fl  # float layers still get an evaluation


def test_int8_only_board_gets_no_float_activations(tmp_path, tiny_model, tiny_data):
    rep = quantize(tiny_model, load_target("phone-npu-int8"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
                   tmp_path / "q.onnx", options=QuantizeOptions(max_drop=-1.0, weight_rounding="nearest",
                                                                latency_threads=(1,), max_evals=6))
    assert "float-activations" not in rep.remedies_tried and not rep.float_activations


def _relu6_cnn(path):
    """The tiny CNN with ReLU6 (Clip(0, 6)) after its first conv, as EfficientNet-Lite and MobileNet."""
    from conftest import small_cnn

    m = onnx.load(str(small_cnn(path)))
    relu = next(n for n in m.graph.node if n.name == "relu1")
    relu.op_type = "Clip"
    relu.input.extend(["six_lo", "six_hi"])
    m.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(v, np.float32), n)
                                for n, v in (("six_lo", 0.0), ("six_hi", 6.0))])
    onnx.save(m, str(path))
    return path


def test_int8_only_board_gets_split_activations(tmp_path, tiny_data):
    """On an INT8-only board a missed budget tries splitting the most sensitive ReLU6 output
    (actsplit.py) before float layers: each candidate is all INT8 and its first conv writes k
    channels per channel; the chosen one's split is in the report and the model's metadata."""
    model = _relu6_cnn(tmp_path / "relu6.onnx")
    rep = quantize(model, load_target("phone-npu-int8"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
                   tmp_path / "q.onnx", options=QuantizeOptions(max_drop=-1.0, weight_rounding="nearest",
                                                                latency_threads=(1,), max_evals=8))
    assert "split-activations" in rep.remedies_tried
    assert rep.remedies_tried.index("split-activations") < rep.remedies_tried.index("float-layers")
    split = [c for c in rep.candidates if c.remedy == "split-activations"]
    assert [c.variant for c in split] == ["split2", "split4"] and all(c.npu_eligible for c in split)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "q.onnx")).metadata_props}
    if rep.variant.startswith("split"):
        assert rep.split_activations == ["r1"] and rep.split_pieces == int(rep.variant[5:])
        assert meta["edgepack.split_activations"] == f"r1 x{rep.split_pieces}"
        w = {i.name: i for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
        assert any(list(v.dims[:1]) == [8 * rep.split_pieces] and v.data_type == onnx.TensorProto.INT8 for v in w.values())
    else:
        assert not rep.split_activations and meta["edgepack.split_activations"] == ""


def test_without_quantizers_is_exactly_float_there(tmp_path, tiny_model, tiny_data):
    """Removing an activation quantizer leaves that tensor float and the rest untouched; removing
    all of them gives the weight-only model, closer to FP32 than the full INT8 one."""
    from edgepack.quantize.actprec import activation_quantizers, rank_activations, without_quantizers

    quantize(tiny_model, load_target("rpi4-2gb"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
             tmp_path / "q.onnx", options=QuantizeOptions(weight_rounding="nearest", latency_threads=(1,),
                                                          max_drop=100.0))
    m = onnx.load(str(tmp_path / "q.onnx"))
    q = activation_quantizers(m)
    assert len(q) >= 2
    x = np.load(tiny_data[1])["inputs"][:16]
    ref = session(tiny_model).run(None, {"x": x})[0]
    err = lambda mm: float(((session(mm.SerializeToString(), optimize=False).run(None, {"x": x})[0] - ref) ** 2).sum())  # noqa: E731
    one = without_quantizers(m, [next(iter(q))])
    assert len(activation_quantizers(one)) == len(q) - 1
    assert err(without_quantizers(m, list(q))) < err(m)
    with pytest.raises(ValueError, match="not quantized activations"):
        without_quantizers(m, ["no-such-tensor"])
    ranked = rank_activations(tiny_model, tmp_path / "q.onnx", {"x": x}, limit=8)
    assert all(r.tensor in q and r.gain > 0 for r in ranked)
    assert [r.gain for r in ranked] == sorted((r.gain for r in ranked), reverse=True)


def test_fold_keeps_the_numbers_and_only_touches_float_convs(tmp_path, tiny_model, tiny_data):
    """fold_float_conv_weights: a conv that computes in float holds its dequantized weights (no
    DequantizeLinear left in front of it, the same outputs); one ONNX Runtime fuses into
    QLinearConv keeps its INT8 weights; a conv over the size limit is left alone."""
    from edgepack.quantize.actprec import activation_quantizers, fold_float_conv_weights, without_quantizers

    quantize(tiny_model, load_target("rpi4-2gb"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
             tmp_path / "q.onnx", options=QuantizeOptions(weight_rounding="nearest", latency_threads=(1,),
                                                          max_drop=100.0))
    m = onnx.load(str(tmp_path / "q.onnx"))
    n_dq = lambda mm: sum(n.op_type == "DequantizeLinear" for n in mm.graph.node)  # noqa: E731
    assert n_dq(fold_float_conv_weights(onnx.load(str(tmp_path / "q.onnx")))) == n_dq(m)   # all INT8: unchanged
    first = next(t for t in activation_quantizers(m) if any(n.op_type == "Conv" and t in n.output
                                                             for n in m.graph.node) or t == "r1")
    unfolded = without_quantizers(m, [first])
    folded = fold_float_conv_weights(without_quantizers(m, [first]))
    prod = {o: n for n in folded.graph.node for o in n.output}
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    fed_by_dq = [n.name for n in convs if n.input[1] in prod]
    assert n_dq(folded) < n_dq(unfolded) and len(fed_by_dq) < len(convs)
    x = np.load(tiny_data[1])["inputs"][:16]
    run = lambda mm: session(mm.SerializeToString(), optimize=False).run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_allclose(run(folded), run(unfolded), rtol=1e-5, atol=1e-5)
    assert n_dq(fold_float_conv_weights(without_quantizers(m, [first]), max_dense=1)) == n_dq(unfolded)


def _cand(name, drop, size, floats=(), acts=(), lat=1.0):
    return CandidateResult(name, "percentile", list(floats), drop, 100 - drop, 20.0, size_bytes=size,
                           latency_ms=lat, float_activations=list(acts))


def test_choose_never_larger_than_a_simpler_candidate_that_meets(tmp_path):
    from edgepack.quantize.pipeline import QuantizeOptions

    s = Search(info=None, target=load_target("rpi4-2gb"), opt=QuantizeOptions(), budget=1.0, calib=None,
               data=None, ref=None, work=tmp_path, pg=None, sample=None)
    s.candidates = [_cand("int8", 3.0, 5_000_000), _cand("acts", 0.8, 5_000_100, acts=["a", "b"]),
                    _cand("float", 0.2, 7_000_000, floats=["l1"]), _cand("huge", 0.0, 9_000_000, floats=["l1", "l2"])]
    assert s.choose().name == "acts"          # smallest that meets, although "float" is more accurate
    s.candidates = s.candidates[:1] + s.candidates[3:]
    assert s.choose().name == "int8"          # the only one within the budget is over the 8 MB OTA budget
    assert any("OTA budget" in w for w in s.warnings)
    slow = _cand("slow", 2.0, 5_000_100, acts=["a"], lat=3.0)
    slow.fp32_latency_ms = fast_fp32 = 2.0
    plain = _cand("plain", 3.0, 5_000_000, lat=1.0)
    plain.fp32_latency_ms = fast_fp32
    s.candidates = [plain, slow]
    # rpi4-2gb (aarch64) timed on this host: a host proxy, which never trades accuracy away
    assert not s.latency_is_the_boards and s.choose().name == "slow"
    from dataclasses import replace

    from edgepack.quantize.numerics import host_int8

    here = replace(s.target, arch=host_int8().machine, int8_arithmetic=host_int8().arithmetic)
    s.target = here                           # a board of this host's kind: its latency counts
    assert s.latency_is_the_boards and s.choose().name == "plain"   # more accurate but slower than FP32
    s.candidates = [slow]
    assert s.choose().name == "slow"          # unless nothing faster exists
    # A tiny model: every all-INT8 candidate is slower than FP32; one with float layers, 3x the
    # bytes, measures "faster" (it is nearly the FP32 model). Both meet: the simpler one wins.
    int8 = _cand("int8-slow", 0.1, 61_000, lat=0.12)
    big = _cand("3 float", 0.0, 207_000, floats=["a", "b", "c"], lat=0.05)
    int8.fp32_latency_ms = big.fp32_latency_ms = 0.06
    s.candidates = [int8, big]
    assert s.choose().name == "int8-slow"
    acts = _cand("acts-fast", 0.0, 61_000, acts=["t"], lat=0.05)
    acts.fp32_latency_ms = 0.06
    s.candidates = [int8, acts, big]
    assert s.choose().name == "acts-fast"     # same size and faster than the simpler one: allowed


def test_budget_missed_label_free_ranks_by_output_sqnr(tmp_path):
    """No candidate meets: on a label-free floor the higher output SQNR wins over a luckier
    agreement (the noisier statistic); with labels the top-1 drop decides."""
    from edgepack.data import Dataset
    from edgepack.quantize.pipeline import QuantizeOptions

    lucky, steady = _cand("lucky", 2.2, 5_000_000, acts=["a"]), _cand("steady", 4.4, 5_000_000, acts=["b"])
    lucky.output_sqnr_db, steady.output_sqnr_db = 26.8, 29.5
    unlabelled = Dataset("d", lambda i: None, 4)
    s = Search(info=None, target=load_target("rpi4-2gb"), opt=QuantizeOptions(), budget=1.0, calib=None,
               data=unlabelled, ref=None, work=tmp_path, pg=None, sample=None)
    s.candidates = [lucky, steady]
    assert not any(s.meets(c) for c in s.candidates)
    assert s.choose().name == "steady"
    s.data = Dataset("d", lambda i: None, 4, labels=np.zeros(4, np.int64))
    assert s.choose().name == "lucky"


def test_mse_range_weighs_magnitudes():
    """The MSE range trims a heavy tail (less than MinMax: the outliers' clipping error is weighed
    against the rounding error of the bulk), clips a bounded (ReLU6) tensor only where that
    pays, and keeps the bound where many values pile up at it."""
    from edgepack.quantize.calibrate import Calibration
    from test_data_calibrate import _stats

    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0, 1, 200_000), [60.0, -55.0]])
    small = np.concatenate([np.abs(rng.normal(0, 0.3, 200_000)), [6.0] * 3])
    piled = np.clip(rng.normal(3, 3, 200_000), 0, 6)
    cal = Calibration({"t": _stats(v), "small": _stats(small), "piled": _stats(piled)}, samples=1,
                      bounded=frozenset({"small", "piled"}))
    lo, hi = cal.ranges("mse")["t"]
    assert 2.0 < hi < 60.0 and -55.0 < lo < -2.0
    assert cal.ranges("mse")["small"][1] < 6.0 and cal.ranges("minmax")["small"][1] == pytest.approx(6.0)
    assert cal.ranges("mse")["piled"][1] > 5.0


def test_real_digits_cnn_never_larger_than_a_simpler_variant(tmp_path, assets, monkeypatch):
    """The digits CNN (real MNIST digits, scripts/assets.py digits): float layers are forced into
    the search (run even though all-INT8 already meets the budget), as happens when a noisy
    search split misses it. The chosen model must still be an all-INT8 one of the smallest size
    among those meeting the budget, and the plain ORT baselines must be in the table."""
    from dataclasses import replace

    from edgepack.quantize.remedies import REGISTRY as reg

    monkeypatch.setitem(reg, "float-layers", replace(reg["float-layers"], always=True))
    calib = load_dataset(assets("digits/calib-x.npz"))
    search = load_dataset(assets("digits/search-x.npz"), limit=400)
    test = load_dataset(assets("digits/test-x.npz"), limit=400)
    rep = quantize(assets("models/digits-cnn.onnx"), load_target("rpi4-2gb"), calib, test, tmp_path / "d.onnx",
                   search=search, options=QuantizeOptions(weight_rounding="nearest", latency_threads=(1,),
                                                          methods=("minmax", "percentile")))
    assert "float-layers" in rep.remedies_tried
    floats = [c for c in rep.candidates if c.float_layers]
    assert floats and all(c.size_bytes > 1.001 * min(x.size_bytes for x in rep.candidates) for c in floats)
    assert {c.name for c in rep.candidates} >= {"int8/plain per-tensor", "int8/plain per-channel"}
    meeting = [c for c in rep.candidates if c.search_drop <= rep.budget_points]
    assert any(not c.float_layers for c in meeting)
    assert not rep.float_layers and not rep.float_activations, rep.to_json()
    assert rep.int8_size_bytes <= 1.02 * min(c.size_bytes for c in meeting)
    assert rep.size_ratio >= 3.0 and rep.budget_met


def test_float_activations_end_with_the_earliest_ones_float(tmp_path, tiny_model, tiny_data):
    """After the ranked activations, the most accurate float-activation candidate is tried again
    with the earliest of its still-quantized activations float (graph order), and float layers
    keep their evaluations."""
    import onnx

    from edgepack.quantize.actprec import activation_quantizers

    rep = quantize(tiny_model, load_target("rpi4-2gb"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
                   tmp_path / "q.onnx", options=QuantizeOptions(max_drop=-1.0, weight_rounding="nearest",
                                                                latency_threads=(1,), max_evals=8))
    early = [c for c in rep.candidates if c.name.endswith("earliest")]
    assert len(early) == 1, [c.name for c in rep.candidates]
    e = early[0]
    prior = [c for c in rep.candidates if c.float_activations and c is not e]
    top = next(c for c in prior if e.name.startswith(c.name + "+"))
    added = [t for t in e.float_activations if t not in top.float_activations]
    assert set(top.float_activations) < set(e.float_activations) and added
    # graph order: what stays quantized in the float-act model starts with what was added
    int8 = tmp_path / "top-int8.onnx"
    quantize(tiny_model, load_target("rpi4-2gb"), load_dataset(tiny_data[0]), load_dataset(tiny_data[1]),
             int8, options=QuantizeOptions(max_drop=100.0, weight_rounding="nearest", latency_threads=(1,),
                                           methods=(top.method,), plain_baselines=False))
    order = [t for t in activation_quantizers(onnx.load(str(int8))) if t not in top.float_activations]
    assert order[:len(added)] == added
    assert any(c.float_layers for c in rep.candidates)
