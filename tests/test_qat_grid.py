"""qat_grid.py: fine-tuning a QDQ model on its own grids (real digits CNN, real MNIST digits)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from edgepack.data import load_dataset  # noqa: E402
from edgepack.quantize.numerics import exact_session  # noqa: E402
from edgepack.quantize.qat_grid import GridQatOptions, QdqModule, finetune_on_grid, write_back  # noqa: E402


def _qdq(src, dst, xs):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = onnx.load(str(src)).graph.input[0].name

    class R(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: x[None]} for x in xs])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), R(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"WeightSymmetric": True})
    return dst


@pytest.fixture(scope="module")
def digits(assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("qatgrid")
    calib = load_dataset(assets("digits/calib-x.npz"))
    test = load_dataset(assets("digits/test-x.npz"), limit=300)
    xs = np.stack([np.asarray(calib.loader(i), np.float32) for i in range(64)])
    fp32 = assets("models/digits-cnn.onnx")
    return fp32, _qdq(fp32, d / "q.onnx", xs), calib.subset(np.arange(64)), test, d


def _outputs(path, data):
    s = exact_session(str(path))
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: np.asarray(data.loader(i), np.float32)[None]})[0] for i in range(len(data))])


def test_interpreter_computes_what_the_qdq_model_computes(digits):
    """The torch interpretation of the QDQ graph (fake quantization on its grids) reproduces the
    QDQ model in exact arithmetic: what training optimises is what the board will run."""
    _, q, _, test, _ = digits
    mod = QdqModule(onnx.load(str(q)))
    ref = _outputs(q, test.subset(np.arange(64)))
    with torch.no_grad():
        got = np.concatenate([mod(**{mod.inputs[0]: torch.from_numpy(np.asarray(test.loader(i), np.float32)[None])})[0]
                              .numpy() for i in range(64)])
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())


def test_fine_tuning_moves_integers_and_keeps_the_grids(digits):
    """A short distillation moves some integers, lowers the loss, and write_back keeps every scale,
    zero point and node: same graph, same size class, new integers within [-127, 127]."""
    fp32, q, calib, test, d = digits
    mod, rep = finetune_on_grid(q, fp32, calib, options=GridQatOptions(steps=40, batch_size=16, lr=0.05, threads=1,
                                                                                  loss="kl", learn_ranges=False))
    assert rep.weights_changed > 0
    assert rep.loss_last < rep.loss_first
    out = write_back(mod, d / "ft.onnx")
    a, b = onnx.load(str(q)), onnx.load(str(out))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    ia = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer}
    ib = {i.name: onnx.numpy_helper.to_array(i) for i in b.graph.initializer}
    assert ia.keys() == ib.keys()
    moved = [k for k in ia if not np.array_equal(ia[k], ib[k])]
    assert moved and all(ia[k].dtype in (np.int8, np.int32) for k in moved)   # only weights and biases move
    assert all(ib[k].min() >= -127 for k in moved if ib[k].dtype == np.int8)
    # the written model is what the fine-tuned module computes
    with torch.no_grad():
        x = torch.from_numpy(np.stack([np.asarray(test.loader(i), np.float32) for i in range(32)]))
        got = mod(**{mod.inputs[0]: x})[0].numpy()
    ref = _outputs(out, test.subset(np.arange(32)))
    assert np.abs(got - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())


def test_an_untrained_module_writes_every_integer_back(digits):
    """No training, no change: write_back returns the stored integers exactly, int32 biases included
    (the parameters are moves from them, not float32 copies that would round biases beyond 2**24)."""
    _, q, _, _, d = digits
    mod = QdqModule(onnx.load(str(q)))
    out = write_back(mod, d / "same.onnx")
    a = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(q)).graph.initializer}
    b = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_learned_ranges_write_back_what_the_module_computes(digits):
    """Learning the activation grids (LSQ): only scales move when the weights are frozen, each learned
    grid gets its own scale initializer, biases on a learned input grid are re-gridded on
    ``input scale x weight scale``, and the written model computes what the module computes."""
    fp32, q, calib, test, d = digits
    o = GridQatOptions(steps=30, batch_size=16, threads=1, learn_ranges=True, weights=False, range_lr=0.02)
    mod, rep = finetune_on_grid(q, fp32, calib, options=o)
    assert rep.scales_changed > 0 and any(abs(r - 1) > 1e-3 for r in rep.scale_ratios.values())
    out = write_back(mod, d / "lsq.onnx")
    a, b = onnx.load(str(q)), onnx.load(str(out))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    ia = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer}
    ib = {i.name: onnx.numpy_helper.to_array(i) for i in b.graph.initializer}
    assert all(np.array_equal(ia[k], ib[k]) for k in ia if ia[k].dtype == np.int8)   # frozen weights
    for n in b.graph.node:                   # every bias grid is its input grid times its weight grid
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 2:
            prod = {o: x for x in b.graph.node for o in x.output}
            xs, ws, bs = (ib[prod[n.input[i]].input[1]] for i in range(3))
            assert np.allclose(bs, xs * ws, rtol=1e-6)
    with torch.no_grad():
        x = torch.from_numpy(np.stack([np.asarray(test.loader(i), np.float32) for i in range(32)]))
        got = mod(**{mod.inputs[0]: x})[0].numpy()
    ref = _outputs(out, test.subset(np.arange(32)))
    # the module keeps each bias on its old, finer grid while training; written on the new grid an
    # output may round one step the other way now and then, never more
    step = next(float(ib[n.input[1]]) for n in b.graph.node if n.output[0] == b.graph.output[0].name)
    diff = np.abs(got - ref)
    assert diff.max() <= step * 1.01 and (diff > 1e-3 * np.abs(ref).max()).mean() < 0.01
