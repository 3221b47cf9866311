"""Issue 11, the main job on any x86 build host: the quantize step run on a host whose INT8 kernels
saturate u8 x s8 pair sums (x86 AVX2 without VNNI, like this project's build machine) reports the
board's figure, computed in exact arithmetic, never this host's.

Where the host really saturates (this project's AMD EPYC), its own kernels run, and the report's
host-kernel figure is theirs. Elsewhere the saturating host is emulated where the quantizer sees
it, in its CPU detection (AVX2, no VNNI); the fused kernels there compute exactly, so the
host-kernel figure is then not checked, only the board's figure (the point of the test)."""
from __future__ import annotations

import numpy as np
import pytest

from edgepack.data import load_dataset
from edgepack.quantize import numerics, pipeline
from edgepack.quantize.evaluate import compare, predict, session
from edgepack.quantize.numerics import HostInt8, host_int8
from edgepack.quantize.pipeline import QuantizeOptions, quantize
from edgepack.targets import load_target


@pytest.fixture
def saturating_host(monkeypatch):
    """This host when it saturates; else an emulated AVX2-without-VNNI host (detection only)."""
    real = host_int8()
    if real.arithmetic == "saturating-u8s8":
        return True
    fake = HostInt8("x86_64", ("avx2",))
    assert fake.arithmetic == "saturating-u8s8"
    monkeypatch.setattr(numerics, "host_int8", lambda: fake)
    monkeypatch.setattr(pipeline, "host_int8", lambda: fake)
    return False


def test_quantize_on_a_saturating_host_reports_exact_arithmetic(assets, tmp_path, saturating_host):
    x = np.load(assets("fashion-mnist/calib-x.npz"))["inputs"]
    t = np.load(assets("fashion-mnist/test-x.npz"))["inputs"][:300]
    np.savez(tmp_path / "calib.npz", inputs=x[:64])
    np.savez(tmp_path / "search.npz", inputs=x[64:192])
    np.savez(tmp_path / "eval.npz", inputs=t)
    model, out = assets("models/fashion-cnn.onnx"), tmp_path / "q.onnx"
    target = load_target("rpi4-2gb")                     # exact int8 arithmetic, full 8-bit weights
    assert target.int8_arithmetic == "exact" and target.weight_bits == 8
    ev = load_dataset(tmp_path / "eval.npz")
    r = quantize(model, target, load_dataset(tmp_path / "calib.npz"), ev, out,
                 search=load_dataset(tmp_path / "search.npz"),
                 options=QuantizeOptions(max_drop=100.0, weight_rounding="nearest", latency_threads=(1,),
                                         methods=("minmax",)))
    # the figure, recomputed independently: the written model run unfused (exact int32 sums)
    ref = predict(session(model), ev)
    exact = compare(ref, predict(session(out, optimize=False), ev), None)
    assert r.numerics == "exact" and "saturating-u8s8" in r.host_int8
    assert abs(r.agreement - exact.agreement) < 5e-4        # the report rounds to 3 decimals
    assert any("computes INT8 unlike rpi4-2gb" in w for w in r.warnings)
    # the golden outputs a board checks itself against are exact arithmetic too
    g = np.load(out.with_suffix(".golden.npz"))
    np.testing.assert_allclose(g["outputs"], session(out, optimize=False).run(None, {"input": g["inputs"]})[0],
                               rtol=1e-5, atol=1e-5)
    if saturating_host:
        host = compare(ref, predict(session(out), ev), None)      # this host's fused kernels
        assert abs(r.host_kernel_agreement - host.agreement) < 5e-4
        # 8-bit weights saturate here: the host's figure is not the board's
        fused = predict(session(out), ev)
        assert (fused.argmax(1) != predict(session(out, optimize=False), ev).argmax(1)).any()
