"""Issue 11, the main job on any x86 build host: the quantize step run on a host whose INT8 kernels
saturate u8 x s8 pair sums (x86 AVX2 without VNNI) reports the board's figure, computed in exact
arithmetic, never this host's.

Where this host saturates, the quantize step runs here. Elsewhere (a VNNI host) it runs on an
emulated AVX2 CPU: the same Python and ONNX Runtime under ``qemu-x86_64-static -cpu Haswell``,
whose kernels really saturate (numerics.kernel_arithmetic measures it there). The figure is then
recomputed natively and must match; the emulated host's own kernels must disagree with it."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepack.data import load_dataset
from edgepack.quantize.evaluate import compare, predict, session
from edgepack.quantize.numerics import exact_session, host_int8, unfused_session

ROOT = Path(__file__).resolve().parents[1]
QEMU = "/usr/bin/qemu-x86_64-static"

CHILD = """
import json, sys
from pathlib import Path
import numpy as np
from edgepack.data import load_dataset
from edgepack.quantize.evaluate import predict
from edgepack.quantize.numerics import host_session, kernel_arithmetic
from edgepack.quantize.pipeline import QuantizeOptions, quantize
from edgepack.targets import load_target
d = Path(sys.argv[1])
r = quantize(sys.argv[2], load_target("rpi4-2gb"), load_dataset(d / "calib.npz"), load_dataset(d / "eval.npz"),
             d / "q.onnx", search=load_dataset(d / "search.npz"),
             options=QuantizeOptions(max_drop=100.0, weight_rounding="nearest", latency_threads=(1,),
                                     methods=("minmax",), plain_baselines=False))
np.save(d / "host.npy", predict(host_session(d / "q.onnx"), load_dataset(d / "eval.npz")))
json.dump({"kernels": kernel_arithmetic(), "agreement": r.agreement, "unfused": r.unfused_agreement,
           "host_kernel_agreement": r.host_kernel_agreement, "host_int8": r.host_int8, "numerics": r.numerics,
           "warnings": r.warnings}, open(d / "report.json", "w"))
"""


@pytest.fixture(scope="module")
def saturating_python():
    """A Python whose ONNX Runtime kernels saturate: this one on an AVX2-only host, else this one
    under an emulated Haswell (AVX2, no VNNI) CPU."""
    if host_int8().arithmetic == "saturating-u8s8":
        return [sys.executable]
    if platform.machine() != "x86_64" or not Path(QEMU).exists():
        pytest.skip(f"this host computes exactly ({host_int8().label}) and {QEMU} is missing to emulate an AVX2 "
                    "CPU: `sudo apt-get install qemu-user-static` (scripts/setup.sh installs it)")
    return [QEMU, "-cpu", "Haswell", sys.executable]


def test_quantize_on_a_saturating_host_reports_exact_arithmetic(assets, tmp_path, saturating_python):
    x = np.load(assets("fashion-mnist/calib-x.npz"))["inputs"]
    np.savez(tmp_path / "calib.npz", inputs=x[:48])
    np.savez(tmp_path / "search.npz", inputs=x[48:112])
    np.savez(tmp_path / "eval.npz", inputs=np.load(assets("fashion-mnist/test-x.npz"))["inputs"][:240])
    model = assets("models/fashion-cnn.onnx")
    p = subprocess.run([*saturating_python, "-c", CHILD, str(tmp_path), str(model)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["kernels"] == "saturating-u8s8" and "saturating-u8s8" in r["host_int8"]   # measured there
    assert r["numerics"] == "exact" and any("computes INT8 unlike rpi4-2gb" in w for w in r["warnings"])
    # the figure, recomputed here, independently: the written model's fused kernels with exact sums
    ev = load_dataset(tmp_path / "eval.npz")
    out = tmp_path / "q.onnx"
    ref = predict(session(model), ev)
    exact = predict(exact_session(out), ev)
    assert abs(r["agreement"] - compare(ref, exact, None).agreement) < 5e-4     # the report rounds to 3 decimals
    assert abs(r["unfused"] - compare(ref, predict(unfused_session(out), ev), None).agreement) < 5e-4
    # that host's own kernels saturated: their decisions are not the board's
    host = np.load(tmp_path / "host.npy")
    assert abs(r["host_kernel_agreement"] - compare(ref, host, None).agreement) < 5e-4
    assert (host.argmax(1) != exact.argmax(1)).any()
    # the golden outputs a board checks itself against are exact arithmetic too
    g = np.load(out.with_suffix(".golden.npz"))
    np.testing.assert_allclose(g["outputs"], exact_session(out).run(None, {"input": g["inputs"]})[0],
                               rtol=1e-5, atol=1e-5)


def test_exact_judge_is_exact_on_an_emulated_avx2_cpu(assets, tmp_path, saturating_python):
    """numerics.exact_session computes the same numbers on a saturating CPU as on an exact one
    (precision mode: u8 x u8 kernels), bit for bit; the plain fused session there does not."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    cal = np.load(assets("fashion-mnist/calib-x.npz"))["inputs"][:32]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"input": cal[i:i + 1]} for i in range(len(cal)))

        def get_next(self):
            return next(self.it, None)

    m = tmp_path / "pc.onnx"
    quantize_static(str(assets("models/fashion-cnn.onnx")), str(m), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    x = np.load(assets("fashion-mnist/test-x.npz"))["inputs"][:200]
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np; from edgepack.quantize.numerics import exact_session; "
            "from edgepack.quantize.evaluate import session; x = np.load(sys.argv[2]); "
            "np.save(sys.argv[3], exact_session(sys.argv[1]).run(None, {'input': x})[0]); "
            "np.save(sys.argv[4], session(sys.argv[1]).run(None, {'input': x})[0])")
    p = subprocess.run([*saturating_python, "-c", code, str(m), str(tmp_path / "x.npy"), str(tmp_path / "e.npy"),
                        str(tmp_path / "f.npy")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    here = exact_session(m).run(None, {"input": x})[0]
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), here)
    assert np.abs(np.load(tmp_path / "f.npy") - here).max() > 1e-2      # the saturating kernels, for contrast
