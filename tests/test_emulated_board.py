"""The emulated Raspberry Pi 4 (scripts/arm-board.sh): the real device agent zipapp on Debian's
arm64 Python under qemu-user, ONNX Runtime's aarch64 kernels.

* its top-1 for an INT8 Fashion CNN is the host's exact integer arithmetic (QDQ unfused), and
  not this host's AVX2 kernels where those saturate (u8 x s8 pairs summed in int16);
* as a board of the embedded default fleet: bootstrap, push (full, then delta), trial in a child
  process, status, bench, eval, check, rollback; it reports aarch64 and an emulator clock, so its
  latency budget is skipped and its timings never reach the store's figures.

A missing emulator fails with the command that builds it (EDGEPACK_ARM_BOARD=0 skips, as set-up does).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgepack.targets import load_target

from test_fleet_ssh import cli

HELD_OUT = slice(0, 200)  # held-out Fashion-MNIST test images (never seen in training or calibration)
MAX_MISMATCH = 1  # images on which the board may differ from exact arithmetic (ties in the logits)


@pytest.fixture(scope="module")
def arm_board():
    from edgepack.fleet.emulated import emulator_kind
    k = emulator_kind("emulated-aarch64")
    if os.environ.get("EDGEPACK_ARM_BOARD") == "0":
        pytest.skip("EDGEPACK_ARM_BOARD=0: set-up built no emulated aarch64 board")
    if not k.available():
        pytest.fail(k.missing())
    return k


def _host_has_vnni() -> bool:
    flags = Path("/proc/cpuinfo").read_text().split("\nflags", 1)[-1].split("\n", 1)[0].split()
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


@pytest.fixture(scope="module")
def fashion_int8(tmp_path_factory, assets):
    """ORT's per-channel static QDQ quantization (U8 activations, S8 weights) of the Fashion CNN."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    cal = np.load(assets("fashion-mnist/calib-x.npz"))["inputs"][:100]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": cal[i:i + 1]} for i in range(len(cal))])

        def get_next(self):
            return next(self.it, None)

    out = tmp_path_factory.mktemp("fashion") / "fashion-cnn-int8.onnx"
    quantize_static(str(assets("models/fashion-cnn.onnx")), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def test_board_top1_is_exact_arithmetic_not_avx2(arm_board, fashion_int8, assets, tmp_path):
    from edgepack.quantize.evaluate import session
    from edgepack.quantize.numerics import board_session
    from edgepack.fleet.confirm import evaluate_on_board
    test = np.load(assets("fashion-mnist/test-x.npz"))
    x = test["inputs"][HELD_OUT]
    # the declared numerics of rpi4-2gb, as the quantizer judges them (fused kernels, exact sums)
    exact = board_session(fashion_int8, load_target("rpi4-2gb").int8_arithmetic).run(None, {"input": x})[0].argmax(1)
    host = session(fashion_int8).run(None, {"input": x})[0].argmax(1)  # this host's fused int8 kernels
    os.environ["EDGEPACK_FLEET_HOME"] = str(tmp_path / "home")
    try:
        board = evaluate_on_board("rpi4-emu", fashion_int8, x)
    finally:
        os.environ.pop("EDGEPACK_FLEET_HOME")
    assert board.shape == exact.shape
    mismatch = np.nonzero(board != exact)[0]
    assert len(mismatch) <= MAX_MISMATCH, f"board differs from exact arithmetic on images {mismatch.tolist()}"
    saturated = np.nonzero(host != exact)[0]
    print(f"\n{len(x)} held-out images: board == exact on {int((board == exact).sum())}, "
          f"board == host kernels on {int((board == host).sum())}, host kernels != exact on {len(saturated)}")
    if _host_has_vnni():
        pytest.skip("this host has VNNI: its int8 kernels do not saturate, so there is no AVX2 difference to show")
    assert len(saturated) >= 3, "expected this AVX2 host's u8s8 kernels to saturate on some images"
    assert (board[saturated] == exact[saturated]).mean() >= 0.9  # the board follows exact arithmetic there
    assert (board != host).sum() >= len(saturated) - MAX_MISMATCH


def test_fleet_file_kind_and_default_fleet(arm_board, tmp_path, monkeypatch):
    from edgepack.fleet import Fleet, InventoryError, load_fleet
    (tmp_path / "f.toml").write_text('[[boards]]\nname = "pi"\nkind = "emulated-aarch64"\n')
    b = load_fleet(tmp_path / "f.toml").board("pi")
    assert (b.transport, b.kind, b.target) == ("local", "emulated-aarch64", "rpi4-2gb")
    assert b.agent_argv() == [str(arm_board.python()), str(tmp_path / ".edgepack/boards/pi/edgepack-agent.pyz")]
    assert b.state == str(tmp_path / ".edgepack/boards/pi/state")
    for row, msg in (('kind = "emulated-riscv"', "unknown board kind"),
                     ('kind = "emulated-aarch64"\ntransport = "ssh"\nhost = "h"', "runs on this machine")):
        (tmp_path / "bad.toml").write_text(f'[[boards]]\nname = "x"\n{row}\n')
        with pytest.raises(InventoryError, match=msg):
            load_fleet(tmp_path / "bad.toml")
    monkeypatch.setenv("EDGEPACK_EMULATED_BOARD", "1")
    assert [x.name for x in Fleet.default(tmp_path).boards] == ["local", "rpi4-emu"]
    monkeypatch.setenv("EDGEPACK_EMULATED_BOARD", "0")
    assert [x.name for x in Fleet.default(tmp_path).boards] == ["local"]


@pytest.mark.slow
def test_default_fleet_with_emulated_board(arm_board, tmp_path):
    """The main job's fleet: bootstrap, push full and delta, check, rollback, on local + rpi4-emu."""
    from agent_helpers import bundle, golden_for, make_onnx, make_pki
    from edgepack.ota.delta import make_delta_bundle
    from edgepack.fleet import Store
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "root.json").write_text(json.dumps(pki.root_doc))
    m1, m2 = make_onnx(tmp_path / "m1.onnx", seed=1), make_onnx(tmp_path / "m2.onnx", seed=1, drift=0.01)
    (tmp_path / "r2").mkdir()
    r1 = bundle(pki, tmp_path / "r1.bundle", m1, release=1, golden=golden_for(m1, tmp_path / "g1.npz"))
    r2 = bundle(pki, tmp_path / "r2" / "r2.bundle", m2, release=2, golden=golden_for(m2, tmp_path / "g2.npz"))
    make_delta_bundle(r1, r2, tmp_path / "r2" / "r1-r2.bundle", trust=pki.board_trust(True), signer=pki.release[0])
    home = tmp_path / "home"
    env = {"EDGEPACK_FLEET_HOME": str(home), "EDGEPACK_EMULATED_BOARD": "1"}
    r = cli("fleet", "bootstrap", "--trust-root", str(tmp_path / "root.json"), "--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    boot = {b["board"]: b for b in json.loads(r.stdout)}
    assert boot["rpi4-emu"]["copied_agent"] and boot["rpi4-emu"]["python"].startswith("3.11")

    from edgepack.fleet import Fleet, open_transport
    os.environ["EDGEPACK_EMULATED_BOARD"] = "1"
    try:
        fleet = Fleet.default(home)
    finally:
        os.environ["EDGEPACK_EMULATED_BOARD"] = "0"
    emu = fleet.board("rpi4-emu")
    t = open_transport(emu, fleet)
    v = t.agent("version").json()
    assert (v["machine"], v["latency_source"], v["runtime_versions"]["onnxruntime"]) == ("aarch64", "emulator", "1.22.1")
    # a latency budget no emulated timing could meet: skipped there, not failed
    assert t.agent("init", "--target", "rpi4-2gb", "--trust-root", str(home / "boards/rpi4-emu/incoming/root.json"),
                   "--latency-budget-ms", "0.0001").rc == 0

    for rel, kind in ((r1, "full"), (r2, "delta")):
        r = cli("push", str(rel), "--json", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        b = {x["board"]: x for x in json.loads(r.stdout)["boards"]}
        assert b["rpi4-emu"]["result"] == "committed", b["rpi4-emu"]
        assert b["rpi4-emu"]["kind"] == kind and b["rpi4-emu"]["p90_ms"] is None  # no emulated timing judged
        assert b["local"]["result"] == "committed"
    with Store(home / "fleet.db") as st:
        inst = st.latest("rpi4-emu", "install")
        assert inst is not None and inst.p90_ms is None  # the store holds no emulated timing
        trial = inst.data["trial"]
        assert trial["passed"] and trial["latency_source"] == "emulator" and trial["latency_budget_skipped"] == 0.0001
        assert trial["latency"]["p90_ms"] > 0.0001  # it would have failed the budget on its emulated clock
    st_emu = t.agent("status").json()
    assert st_emu["active"]["release"] == 2 and st_emu["previous"]["release"] == 1
    bench = t.agent("bench", "--runs", "3", "--warmup", "1").json()
    assert bench["ok"] and bench["latency_source"] == "emulator"
    ev = t.agent("eval", "--per-sample").json()
    assert ev["ok"] and ev["comparison"]["top1_agreement"] == 1.0 and len(ev["top1"]) == 8

    r = cli("fleet", "check", "--runs", "3", "--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    chk = {x["board"]: x for x in json.loads(r.stdout)["boards"]}
    assert chk["rpi4-emu"]["release"] == 2 and chk["rpi4-emu"]["p90_ms"] is None and not chk["rpi4-emu"]["flags"]

    rb = t.agent("rollback", "--reason", "test")
    assert rb.rc == 0 and rb.json()["active"]["release"] == 1


def test_quantize_confirm_on_emulated_board(arm_board, assets, tmp_path):
    """`quantize --confirm-on rpi4-emu`: the board's own figure beside the host's prediction
    (computed in the target's declared exact arithmetic) agrees within the stated samples."""
    t = np.load(assets("fashion-mnist/test-x.npz"))
    np.savez(tmp_path / "eval.npz", inputs=t["inputs"][HELD_OUT], labels=t["labels"][HELD_OUT])
    r = cli("quantize", str(assets("models/fashion-cnn.onnx")), "--target", "rpi4-2gb",
            "--calib", str(assets("fashion-mnist/calib-x.npz")), "--calib-size", "64",
            "--search", str(assets("fashion-mnist/search-x.npz")), "--eval", str(tmp_path / "eval.npz"),
            "--max-evals", "3", "--threads", "1", "--rounding", "nearest",
            "--confirm-on", "rpi4-emu", "--max-mismatch", "2", "-o", str(tmp_path / "q.onnx"), "--json")
    assert r.returncode in (0, 4), r.stderr[-2000:]
    rep = json.loads(r.stdout)
    bc = rep["board_confirmation"]
    assert bc["board"] == "rpi4-emu" and bc["samples"] == rep["holdout_samples"]
    assert bc["mismatch_samples"] <= 2
    assert abs(bc["board_agreement"] - rep["agreement"]) * bc["samples"] / 100 <= 2 + 1e-9
