import numpy as np
import pytest
from PIL import Image

from edgepack.quantize.calibrate import BINS, Calibration, TensorStats, collect
from edgepack.data import ImagePreprocess, load_dataset, load_hook
from edgepack.errors import DataError
from edgepack.quantize.evaluate import compare, mcnemar_exact


def test_preprocess_spec_roundtrip_and_values(tmp_path):
    p = ImagePreprocess.parse("size=4,mean=127,std=128,layout=nchw,color=rgb")
    assert ImagePreprocess.parse(p.spec()) == p
    img = np.full((8, 8, 3), 255, np.uint8)
    img[..., 1] = 127
    Image.fromarray(img).save(tmp_path / "a.png")
    x = p(tmp_path / "a.png")
    assert x.shape == (3, 4, 4) and x.dtype == np.float32
    assert np.allclose(x[0], 1.0) and np.allclose(x[1], 0.0)


@pytest.mark.parametrize("spec", ["size", "size=abc", "layout=chw", "std=0", "colour=rgb", "mean=1/2"])
def test_bad_preprocess_specs(spec):
    with pytest.raises(DataError):
        ImagePreprocess.parse(spec)


def test_image_folder_labels_from_subfolders_and_labels_file(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "tree" / cls / f"{i}.png")
    pp = ImagePreprocess.parse("size=4")
    ds = load_dataset(tmp_path / "tree", pp)
    assert len(ds) == 4 and list(ds.labels) == [0, 0, 1, 1]
    flat = tmp_path / "flat"
    flat.mkdir()
    for n in ("x.png", "y.png"):
        Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(flat / n)
    (flat / "labels.csv").write_text("file,label\ny.png,7\nx.png,3\n")
    assert list(load_dataset(flat, pp).labels) == [3, 7]
    (flat / "labels.csv").write_text("file,label\nx.png,3\n")
    with pytest.raises(DataError, match="no label for 1 image"):
        load_dataset(flat, pp)


def test_image_folder_needs_declared_preprocessing(tmp_path):
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match="no preprocessing is declared"):
        load_dataset(tmp_path, None)


def test_arrays_and_their_errors(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 2), np.float32), y=np.arange(5))
    ds = load_dataset(tmp_path / "d.npz")
    assert len(ds) == 5 and list(ds.labels) == [0, 1, 2, 3, 4]
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 2)), y=np.arange(4))
    with pytest.raises(DataError, match="4 labels for 5 samples"):
        load_dataset(tmp_path / "bad.npz")
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), np.float32))
    with pytest.raises(DataError, match="contains no samples"):
        load_dataset(tmp_path / "empty.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="not a readable numpy file"):
        load_dataset(tmp_path / "junk.npy")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(tmp_path / "emptydir", ImagePreprocess())


def test_preprocess_hook(tmp_path):
    (tmp_path / "hook.py").write_text("import numpy as np\ndef f(p):\n    return np.ones((1, 2, 2), np.float32)\n")
    fn = load_hook(f"{tmp_path / 'hook.py'}:f")
    assert fn(tmp_path).shape == (1, 2, 2)
    with pytest.raises(DataError):
        load_hook(f"{tmp_path / 'hook.py'}:missing")


def _stats(values: np.ndarray) -> TensorStats:
    s = TensorStats(float(values.min()), float(values.max()))
    a = s.absmax
    b = np.clip(((values + a) * (BINS / (2 * a))).astype(np.int64), 0, BINS - 1)
    s.hist = np.bincount(b, minlength=BINS)
    return s


def test_range_methods_on_a_heavy_tailed_distribution():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0, 1, 200_000), [60.0, -55.0]])  # two outliers
    cal = Calibration({"t": _stats(v), "relu6": _stats(np.clip(v, 0, 6))}, samples=1, bounded=frozenset({"relu6"}))
    lo, hi = cal.ranges("minmax")["t"]
    assert (lo, hi) == (pytest.approx(-55.0), pytest.approx(60.0))
    plo, phi = cal.ranges("percentile")["t"]
    assert 3.0 < phi < 6.0 and -6.0 < plo < -3.0  # the outliers are cut, the bulk kept
    elo, ehi = cal.ranges("entropy")["t"]
    assert 2.0 < ehi < 20.0 and elo < 0
    # a saturating op's output keeps its full range under every method
    for m in ("minmax", "percentile", "entropy"):
        assert cal.ranges(m)["relu6"][1] == pytest.approx(6.0)


def test_collect_streams_over_a_real_model(tiny_model, tiny_data):
    import onnx

    ds = load_dataset(tiny_data[0])
    cal = collect(onnx.load(str(tiny_model)), ds, "x", batch_size=5)
    assert cal.samples == 32
    assert {"x", "c1", "r1", "c2", "logits"} <= set(cal.stats)
    assert cal.stats["r1"].lo >= 0 and sum(cal.stats["c1"].hist) == 32 * 8 * 8 * 8
    with pytest.raises(DataError, match="empty"):
        collect(onnx.load(str(tiny_model)), ds.subset(np.arange(0)), "x")


def test_mcnemar_and_compare():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 10) < 0.01
    assert mcnemar_exact(5, 5) == 1.0
    ref = np.eye(4)[[0, 1, 2, 3]]
    got = np.eye(4)[[0, 1, 2, 0]]
    c = compare(ref, got, np.array([0, 1, 2, 3]))
    assert c.agreement == 75.0 and c.fp32_top1 == 100.0 and c.int8_top1 == 75.0 and c.drop == 25.0


def test_infinite_values_saturate_below_every_real_value():
    """An attention mask's -inf must not poison the range: it saturates one range width below."""
    s = _stats(np.array([-2.0, 3.0, 1.0]))
    s.neg_inf = True
    cal = Calibration({"scores": s}, samples=1)
    lo, hi = cal.ranges("minmax")["scores"]
    assert hi == pytest.approx(3.0) and lo == pytest.approx(-2.0 - 5.0)
    assert np.isfinite(cal.ranges("entropy")["scores"]).all()
    mask = _stats(np.array([0.0, 0.0]))
    mask.neg_inf = True
    lo, hi = Calibration({"mask": mask}, samples=1).ranges("minmax")["mask"]
    assert hi == 0.0 and lo <= -1e4  # a pure mask keeps "very negative", never rounds to ~0


def test_integer_inputs_of_another_width_and_mixed_samples_are_refused(tmp_path):
    """An int64 token-id input fed int32 arrays, and a data set whose samples change dtype, each
    get a one-line DataError before any work (ONNX Runtime would fail deep inside calibration)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgepack.data import Dataset
    from edgepack.errors import DataError
    from edgepack.modelinfo import check_same_dtypes, check_samples, load_model

    emb = numpy_helper.from_array(np.random.default_rng(0).normal(0, 1, (16, 4)).astype(np.float32), "emb")
    g = helper.make_graph([helper.make_node("Gather", ["emb", "ids"], ["y"], name="g")], "ids",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])], [emb])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "ids.onnx"))
    info = load_model(tmp_path / "ids.onnx")
    ids = np.array([[1, 2, 3]] * 4)
    assert check_samples(info, Dataset("ok", lambda i: ids[i].astype(np.int64), 4, in_memory=True), "calibration") \
        == {"": "int64"}
    with pytest.raises(DataError, match="dtype int32 but the model input takes int64"):
        check_samples(info, Dataset("d", lambda i: ids[i].astype(np.int32), 4), "calibration")
    from conftest import small_cnn

    fi = load_model(small_cnn(tmp_path / "f.onnx"))
    x = np.zeros((1, 8, 8), np.float32)
    mixed = Dataset("m", lambda i: x if i < 3 else x.astype(np.float64), 5)
    with pytest.raises(DataError, match="sample 3 has dtype float64 but sample 0 has float32"):
        check_samples(fi, mixed, "evaluation")
    with pytest.raises(DataError, match="search data has dtype float16"):
        check_same_dtypes({"calibration": {"": "float32"}, "search": {"": "float16"}})
