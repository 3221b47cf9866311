"""actsplit.py: a ReLU6 output as k clipped pieces, the same float function (real EfficientNet-Lite0)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgepack.data import load_dataset
from edgepack.errors import ModelError
from edgepack.quantize.actsplit import split_activations, splittable
from edgepack.quantize.graph import attribute as graph_attr
from edgepack.quantize.workflows import resolve_preprocessing
from edgepack.tflite.from_onnx import fold_for_tflite


@pytest.fixture(scope="module")
def effnet(assets, tmp_path_factory):
    src = assets("models/efficientnet-lite0.onnx")
    folded = fold_for_tflite(src, tmp_path_factory.mktemp("split") / "folded.onnx")  # Pads folded into Convs
    data = load_dataset(assets("images/natural-eval"), resolve_preprocessing(src), limit=4)
    x = np.concatenate([np.asarray(data.loader(i), np.float32).reshape(1, 3, 224, 224) for i in range(4)])
    return onnx.load(str(folded)), x


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(len(x))])


def test_split_keeps_the_float_function_and_repeats_the_filters(effnet):
    """The stem's ReLU6 output in 2 and 4 pieces: same logits on real photos, the same ReLU6 (each
    piece written k times larger), the stem k times wider, its depthwise reader one plain conv with
    a block-diagonal filter (XNNPACK runs no int8 grouped conv), every other node untouched."""
    m, x = effnet
    names = splittable(m)
    assert "/_swish/Clip_output_0" in names and len(names) >= 16       # stem + the expand and depthwise ReLU6s
    ref = _run(m, x)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    for k in (2, 4):
        s, rep = split_activations(m, ["/_swish/Clip_output_0"], pieces=k)
        got = _run(s, x)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
        assert rep.tensors == ["/_swish/Clip_output_0"] and rep.extra_weights > 0
        si = {i.name: onnx.numpy_helper.to_array(i) for i in s.graph.initializer}
        stem = next(n for n in s.graph.node if n.op_type == "Conv")
        assert si[stem.input[1]].shape[0] == k * 32
        clip = next(n for n in s.graph.node if n.output[0] == "/_swish/Clip_output_0")
        assert float(si[clip.input[2]]) == 6.0
        dw = next(n for n in s.graph.node if n.input[0] == "/_swish/Clip_output_0")
        wd = si[dw.input[1]]                   # the depthwise reader: one dense, block-diagonal conv
        assert wd.shape == (32, 32 * k, 3, 3) and graph_attr(dw, "group", 1) == 1
        mask = np.kron(np.eye(32), np.ones((1, k)))[:, :, None, None] > 0
        assert not wd[~np.broadcast_to(mask, wd.shape)].any()
        untouched = [n for n in m.graph.node if n.name not in (stem.name, clip.name, dw.name)]
        assert all(np.array_equal(inits[i], si[i]) for n in untouched for i in n.input if i in inits)


def test_a_tensor_that_cannot_be_split_is_named(effnet):
    m, _ = effnet
    add = next(n for n in m.graph.node if n.op_type == "Add")
    with pytest.raises(ModelError, match="cannot be split"):
        split_activations(m, [add.output[0]])
    with pytest.raises(ModelError, match="at least 2"):
        split_activations(m, ["/_swish/Clip_output_0"], pieces=1)
