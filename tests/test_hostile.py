"""Issue 12: hostile input and lying boards, one test per class (the attack suite's style).

Each case is refused with its own named error and nothing is installed or written: the board's
active release, counter and slots are what they were (``unchanged``). Real keys, real bundles,
real agent processes, a real tmpfs for the full disk, real SIGKILLs.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent_helpers import ROOT, TARGET, active_ok, bundle, golden_for, init_board, make_onnx, make_pki, run_agent
from device_agent.wire.encoding import canonical_json
from device_agent.durable import utc_now
from device_agent.agent_errors import (DiskFull, HealthCheckFailed, StateCorrupt, UsageError)
from device_agent.bundle import open_bundle
from device_agent.wire import MAGIC
from device_agent.errors import (MalformedBundle, NotABundle, NotYetValid, ReleaseStepTooLarge, RevokedKey,
                                 RollbackError, TargetMismatch, ThresholdNotMet)
from device_agent.install import Agent
from device_agent.trust import MANIFEST_TYPE
from edgepack.ota import keys as K
from ota_helpers import assemble, files_in, resign, split_bundle


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")

    class W:
        pass
    w = W()
    w.d = d
    w.pki = make_pki(d / "pki")
    for r in ("m1", "m2", "other"):
        (d / r).mkdir()
    w.m1 = make_onnx(d / "m1" / "mlp.onnx", seed=0)
    w.m2 = make_onnx(d / "m2" / "mlp.onnx", seed=0, drift=0.002)
    w.other = make_onnx(d / "other" / "mlp.onnx", seed=9)
    w.g1 = golden_for(w.m1, d / "g1.npz", n=4)
    w.g2 = golden_for(w.m2, d / "g2.npz", n=4)
    (d / "r1").mkdir()
    (d / "r2").mkdir()
    w.r1 = bundle(w.pki, d / "r1" / "r1.bundle", w.m1, release=1, golden=w.g1)
    w.r2 = bundle(w.pki, d / "r2" / "r2.bundle", w.m2, release=2, golden=w.g2)
    w.tpl = d / "tpl"
    init_board(w.tpl, w.pki, threads=1, trial_in_process=True, trial_runs=2).install(w.r1)
    return w


def board(w, tmp_path: Path, name: str = "b") -> Path:
    st = tmp_path / name
    shutil.copytree(w.tpl, st, symlinks=True)
    return st


def snapshot(st: Path) -> tuple:
    s = json.loads((st / "state.json").read_text())
    return s["active"], s["counter"], os.readlink(st / "current"), files_in(st / "slots")


def refused(st: Path, exc, fn, match=None):
    """``fn()`` raises ``exc`` and the board is exactly as it was."""
    before = snapshot(st)
    with pytest.raises(exc, match=match):
        fn()
    assert snapshot(st) == before


def raw_bundle(out: Path, trust_bytes: bytes, manifest: dict, signers, frames) -> Path:
    mb = canonical_json(manifest)
    sb = canonical_json([s.sign(MANIFEST_TYPE, mb) for s in signers])
    out.write_bytes(MAGIC + struct.pack(">HH", 1, 0) + b"".join(struct.pack(">I", len(x)) + x
                                                                 for x in (trust_bytes, mb, sb)) + b"".join(frames))
    return out


# ---------------------------------------------------------------- fleet file: env keys reach no shell
@pytest.mark.parametrize("key", ["A;touch /tmp/x;B", "A B", "A=B", "1A", "A\nB", "$(id)", ""])
def test_fleet_env_key_injection_refused(tmp_path, key):
    from edgepack.fleet import load_fleet
    from edgepack.fleet.errors import InventoryError
    f = tmp_path / "f.toml"
    f.write_text(f"[[boards]]\nname = 'a'\nhost = 'h'\nenv = {{ {json.dumps(key)} = 'v' }}\n")
    with pytest.raises(InventoryError, match="not a variable name"):
        load_fleet(f)


def test_ssh_transport_checks_env_keys_before_connecting(tmp_path):
    from edgepack.fleet.errors import InventoryError
    from edgepack.fleet.inventory import Board, Fleet
    from edgepack.fleet.transport import SSHTransport
    marker = tmp_path / "pwned"
    b = Board(name="x", host="127.0.0.1", port=1, env={f"A;touch {marker};B": "1"})
    with pytest.raises(InventoryError, match="not a variable name"):
        SSHTransport(b, Fleet(boards=[b], ssh_config=None)).run(["true"], env=b.env)
    assert not marker.exists()


# ---------------------------------------------------------------- report --html: board strings are data
def test_report_html_escapes_every_board_string(tmp_path):
    from edgepack.fleet import Store
    from edgepack.fleet.report import render_html
    evil = "<img src=x onerror=alert(1)>"
    with Store(tmp_path / "s.db") as s:
        s.add("b<script>1</script>", "status", {"ok": True, "active": {"release": evil}})
        s.add("b2", "status", {"ok": True, "active": {"release": 3}}, release=evil)  # a TEXT value in the column
        s.add("b2", "install", {"ok": True, "status": f"<script>{evil}</script>", "release": 3,
                                "trial": {"latency": {"p90_ms": "<svg onload=1>"}, "comparison": "x"}})
        rid = s.start_rollout(3, "<b>r3</b>.bundle")
        s.finish_rollout(rid, True, f"halted {evil}", {"boards": "<i>notalist</i>", "bytes_sent": "<u>u</u>"})
        out = render_html(s, tmp_path / "r.html")
    html = out.read_text()
    for bad in ("<img", "<script", "<svg", "<i>", "<u>", "<b>"):
        assert bad not in html, bad
    assert "&lt;img src=x" in html


# ---------------------------------------------------------------- revocation sticks as soon as it verifies
@pytest.fixture(scope="module")
def revoking(w):
    rk2 = K.make_release_keys(w.pki.root_doc, w.pki.root_keys[:2], [w.pki.release[1].public_raw], version=2,
                              revoked=[w.pki.release[0].keyid], now=utc_now())
    d = w.d / "rev"
    d.mkdir()
    # carries the revoking list, but its model does not reproduce its golden outputs: the trial fails
    bad = bundle(w.pki, d / "bad.bundle", w.other, release=2, golden=w.g1, signer=w.pki.release[1], rk_doc=rk2)
    wrong_target = bundle(w.pki, d / "wt.bundle", w.m2, release=2, golden=w.g2, signer=w.pki.release[1],
                          rk_doc=rk2, targets=("other-board",))
    old_key = bundle(w.pki, d / "old.bundle", w.m2, release=3, golden=w.g2)  # revoked key, v1 list embedded
    return bad, wrong_target, old_key


@pytest.mark.parametrize("case", ["failed-trial", "wrong-target"])
def test_revocation_persisted_even_when_the_carrying_bundle_is_refused(w, revoking, tmp_path, case):
    bad, wrong_target, old_key = revoking
    st = board(w, tmp_path)
    a = Agent(st)
    with pytest.raises(HealthCheckFailed if case == "failed-trial" else TargetMismatch):
        a.install(bad if case == "failed-trial" else wrong_target)
    assert a.sd.load().trust["release_keys"]["signed"]["version"] == 2
    refused(st, RevokedKey, lambda: a.install(old_key))
    assert active_ok(st)[0] == 1


# ---------------------------------------------------------------- manifest: full-match names
@pytest.mark.parametrize("field, value", [("path", "mlp.onnx\n"), ("path", "mlp.onnx\n../x"), ("model", "mlp\n"),
                                          ("version", "1.0\n"), ("version", "[bold]1[/]"), ("target", "rpi4-2gb\n"),
                                          ("min_agent_version", "0.1.0\n")])
def test_names_are_full_matches(w, tmp_path, field, value):
    def mut(m):
        if field == "path":
            m["files"][0]["path"] = value
        elif field == "target":
            m["targets"] = [value]
        else:
            m[field] = value
    p = resign(w.r1, tmp_path / "x.bundle", w.pki.release[0], mutate=mut)
    with pytest.raises(MalformedBundle):
        open_bundle(p, w.pki.board_trust(), now=utc_now())


# ---------------------------------------------------------------- unsigned header bytes: data, never a crash
def test_inf_in_unsigned_trust_section(w, tmp_path):
    hdr, m, fr = split_bundle(w.r1)
    tb = canonical_json(hdr.trust)[:-1] + b',"x":1e400}'
    p = raw_bundle(tmp_path / "x.bundle", tb, m, [w.pki.release[0]], fr)
    with pytest.raises(MalformedBundle, match="not a finite double"):
        open_bundle(p, w.pki.board_trust(), now=utc_now())


@pytest.mark.parametrize("kid", ["[/]", "[bold red]x[/]", "\x1b[2J\x1b[31mred", "a\rb"])
def test_markup_and_ansi_in_unsigned_key_id_printed_as_data(w, tmp_path, kid):
    from typer.testing import CliRunner

    from edgepack.cli import app
    hdr, m, fr = split_bundle(w.r1)
    trust = {"roots": [{"signed": {"type": "edgepack-root", "version": 2, "threshold": 1, "expires": "2099-01-01T00:00:00Z",
                                   "keys": {kid: {"keytype": "ed25519"}}}, "signatures": []}],
             "release_keys": hdr.trust["release_keys"]}
    p = assemble(tmp_path / "x.bundle", trust=trust, manifest=m, signers=[w.pki.release[0]], frames=fr)
    root = tmp_path / "root.json"
    root.write_text(json.dumps(w.pki.root_doc))
    r = CliRunner().invoke(app, ["verify", str(p), "--root", str(root)])
    out = r.stdout + (r.stderr if r.stderr_bytes is not None else "")
    assert r.exit_code == 5, out
    assert "Traceback" not in out and "\x1b" not in out and "\r" not in out
    assert "is not an ed25519 key entry" in out


# ---------------------------------------------------------------- state.json: odd fields are StateCorrupt, recover rebuilds
def _set(field, value):
    def f(st: Path):
        s = json.loads((st / "state.json").read_text())
        s[field] = value
        (st / "state.json").write_text(json.dumps(s))
    return f


def _replace(name, how):
    def f(st: Path):
        p = st / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        if how == "dir":
            p.mkdir()
            (p / "junk").write_text("x")
        elif how == "fifo":
            os.mkfifo(p)
        elif how == "zero":
            p.symlink_to("/dev/zero")
        elif how == "bytes":
            p.write_bytes(b"\xff\xfe{\x00\x80")
    return f


CORRUPT = {
    "counter-string": _set("counter", "7"), "counter-bool": _set("counter", True), "counter-float": _set("counter", 1.5),
    "trial-string": _set("trial", "x"), "trial-list": _set("trial", [1]), "trust-string": _set("trust", "x"),
    "trust-root-list": _set("trust", {"root": []}), "history-object": _set("history", {"a": 1}),
    "active-number": _set("active", 5), "writing-list": _set("writing", ["a"]),
    "trust-unverifiable": _set("trust", {"root": {"signed": {}, "signatures": []}}),
    "state-non-utf8": _replace("state.json", "bytes"), "state-dir": _replace("state.json", "dir"),
    "state-fifo": _replace("state.json", "fifo"), "state-dev-zero": _replace("state.json", "zero"),
    "lock-dir": _replace("lock", "dir"), "lock-fifo": _replace("lock", "fifo"), "current-dir": _replace("current", "dir"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_odd_state_is_state_corrupt_and_recover_rebuilds(w, tmp_path, case):
    st = board(w, tmp_path)
    CORRUPT[case](st)
    t0 = time.monotonic()
    code, out, err = run_agent(st, "status", timeout=60)
    assert code == 3 and out["error"]["type"] == "StateCorrupt", (code, out, err)
    assert "internal error" not in err and time.monotonic() - t0 < 30
    code, out, err = run_agent(st, "recover", timeout=60)
    assert code == 0, (out, err)
    code, out, _ = run_agent(st, "status", "--verify")
    assert code == 0 and out["active"]["release"] == 1 and out["active"]["verified"]
    assert active_ok(st)[0] == 1


def test_install_from_fifo_or_device_does_not_hang(w, tmp_path):
    st = board(w, tmp_path)
    fifo = tmp_path / "b.fifo"
    os.mkfifo(fifo)
    for src in (fifo, Path("/dev/zero")):
        t0 = time.monotonic()
        code, out, _ = run_agent(st, "install", str(src), timeout=60)
        assert code == 5 and out["error"]["type"] == "NotABundle" and time.monotonic() - t0 < 30
    assert active_ok(st)[0] == 1


# ---------------------------------------------------------------- bounded release step, root-signed reset
def test_release_step_bounded_and_root_can_reset_counter(w, tmp_path):
    st = board(w, tmp_path)
    a = Agent(st)
    huge = bundle(w.pki, tmp_path / "huge.bundle", w.m2, release=2**63 - 1, golden=w.g2)
    refused(st, ReleaseStepTooLarge, lambda: a.install(huge))
    far = bundle(w.pki, tmp_path / "far.bundle", w.m2, release=900, golden=w.g2)
    assert a.install(far).status == "committed" and a.sd.load().counter == 900
    low = bundle(w.pki, tmp_path / "low.bundle", w.m1, release=2, golden=w.g1)
    refused(st, RollbackError, lambda: a.install(low))
    doc = tmp_path / "reset.json"
    K.write_doc(doc, K.make_counter_reset(w.pki.root_doc, w.pki.root_keys[:2], counter=1, version=1, targets=[TARGET]))
    one_key = tmp_path / "reset1.json"
    d1 = K.make_counter_reset(w.pki.root_doc, w.pki.root_keys[:2], counter=0, version=2, targets=[TARGET])
    d1["signatures"] = d1["signatures"][:1]  # below the root threshold
    K.write_doc(one_key, d1)
    refused(st, ThresholdNotMet, lambda: a.reset_counter(one_key))
    code, out, _ = run_agent(st, "reset-counter", str(doc))
    assert code == 0 and out["counter"] == 1
    refused(st, RollbackError, lambda: a.reset_counter(doc))  # a reset cannot be replayed
    assert a.install(low).status == "committed" and active_ok(st)[0] == 2


# ---------------------------------------------------------------- board policy: delegates, health floors
def test_accelerator_path_from_bundle_never_loaded(w, tmp_path):
    st = board(w, tmp_path)
    evil = tmp_path / "evil.so"
    evil.write_bytes(b"\x7fELF not really")
    for s in ({"execution_provider": str(evil)}, {"delegate": str(evil)}, {"execution_providers": ["MyEP", "x"]}):
        b = bundle(w.pki, tmp_path / "acc.bundle", w.m2, release=2, golden=w.g2,
                   settings={"runtime": "onnxruntime", "threads": 1, **s})
        with pytest.raises(HealthCheckFailed, match="allow-list"):
            Agent(st).install(b)
        assert active_ok(st)[0] == 1 and Agent(st).sd.load().counter == 1


@pytest.mark.parametrize("health", [{"min_cosine": -2, "min_cosine_sample": -2, "min_top1_agreement": -1},
                                    {"min_cosine": float("nan")}, {"min_top1_agreement": float("inf")},
                                    {"min_cosine": "0"}])
def test_bundle_cannot_loosen_health_thresholds(w, tmp_path, health):
    st = board(w, tmp_path)
    b = bundle(w.pki, tmp_path / "loose.bundle", w.other, release=2, golden=w.g1,
               settings={"runtime": "onnxruntime", "threads": 1, "health": health})
    with pytest.raises(HealthCheckFailed):
        Agent(st).install(b)
    assert active_ok(st)[0] == 1 and Agent(st).sd.load().counter == 1


# ---------------------------------------------------------------- the trial: rlimits, own group
def test_trial_over_ram_budget_fails(w, tmp_path):
    st = tmp_path / "small"
    init_board(st, w.pki, threads=1, trial_runs=2, ram_budget_mb=64.0)  # out-of-process trial
    a = Agent(st)
    assert a.install(w.r1).status == "committed"  # a normal trial fits the budget
    big = tmp_path / "big.npz"
    x = np.zeros((2_000_000, 1, 32), np.float32)  # 256 MB once loaded, a few hundred KB compressed
    np.savez_compressed(big, inputs_x=x, outputs_y=np.zeros((2_000_000, 1, 10), np.float32))
    del x
    b = bundle(w.pki, tmp_path / "bomb.bundle", w.m2, release=2, golden=big)
    with pytest.raises(HealthCheckFailed, match="RAM budget"):
        a.install(b)
    assert active_ok(st)[0] == 1


# ---------------------------------------------------------------- zstd windows the format promises
def test_full_payload_window_above_8_mib_refused(w, tmp_path):
    from device_agent.wire.streams import zstd
    hdr, m, fr = split_bundle(w.r1)
    c = zstd.ZstdCompressor(options={zstd.CompressionParameter.window_log: 27})
    data = w.m1.read_bytes()
    frame = c.compress(data) + c.flush(zstd.ZstdCompressor.FLUSH_FRAME)
    import hashlib
    i = next(k for k, f in enumerate(m["files"]) if f["role"] == "model")
    m["files"][i].update(transport_length=len(frame), transport_sha256=hashlib.sha256(frame).hexdigest())
    fr[i] = frame
    p = assemble(tmp_path / "x.bundle", trust=hdr.trust, manifest=m, signers=[w.pki.release[0]], frames=fr)
    from device_agent.bundle import extract
    vm = open_bundle(p, w.pki.board_trust(), now=utc_now())
    with pytest.raises(MalformedBundle, match="zstd"):
        extract(vm, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


# ---------------------------------------------------------------- clocks and init
def test_far_future_created_refused(w, tmp_path):
    st = board(w, tmp_path)
    b = bundle(w.pki, tmp_path / "fut.bundle", w.m2, release=2, golden=w.g2)
    from agent_helpers import build
    # 3 days ahead: past the 1-day clock allowance, inside the test PKI's one-year lifetime
    build(w.pki, b, w.m2, release=2, golden=w.g2, now=utc_now() + dt.timedelta(days=3),
          settings={"runtime": "onnxruntime", "threads": 1})
    refused(st, NotYetValid, lambda: Agent(st).install(b))


def test_init_with_another_root_refused_without_force(w, tmp_path):
    st = board(w, tmp_path)
    other = make_pki(tmp_path / "pki2")
    root2 = tmp_path / "root2.json"
    root2.write_text(json.dumps(other.root_doc))
    before = snapshot(st)
    code, out, _ = run_agent(st, "init", "--target", TARGET, "--trust-root", str(root2))
    assert code == 2 and "--force" in out["error"]["message"] and snapshot(st) == before
    root1 = tmp_path / "root1.json"
    root1.write_text(json.dumps(w.pki.root_doc))
    assert run_agent(st, "init", "--target", TARGET, "--trust-root", str(root1))[0] == 0  # same root: reconfigure
    assert run_agent(st, "init", "--target", TARGET, "--trust-root", str(root2), "--force")[0] == 0


# ---------------------------------------------------------------- disk full during the trial
def test_disk_full_during_trial_keeps_current_on_committed_slot(w, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        st = mnt / "board"
        init_board(st, w.pki, threads=1, trial_in_process=True, trial_runs=2, storage_mb=2.0)
        Agent(st).install(w.r1)

        class FillDuringTrial(Agent):
            def trial(self, *a, **k):
                with open(mnt / "filler", "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * 65536)
                            f.flush()
                    except OSError:
                        pass
                return super().trial(*a, **k)

        with pytest.raises(DiskFull, match="not committed"):
            FillDuringTrial(st).install(w.r2)
        s1 = json.loads((st / "state.json").read_text())
        assert os.readlink(st / "current") == "slots/a"  # never left on the uncommitted slot b
        assert s1["counter"] == 1
        (mnt / "filler").unlink()
        assert active_ok(st)[0] == 1 and os.readlink(st / "current") == "slots/a"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ---------------------------------------------------------------- lying boards and the rollout
FAKE = '''
import json, os, sys
args = sys.argv[1:]
mode = os.environ["FAKE_MODE"]
if "install" in args:
    if mode == "garbage":
        print("Segmentation fault? no: <html>lol</html>"); sys.exit(0)
    if mode == "shape":
        print(json.dumps({"ok": True, "status": "committed", "release": [2], "trial": "x", "report": 5})); sys.exit(0)
    if mode == "other-release":
        print(json.dumps({"ok": True, "status": "committed", "release": 99})); sys.exit(0)
if "status" in args and mode == "status-shape":
    print(json.dumps({"ok": True, "active": "a string", "counter": [1]})); sys.exit(0)
os.execv(sys.executable, [sys.executable, "-m", "device_agent", *args])
'''


def _local(w, tmp_path, name, mode=None, agent=None):
    from edgepack.fleet.inventory import Board
    st = board(w, tmp_path, name)
    env = {}
    if mode:
        fake = tmp_path / "fake_agent.py"
        fake.write_text(FAKE)
        agent = f"{sys.executable} {fake}"
        env = {"FAKE_MODE": mode, "PYTHONPATH": str(ROOT)}
    return Board(name=name, transport="local", state=str(st), incoming=str(tmp_path / name / "in"),
                 trial_in_process=True, agent=agent, env=env), st


@pytest.mark.parametrize("mode", ["garbage", "shape", "other-release", "status-shape"])
def test_lying_board_is_a_failure_and_the_wave_rolls_back(w, tmp_path, mode):
    from edgepack.fleet import Fleet, Policy, load_release, push
    good, gst = _local(w, tmp_path, "good")
    liar, lst = _local(w, tmp_path, "liar", mode=mode)
    rep = push(load_release(w.r2), Fleet(boards=[good, liar], ssh_config=None), policy=Policy(canary=0, wave_size=2))
    res = {b.board: b for b in rep.boards}
    assert res["liar"].result == ("not_ready" if mode == "status-shape" else "failed"), res["liar"]
    if mode != "status-shape":  # a release failure: the wave halts and its good board is rolled back
        assert rep.halted and res["good"].result == "rolled_back"
        assert active_ok(gst)[0] == 1


def test_unreachable_canary_is_no_go(w, tmp_path):
    from edgepack.fleet import Fleet, Policy, load_release, push
    canary, _ = _local(w, tmp_path, "canary", agent=str(tmp_path / "no-such-agent"))
    later, lst = _local(w, tmp_path, "later")
    rep = push(load_release(w.r2), Fleet(boards=[canary, later], ssh_config=None), policy=Policy(canary=1, wave_size=1))
    assert rep.halted and "canary" in rep.halt_reason
    assert {b.board: b.result for b in rep.boards}["later"] == "not_started"
    assert active_ok(lst)[0] == 1


def test_junk_bundles_next_to_the_release_are_ignored(w, tmp_path):
    from edgepack.fleet import load_release
    d = tmp_path / "rel"
    d.mkdir()
    shutil.copy(w.r2, d / "r2.bundle")
    (d / "junk.bundle").write_bytes(os.urandom(300))
    (d / "magic.bundle").write_bytes(MAGIC + b"\0\1\0\0" + struct.pack(">I", 2) + b"{}" + struct.pack(">I", 1) + b"[")
    (d / "dir.bundle").mkdir()
    os.mkfifo(d / "fifo.bundle")
    rel = load_release(d / "r2.bundle")
    assert rel.release == 2 and rel.deltas == []
