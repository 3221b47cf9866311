"""Board-faithful numerics (edgepack.quantize.numerics): the target's declared INT8 arithmetic decides how
a model is judged on this host; 7-bit weights cannot saturate u8 x s8 pair sums; bad data is
refused before any work starts."""
from __future__ import annotations

import numpy as np
import pytest

from edgepack.errors import DataError, TargetError
from edgepack.quantize.numerics import NumericsUnavailable, board_session, host_int8, host_session, kernel_arithmetic
from edgepack.targets import list_targets, load_target, parse_target
from edgepack.targets.arithmetic import ARITHMETIC


def _int8(assets, tmp_path, reduce_range: bool):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    cal = np.load(assets("fashion-mnist/calib-x.npz"))["inputs"][:64]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(cal[i:i + 1] for i in range(len(cal)))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x}

    out = tmp_path / f"fashion-int8-{'r' if reduce_range else 'f'}.onnx"
    quantize_static(str(assets("models/fashion-cnn.onnx")), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=reduce_range)
    return out


def test_targets_declare_known_arithmetic():
    for name in list_targets():
        t = load_target(name)
        assert t.int8_arithmetic in ARITHMETIC, name
    assert load_target("rpi4-2gb").int8_arithmetic == "exact"
    assert load_target("x86-avx2").int8_arithmetic == "saturating-u8s8"
    assert load_target("x86-avx2").weight_bits == 7 and load_target("rpi4-2gb").weight_bits == 8
    d = {"name": "t", "arch": "x86_64", "ram_mb": 1, "storage_mb": 1, "ota_budget_mb": 1.0,
         "int8_arithmetic": "fuzzy", "compute": [{"name": "c", "kind": "cpu", "dtypes": ["int8", "fp32"],
                                                  "runtimes": ["onnxruntime:CPUExecutionProvider"]}],
         "budgets": {"max_top1_drop": 1.0, "latency_ms": 1.0, "model_ram_mb": 1}}
    with pytest.raises(TargetError, match="int8_arithmetic"):
        parse_target(d)


def test_host_int8_is_read_from_the_cpu():
    h = host_int8()
    assert h.machine and h.arithmetic in ARITHMETIC
    flags = open("/proc/cpuinfo").read()
    if h.machine == "x86_64":
        assert ("avx2" in h.instructions) == (" avx2" in flags)
        assert (h.declared == "exact") == (" avx512_vnni" in flags or " avx_vnni" in flags)
    # the arithmetic is measured on ONNX Runtime's own kernels, and on a real CPU the flags agree
    assert h.measured == kernel_arithmetic() and h.arithmetic == h.measured == h.declared
    assert kernel_arithmetic(precision_mode=True) == "exact"     # what numerics.exact_session relies on


def test_seven_bit_weights_compute_the_same_on_this_hosts_kernels(assets, tmp_path):
    """The declared numerics of x86-avx2 (7-bit weights, no saturation) match this host's fused
    kernels: the host-kernel figure and the exact figure agree."""
    m7 = _int8(assets, tmp_path, reduce_range=True)
    x = np.load(assets("fashion-mnist/test-x.npz"))["inputs"][:400]
    exact = board_session(m7, "saturating-u8s8", weight_bits=7).run(None, {"input": x})[0]
    host = host_session(m7).run(None, {"input": x})[0]
    agree = (exact.argmax(1) == host.argmax(1)).mean()
    assert agree >= 0.99, agree


def test_saturating_target_with_8bit_weights(assets, tmp_path):
    """Full 8-bit weights on a saturating target: judged by this host's kernels only where they are
    the target's (AVX2 without VNNI); elsewhere refused rather than guessed."""
    m8 = _int8(assets, tmp_path, reduce_range=False)
    x = np.load(assets("fashion-mnist/test-x.npz"))["inputs"][:400]
    if host_int8().arithmetic != "saturating-u8s8":
        with pytest.raises(NumericsUnavailable):
            board_session(m8, "saturating-u8s8", weight_bits=8)
        pytest.skip(f"host computes exactly ({host_int8().label}): saturating kernels not present")
    sat = board_session(m8, "saturating-u8s8", weight_bits=8).run(None, {"input": x})[0]
    host = host_session(m8).run(None, {"input": x})[0]
    np.testing.assert_array_equal(sat, host)
    exact = board_session(m8, "exact").run(None, {"input": x})[0]
    # saturation changes decisions: the exact board and this host disagree on some samples
    assert (exact.argmax(1) != host.argmax(1)).sum() > 0


@pytest.mark.parametrize("bad", ["nan", "inf", "int"])
def test_bad_data_refused_before_work(assets, tmp_path, bad):
    from edgepack.data import load_dataset
    from edgepack.quantize.pipeline import quantize

    x = np.load(assets("fashion-mnist/calib-x.npz"))["inputs"][:32].copy()
    if bad == "int":
        x = (x * 100).astype(np.int32)
    else:
        x[5, 0, 3, 3] = np.nan if bad == "nan" else np.inf
    p = tmp_path / "d.npz"
    np.savez(p, inputs=x)
    ds = load_dataset(p)
    out = tmp_path / "o.onnx"
    with pytest.raises(DataError, match="NaN or Inf|integer dtype"):
        quantize(assets("models/fashion-cnn.onnx"), load_target("rpi4-2gb"), ds, ds, out)
    assert not out.exists()
