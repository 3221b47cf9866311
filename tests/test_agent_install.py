"""The install transaction on real files: verified A/B install, health-gated commit, rollback."""
from __future__ import annotations

import datetime as dt

import pytest

from agent_helpers import TARGET, active_ok, bundle, golden_for, init_board, make_onnx, make_pki, run_agent, write_trust
from device_agent.agent_errors import (ActiveSlotCorrupt, BudgetExceeded, HealthCheckFailed, Incompatible,
                                       NoRollbackTarget)
from device_agent.errors import ExpiredError, RollbackError, SignatureError, TargetMismatch


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def rel(tmp_path_factory, pki):
    """Releases of one model: r1, r2 (fine-tuned), a wrong-output r3, an unloadable r4, r5 good."""
    d = tmp_path_factory.mktemp("rel")
    m1 = make_onnx(d / "mlp.onnx", seed=0)
    g1 = golden_for(m1, d / "g1.npz")
    out = {"m1": m1, "g1": g1, "r1": bundle(pki, d / "r1.bundle", m1, release=1, golden=g1)}
    (d / "m2").mkdir()
    m2 = make_onnx(d / "m2" / "mlp.onnx", seed=0, drift=0.01)
    g2 = golden_for(m2, d / "g2.npz")
    out["m2"], out["g2"] = m2, g2
    out["r2"] = bundle(pki, d / "r2.bundle", m2, release=2, golden=g2)
    (d / "m3").mkdir()
    wrong = make_onnx(d / "m3" / "mlp.onnx", seed=7)  # loads fine, computes something else
    out["r3_wrong"] = bundle(pki, d / "r3w.bundle", wrong, release=3, golden=g2)
    (d / "m4").mkdir()
    bad = d / "m4" / "mlp.onnx"
    bad.write_bytes(b"\x08\x08" + b"\xff" * 200)  # ONNX-looking header, not a model
    out["r4_unloadable"] = bundle(pki, d / "r4u.bundle", bad, release=4, golden=g2)
    out["r5"] = bundle(pki, d / "r5.bundle", m2, release=5, golden=g2)
    return out


def test_install_commit_then_upgrade(tmp_path, pki, rel):
    a = init_board(tmp_path / "board", pki, trial_in_process=True)
    r = a.install(rel["r1"])
    assert r.status == "committed" and r.slot == "a" and r.trial["passed"]
    assert r.trial["comparison"]["top1_agreement"] == 1.0 and r.trial["comparison"]["cosine_min"] > 0.9999
    r = a.install(rel["r2"])
    assert r.status == "committed" and r.slot == "b" and r.previous_slot == "a"
    st = a.sd.load()
    assert (st.active, st.previous, st.counter) == ("b", "a", 2)
    assert active_ok(tmp_path / "board") == (2, "b")
    assert (tmp_path / "board" / "current").resolve() == (tmp_path / "board" / "slots" / "b").resolve()
    assert [h["event"] for h in st.history].count("commit") == 2


def test_wrong_outputs_roll_back_with_reason(tmp_path, pki, rel):
    a = init_board(tmp_path / "board", pki, trial_in_process=True)
    a.install(rel["r2"])
    with pytest.raises(HealthCheckFailed, match="top-1 agreement|cosine") as ei:
        a.install(rel["r3_wrong"])
    assert ei.value.report.status == "rolled_back"
    st = a.sd.load()
    assert st.active == "a" and st.counter == 2 and st.trial is None
    assert st.history[-1]["event"] == "rollback" and "cosine" in st.history[-1]["reason"]
    assert active_ok(tmp_path / "board") == (2, "a")
    a.install(rel["r5"])  # the board is still upgradable
    assert active_ok(tmp_path / "board")[0] == 5


def test_a_failed_first_install_says_no_release_is_active(tmp_path, pki, rel):
    """A first install whose trial fails has nothing to roll back to: the message says so, not "None"."""
    a = init_board(tmp_path / "board", pki, trial_in_process=True)
    with pytest.raises(HealthCheckFailed, match="first install, so no release is active") as ei:
        a.install(rel["r3_wrong"])
    assert "None" not in str(ei.value)
    assert a.sd.load().active is None


def test_unloadable_model_rolls_back_in_child_process(tmp_path, pki, rel):
    """Default trial mode: a child process, so a model that breaks the runtime cannot kill the agent."""
    a = init_board(tmp_path / "board", pki)
    a.install(rel["r1"])
    with pytest.raises(HealthCheckFailed, match="failed to load"):
        a.install(rel["r4_unloadable"])
    assert active_ok(tmp_path / "board") == (1, "a")
    assert "onnxruntime cannot load" in a.sd.load().history[-1]["reason"]


def test_anti_rollback_counter_and_policy_refusals(tmp_path, pki, rel):
    a = init_board(tmp_path / "board", pki, trial_in_process=True)
    a.install(rel["r2"])
    before = sorted(p.name for p in (tmp_path / "board" / "slots").rglob("*"))
    for b in (rel["r1"], rel["r2"]):  # older, and the same release again
        with pytest.raises(RollbackError):
            a.install(b)
    assert sorted(p.name for p in (tmp_path / "board" / "slots").rglob("*")) == before  # nothing written
    other = init_board(tmp_path / "other", pki, target="jetson", trial_in_process=True)
    with pytest.raises(TargetMismatch):
        other.install(rel["r1"])
    stranger = make_pki(tmp_path / "stranger")
    s = init_board(tmp_path / "s", stranger, trial_in_process=True)
    with pytest.raises(SignatureError):
        s.install(rel["r1"])


def test_expired_bundle_refused(tmp_path, pki, rel, monkeypatch):
    a = init_board(tmp_path / "board", pki, trial_in_process=True)
    from ota_helpers import NOW
    later = NOW + dt.timedelta(days=500)  # past the bundle's 90 days and the key list's year
    monkeypatch.setenv("EDGEPACK_AGENT_NOW", later.strftime("%Y-%m-%dT%H:%M:%SZ"))
    with pytest.raises(ExpiredError):
        a.install(rel["r1"])
    assert a.sd.load().active is None


def test_budgets_refused_before_writing(tmp_path, pki, rel):
    a = init_board(tmp_path / "ram", pki, ram_budget_mb=10, trial_in_process=True)
    with pytest.raises(BudgetExceeded, match="RAM"):
        a.install(rel["r1"])
    a = init_board(tmp_path / "disk", pki, storage_mb=0.01, trial_in_process=True)
    with pytest.raises(BudgetExceeded, match="storage"):
        a.install(rel["r1"])
    a = init_board(tmp_path / "rt", pki, runtimes=["litert"], trial_in_process=True)
    with pytest.raises(Incompatible, match="litert|needs one of"):
        a.install(rel["r1"])
    for b in ("ram", "disk", "rt"):
        assert not any((tmp_path / b / "slots").rglob("*")), b


def test_latency_budget_gates_commit(tmp_path, pki, rel):
    a = init_board(tmp_path / "board", pki, latency_budget_ms=1e-6, trial_in_process=True)
    with pytest.raises(HealthCheckFailed, match="latency"):
        a.install(rel["r1"])
    assert a.sd.load().active is None and a.sd.load().counter == 0


def test_missing_accelerator_is_reported_not_replaced(tmp_path, pki, rel):
    a = init_board(tmp_path / "board", pki, trial_in_process=True)
    a.install(rel["r1"])
    a.sd.save_board(a.board().__class__(**{**a.board().__dict__, "accelerator": "CUDAExecutionProvider"}))
    with pytest.raises(HealthCheckFailed, match="CUDAExecutionProvider"):
        a.install(rel["r2"])
    assert active_ok(tmp_path / "board") == (1, "a")


def test_delta_install_against_active_slot(tmp_path, pki, rel):
    from edgepack.ota.delta import make_delta_bundle
    a = init_board(tmp_path / "board", pki, trial_in_process=True)
    d = make_delta_bundle(rel["r1"], rel["r2"], tmp_path / "d12.bundle", trust=pki.board_trust(), signer=pki.release[0])
    assert not d.fallback
    with pytest.raises(Incompatible, match="delta"):  # nothing installed yet
        a.install(d.path)
    a.install(rel["r1"])
    r = a.install(d.path)
    assert r.kind == "delta" and r.status == "committed"
    assert active_ok(tmp_path / "board") == (2, "b")
    assert (tmp_path / "board/slots/b/mlp.onnx").read_bytes() == rel["m2"].read_bytes()


def test_corrupted_active_slot(tmp_path, pki, rel):
    a = init_board(tmp_path / "board", pki, trial_in_process=True)
    a.install(rel["r1"])
    a.install(rel["r2"])
    m = tmp_path / "board/slots/b/mlp.onnx"
    data = bytearray(m.read_bytes())
    data[len(data) // 2] ^= 0xFF
    m.write_bytes(bytes(data))
    s = a.status(verify=True)  # heals: switches to the good previous release
    assert s["active"]["release"] == 1 and s["active"]["verified"]
    assert active_ok(tmp_path / "board") == (1, "a")
    a.install(rel["r5"])  # writes over the corrupt slot
    assert active_ok(tmp_path / "board") == (5, "b")
    # both slots corrupt: a clear error, and a full bundle still repairs the board
    for s_ in "ab":
        for p in (tmp_path / f"board/slots/{s_}").glob("*.onnx"):
            p.write_bytes(b"junk")
    with pytest.raises(ActiveSlotCorrupt):
        a.status(verify=True)


def test_rollback_command(tmp_path, pki, rel):
    a = init_board(tmp_path / "board", pki, trial_in_process=True)
    with pytest.raises(NoRollbackTarget):
        a.rollback()
    a.install(rel["r1"])
    with pytest.raises(NoRollbackTarget):
        a.rollback()
    a.install(rel["r2"])
    r = a.rollback()
    assert r["active"]["release"] == 1 and r["counter"] == 2
    assert active_ok(tmp_path / "board") == (1, "a")
    with pytest.raises(RollbackError):  # the counter does not move back
        a.install(rel["r2"])
    a.install(rel["r5"])
    assert active_ok(tmp_path / "board") == (5, "b")  # wrote over the slot we rolled back from


def test_cli_end_to_end_json_and_exit_codes(tmp_path, pki, rel):
    root, rk = write_trust(pki)
    st = tmp_path / "board"
    code, out, err = run_agent(st, "status")
    assert code == 3 and out["error"]["type"] == "NotInitialized"
    code, out, err = run_agent(st, "init", "--target", TARGET, "--trust-root", str(root), "--threads", "1")
    assert code == 0 and out["ok"], err
    code, out, err = run_agent(None, "install", str(rel["r1"]), env={"EDGEPACK_AGENT_STATE": str(st)})
    assert code == 0 and out["status"] == "committed", err
    assert "committed" in err
    code, out, _ = run_agent(st, "install", str(rel["r3_wrong"]))
    assert code == 7 and out["error"]["type"] == "HealthCheckFailed" and out["report"]["status"] == "rolled_back"
    code, out, _ = run_agent(st, "install", str(rel["r1"]))
    assert code == 5 and out["error"]["type"] == "RollbackError"
    code, out, _ = run_agent(st, "install", str(tmp_path / "nope.bundle"))
    assert code == 5 and out["error"]["type"] == "NotABundle"
    code, out, _ = run_agent(st, "rollback")
    assert code == 9
    code, out, _ = run_agent(st, "status", "--verify")
    assert code == 0 and out["active"]["release"] == 1 and out["active"]["verified"]
    assert [h["event"] for h in out["history"]][-2:] == ["switch", "rollback"]
    code, out, err = run_agent(st, "eval")
    assert code == 0, err
    c = out["comparison"]
    assert c["accuracy"] == 1.0 and c["top1_agreement"] == 1.0 and c["max_abs_error"] < 1e-4
    code, out, err = run_agent(st, "bench", "--runs", "30", "--warmup", "3")
    assert code == 0, err
    assert out["provider"] == "CPUExecutionProvider" and out["threads"] == 1 and out["latency"]["runs"] == 30
    assert out["latency"]["p50_ms"] <= out["latency"]["p90_ms"] <= out["latency"]["p99_ms"]
    code, out, _ = run_agent(st, "bench", "--accelerator", "CUDAExecutionProvider", "--runs", "2")
    assert code == 8 and out["error"]["type"] == "AcceleratorUnavailable"


def test_lock_keeps_a_concurrent_status_from_rolling_back_a_trial(tmp_path, pki, rel):
    """While one process holds the board (install/trial), another command waits, then reports Busy."""
    import fcntl
    import os
    a = init_board(tmp_path / "board", pki, trial_in_process=True)
    a.install(rel["r1"])
    st = a.sd.load()
    st.trial = {"slot": "a", "release": 1, "previous": None, "started": "now"}  # as seen mid-trial
    fd = os.open(tmp_path / "board" / "lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        a.sd.save(st)
        code, out, _ = run_agent(tmp_path / "board", "status", env={"EDGEPACK_AGENT_LOCK_TIMEOUT": "0.3"})
        assert code == 11 and out["error"]["type"] == "Busy"
        assert a.sd.load().trial is not None  # the holder's trial was not touched
    finally:
        st.trial = None
        a.sd.save(st)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert run_agent(tmp_path / "board", "status")[0] == 0


def test_hung_trial_times_out_and_rolls_back(tmp_path, pki, rel, monkeypatch):
    """A runtime that hangs in the trial child is killed at the timeout; the board rolls back."""
    a = init_board(tmp_path / "board", pki)
    a.install(rel["r1"])
    monkeypatch.setattr("device_agent.trial.TRIAL_TIMEOUT_S", 0.01)
    with pytest.raises(HealthCheckFailed, match="timed out"):
        a.install(rel["r2"])
    assert active_ok(tmp_path / "board") == (1, "a")
