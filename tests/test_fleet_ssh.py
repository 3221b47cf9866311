"""Fleet rollouts against real OpenSSH: one private Debian sshd per simulated board on 127.0.0.1.

8 boards (own host key, port, state dir) plus an unreachable one. Faults: unreachable board,
sshd killed mid-transfer (resumed, bytes <= 1.1x ideal), authentication failure, changed and
unknown host keys, a board on the wrong base (full bundle), a bad release (canary halts, canary
boards roll back, the rest untouched), a release that passes the agent's trial but drifts (host
halts and rolls back). Then `fleet check`, `fleet status/history` and the HTML report.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet_helpers import (fleet_toml, free_port, have_sshd, keygen, make_boards, write_known_hosts, SimBoard, Sshd)

pytestmark = pytest.mark.skipif(not have_sshd(), reason="Debian openssh-server (/usr/sbin/sshd) is not installed; "
                                                        "scripts/setup.sh installs it")

ROOT = Path(__file__).resolve().parents[1]
N_BOARDS = 8
CLI_SHIM = "import edgepack.cli as c\nc.main()\n"


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`edgepack ARGS` through the real entry point (edgepack.cli:main)."""
    return subprocess.run([sys.executable, "-c", CLI_SHIM, *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd or ROOT, env={**os.environ, "COLUMNS": "200", **(env or {})})


# --------------------------------------------------------------------------- fixtures
class World:
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from agent_helpers import bundle, golden_for, init_board, make_onnx, make_pki
    from device_agent.install import Agent
    from edgepack.ota.delta import make_delta_bundle

    w = World()
    root = w.root = tmp_path_factory.mktemp("fleet")
    w.pki = make_pki(root / "pki")
    (root / "pki" / "root.json").write_text(json.dumps(w.pki.root_doc))
    m1 = make_onnx(root / "m1.onnx", seed=0)
    m2 = make_onnx(root / "m2.onnx", seed=0, drift=0.01)
    other = make_onnx(root / "other.onnx", seed=7)
    g1, g2 = golden_for(m1, root / "g1.npz"), golden_for(m2, root / "g2.npz")
    for d in ("r1", "r1x", "r2", "r3", "r4"):
        (root / d).mkdir()
    w.r1 = bundle(w.pki, root / "r1" / "r1.bundle", m1, release=1, golden=g1)
    w.r1x = bundle(w.pki, root / "r1x" / "r1x.bundle", other, release=1, golden=golden_for(other, root / "gx.npz"))
    w.r2 = bundle(w.pki, root / "r2" / "r2.bundle", m2, release=2, golden=g2)
    w.d12 = make_delta_bundle(w.r1, w.r2, root / "r2" / "r1-to-r2.bundle", trust=w.pki.board_trust(True),
                              signer=w.pki.release[0]).path
    # bad release: the model does not reproduce its reference outputs -> the agent's trial fails
    w.r3 = bundle(w.pki, root / "r3" / "r3.bundle", other, release=3, golden=g2)
    # drifting release: passes the agent's (loosened) trial, fails the host's drift policy
    loose = {"runtime": "onnxruntime", "threads": 1,
             "health": {"min_top1_agreement": 0.0, "min_cosine": -1.0, "min_cosine_sample": -1.0}}
    w.r4 = bundle(w.pki, root / "r4" / "r4.bundle", other, release=4, golden=g2, settings=loose)
    w.key = keygen(root / "client_key")
    w.boards = make_boards(root / "boards", N_BOARDS, w.key.with_suffix(".pub"))
    for i, b in enumerate(w.boards):
        b.sshd.start()
        # these boards' owners accept a loose trial (health floors), so r4 reaches the host's drift policy
        init_board(b.state, w.pki, trial_in_process=True, trial_runs=3,
                   health_floors={"min_top1_agreement": 0.0, "min_cosine": -1.0, "min_cosine_sample": -1.0})
        Agent(b.state).install(w.r1x if i == N_BOARDS - 1 else w.r1)  # the last board is on another base
    w.ghost = SimBoard("ghost", Sshd(root / "boards" / "ghost" / "sshd", free_port(), w.key.with_suffix(".pub")),
                       root / "boards" / "ghost" / "state", root / "boards" / "ghost" / "incoming")  # never started
    w.known_hosts = write_known_hosts(root / "known_hosts", w.boards + [w.ghost])
    w.fleet_file = fleet_toml(root / "fleet.toml", w.boards + [w.ghost], key=w.key, known_hosts=w.known_hosts,
                              store=root / "fleet.db")
    yield w
    for b in w.boards:
        b.sshd.kill()


def release_of(b: SimBoard) -> int | None:
    from device_agent.install import Agent
    st = Agent(b.state).status()
    return (st["active"] or {}).get("release")


def fleet(w: World):
    from edgepack.fleet import load_fleet
    return load_fleet(w.fleet_file)


# --------------------------------------------------------------------------- rollouts
def test_push_delta_full_and_unreachable(world):
    from edgepack.fleet import Policy, Store, push
    w = world
    fl = fleet(w)
    events = []
    with Store(fl.store) as st:
        rep = push(w.r2, fl, policy=Policy(canary=2, wave_size=3, concurrency=4, retries=1), store=st,
                   on_event=events.append)
    by = {b.board: b for b in rep.boards}
    assert [e["name"] for e in events if e["event"] == "wave_start"] == ["canary", "wave 1", "wave 2", "wave 3"]
    delta_bytes, full_bytes = w.d12.stat().st_size, w.r2.stat().st_size
    for b in w.boards[:-1]:
        r = by[b.name]
        assert (r.result, r.kind, r.release_before, r.release_after) == ("committed", "delta", 1, 2), r
        assert r.bytes_sent == delta_bytes and r.drift == 0.0 and r.p90_ms is not None
    last = by[w.boards[-1].name]
    assert (last.result, last.kind, last.bytes_sent) == ("committed", "full", full_bytes)  # wrong base: full bundle
    assert by["ghost"].result == "unreachable" and "unreachable" in by["ghost"].error
    assert not rep.halted and rep.exit_code == 21  # done, but one board not reached
    assert all(release_of(b) == 2 for b in w.boards)
    assert not any(list(b.incoming.glob("*.bundle*")) for b in w.boards)  # installed files are removed
    with Store(fl.store) as st:
        assert st.active_release("b0") == 2
        kinds = [r.kind for r in st.history("b0")]
        assert "install" in kinds and "status" in kinds
    # second push: every board already holds it
    with Store(fl.store) as st:
        rep2 = push(w.r2, fl, boards=fl.select("all-boards")[:N_BOARDS], policy=Policy(canary=1, wave_size=8), store=st)
    assert {b.result for b in rep2.boards} == {"current"} and rep2.bytes_sent == 0


def test_bad_release_canary_halts_and_rolls_back(world):
    w = world
    r = cli("push", str(w.r3), "--fleet", str(w.fleet_file), "--group", "all-boards", "--canary", "2",
            "--wave-size", "3", "--json")
    assert r.returncode == 25, r.stderr
    rep = json.loads(r.stdout)
    assert rep["halted"] and "canary" in rep["halt_reason"]
    res = {b["board"]: b for b in rep["boards"]}
    for b in w.boards[:2]:  # canary: trial failed on the board, the agent rolled back by itself
        assert res[b.name]["result"] == "rolled_back" and res[b.name]["release_after"] == 2
        assert release_of(b) == 2
    for b in w.boards[2:]:  # never touched: nothing sent, still on release 2
        assert res[b.name]["result"] == "not_started" and res[b.name]["bytes_sent"] == 0
        assert release_of(b) == 2 and not list(b.incoming.glob("*r3*"))


def test_drifting_release_halted_by_host_policy(world):
    from edgepack.fleet import Policy, Store, push
    w = world
    fl = fleet(w)
    with Store(fl.store) as st:
        rep = push(w.r4, fl, boards=fl.select("all-boards"), policy=Policy(canary=1, max_drift=0.02), store=st)
    assert rep.halted and rep.exit_code == 25
    c = rep.boards[0]
    assert c.result == "rolled_back" and c.drift > 0.02 and "drift" in c.error
    assert release_of(w.boards[0]) == 2  # host asked the agent to roll back
    assert all(b.result == "not_started" for b in rep.boards[1:])


def test_resume_after_sshd_killed_mid_transfer(world, tmp_path):
    from agent_helpers import golden_for, init_board, make_onnx, multi_file_bundle
    from edgepack.fleet import Policy, Store, load_fleet, push
    w = world
    m = make_onnx(tmp_path / "m.onnx", seed=3)
    big = multi_file_bundle(w.pki, tmp_path / "big.bundle", m, release=1, golden=golden_for(m, tmp_path / "g.npz"),
                            extras=6, extra_bytes=1 << 20)  # ~6 MiB of incompressible extras
    b = make_boards(tmp_path / "boards", 1, w.key.with_suffix(".pub"), prefix="big")[0]
    b.sshd.start()
    try:
        # these boards' owners accept a loose trial (health floors), so r4 reaches the host's drift policy
        init_board(b.state, w.pki, trial_in_process=True, trial_runs=3,
                   health_floors={"min_top1_agreement": 0.0, "min_cosine": -1.0, "min_cosine_sample": -1.0})
        kh = write_known_hosts(tmp_path / "kh", [b])
        fl = load_fleet(fleet_toml(tmp_path / "f.toml", [b], key=w.key, known_hosts=kh))
        killed = []

        def on_bytes(board: str, n: int) -> None:
            if n >= (2 << 20) + 100_000 and not killed:  # between two acknowledgement syncs
                killed.append(n)
                b.sshd.kill()      # listener and the session processes: the SFTP put dies mid-file
                b.sshd.start()     # the board comes back; the push reconnects and resumes

        with Store(fl.store) as st:
            rep = push(big, fl, policy=Policy(retries=3), store=st, on_bytes=on_bytes)
        r = rep.boards[0]
        size = big.stat().st_size
        assert killed and r.result == "committed", r
        assert r.resumed_at and 0 < r.resumed_at[0] <= killed[0]
        assert size <= r.bytes_sent <= 1.1 * size, (r.bytes_sent, size)
        assert release_of(b) == 1
    finally:
        b.sshd.kill()


# --------------------------------------------------------------------------- refusals
def test_auth_failure(world, tmp_path):
    from edgepack.fleet import AuthFailed, Policy, load_fleet, open_transport, push
    w = world
    wrong = keygen(tmp_path / "wrong_key")
    fl = load_fleet(fleet_toml(tmp_path / "f.toml", w.boards[:1], key=wrong, known_hosts=w.known_hosts))
    with pytest.raises(AuthFailed, match="authorized_keys"):
        open_transport(fl.boards[0], fl).connect()
    rep = push(w.r2, fl, policy=Policy(retries=0))
    # the only board is the canary: not reached means no canary result, and no result means no go
    assert rep.boards[0].result == "auth_failed" and rep.halted and rep.exit_code == 25


def test_host_keys_changed_unknown_and_tofu(world, tmp_path):
    from edgepack.fleet import HostKeyRejected, load_fleet, open_transport
    w = world
    b = w.boards[1]
    other = keygen(tmp_path / "other_host")
    kt, b64 = other.with_suffix(".pub").read_text().split()[:2]
    changed = tmp_path / "kh_changed"
    changed.write_text(f"[127.0.0.1]:{b.sshd.port} {kt} {b64}\n")
    for tofu in (False, True):  # a changed key is refused even with trust-on-first-use
        fl = load_fleet(fleet_toml(tmp_path / f"c{tofu}.toml", [b], key=w.key, known_hosts=changed, tofu=tofu))
        with pytest.raises(HostKeyRejected, match="CHANGED"):
            open_transport(fl.boards[0], fl).connect()
    unknown = tmp_path / "kh_empty"
    unknown.write_text("")
    fl = load_fleet(fleet_toml(tmp_path / "u.toml", [b], key=w.key, known_hosts=unknown))
    with pytest.raises(HostKeyRejected, match="trust_on_first_use"):
        open_transport(fl.boards[0], fl).connect()
    assert unknown.read_text() == ""
    fl = load_fleet(fleet_toml(tmp_path / "t.toml", [b], key=w.key, known_hosts=unknown, tofu=True))
    with open_transport(fl.boards[0], fl) as t:
        assert t.run(["true"]).rc == 0
    assert unknown.read_text().strip() == b.sshd.host_key_line()  # recorded on first use


# --------------------------------------------------------------------------- status, check, report
def test_status_history_check_and_report(world, tmp_path):
    w = world
    r = cli("fleet", "status", "--fleet", str(w.fleet_file), "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["board"]: x for x in json.loads(r.stdout)}
    assert rows["b0"]["release"] == 2 and rows["ghost"]["release"] is None
    r = cli("fleet", "history", "b0", "--fleet", str(w.fleet_file), "--json")
    assert r.returncode == 0 and {x["kind"] for x in json.loads(r.stdout)} >= {"install", "status", "rollback"}
    r = cli("fleet", "check", "--fleet", str(w.fleet_file), "--group", "canary", "--runs", "20", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["flags"] == [] and all(b["drift"] == 0.0 and b["p90_ms"] > 0 for b in rep["boards"])
    # budgets the boards cannot meet: latency and RAM regressions flagged, exit 26 for cron
    tight = fleet_toml(tmp_path / "tight.toml", w.boards[:2], key=w.key, known_hosts=w.known_hosts,
                       store=w.root / "fleet.db", extra={b.name: {"latency_budget_ms": 0.0001, "ram_budget_mb": 1.0}
                                                         for b in w.boards[:1]})
    r = cli("fleet", "check", "--fleet", str(tight), "--runs", "20", "--json")
    assert r.returncode == 26, r.stderr
    kinds = {(f["board"], f["kind"]) for f in json.loads(r.stdout)["flags"]}
    assert kinds == {("b0", "latency_budget"), ("b0", "ram")}
    html = tmp_path / "report.html"
    r = cli("report", "--html", str(html), "--fleet", str(w.fleet_file))
    assert r.returncode == 0, r.stderr
    text = html.read_text()
    for needle in ('id="latency"', 'id="drift"', 'id="flags"', "latency_budget", "halted"):
        assert needle in text
    assert "http://" not in text and "https://" not in text and "<script" not in text and "<link" not in text


def _chromium() -> str | None:
    for c in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(c):
            return shutil.which(c)
    return None


@pytest.mark.skipif(_chromium() is None, reason="Debian chromium is not installed (apt-get install -y chromium; "
                                                "scripts/setup.sh does it): the HTML report is not rendered in a browser")
def test_report_renders_in_headless_chromium(world, tmp_path):
    from edgepack.fleet import Store, load_fleet, render_html
    w = world
    with Store(load_fleet(w.fleet_file).store) as st:
        html = render_html(st, tmp_path / "r.html")
    prof = tmp_path / "profile"
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={prof}",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=2000"]
    r = subprocess.run([*base, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    dom = r.stdout
    assert dom.count("<svg") >= 2 and 'id="latency"' in dom and 'class="bar"' in dom and "polyline" in dom
    png = tmp_path / "r.png"
    subprocess.run([*base, f"--screenshot={png}", "--window-size=1000,1400", html.as_uri()], capture_output=True,
                   timeout=120)
    assert png.is_file() and png.stat().st_size > 10_000  # something was drawn


# --------------------------------------------------------------------------- bootstrap over ssh
def test_bootstrap_copies_zipapp_and_push_uses_it(world, tmp_path):
    w = world
    b = make_boards(tmp_path / "boards", 1, w.key.with_suffix(".pub"), prefix="fresh")[0]
    b.sshd.start()
    try:
        kh = write_known_hosts(tmp_path / "kh", [b])
        # the board runs the copied zipapp with its own python (this venv's: it has numpy, onnxruntime ...)
        ff = fleet_toml(tmp_path / "f.toml", [b], key=w.key, known_hosts=kh, python=sys.executable,
                        extra={b.name: {"agent_path": str(tmp_path / "remote" / "edgepack-agent.pyz"),
                                        "trial_in_process": True, "trial_runs": 3}})
        r = cli("fleet", "bootstrap", "--fleet", str(ff), "--trust-root", str(w.root / "pki" / "root.json"), "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        res = json.loads(r.stdout)[0]
        assert res["ok"] and res["copied_agent"] and res["runtimes"]["onnxruntime"]
        assert (tmp_path / "remote" / "edgepack-agent.pyz").is_file() and (b.state / "board.json").is_file()
        r = cli("push", str(w.r1), "--fleet", str(ff), "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["boards"][0]["result"] == "committed" and release_of(b) == 1
    finally:
        b.sshd.kill()


# --------------------------------------------------------------------------- slow link (netns + tc tbf)
def _netns_ok() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns / tc"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "iproute2 (ip, tc) not installed"
    r = subprocess.run(["ip", "netns", "add", "epf-probe"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "epf-probe"], capture_output=True)
    return None


@pytest.mark.skipif(_netns_ok() is not None, reason=f"slow-link test skipped: {_netns_ok()}")
def test_slow_link_throttled_board(world, tmp_path):
    """A board in its own network namespace behind a veth pair with `tc tbf` (2 Mbit/s) on the
    host side: the full bundle takes its time, the delta is small, both arrive and commit."""
    import time

    from edgepack.fleet import Policy, Store, load_fleet, push
    from agent_helpers import init_board
    from device_agent.install import Agent
    w = world
    ns, hv, bv, hip, bip = "epf-slow", "epf-h0", "epf-b0", "10.213.7.1", "10.213.7.2"
    sh = lambda *c: subprocess.run(list(c), check=True, capture_output=True)  # noqa: E731
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", hv], capture_output=True)
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", hv, "type", "veth", "peer", "name", bv)
        sh("ip", "link", "set", bv, "netns", ns)
        sh("ip", "addr", "add", f"{hip}/30", "dev", hv)
        sh("ip", "link", "set", hv, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{bip}/30", "dev", bv)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", bv, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("tc", "qdisc", "add", "dev", hv, "root", "tbf", "rate", "2mbit", "burst", "16kb", "latency", "200ms")
        d = tmp_path / "slow"
        s = Sshd(d / "sshd", 2222, w.key.with_suffix(".pub"), listen=bip, netns=ns)
        s.start()
        b = SimBoard("slow", s, d / "state", d / "incoming")
        # these boards' owners accept a loose trial (health floors), so r4 reaches the host's drift policy
        init_board(b.state, w.pki, trial_in_process=True, trial_runs=3,
                   health_floors={"min_top1_agreement": 0.0, "min_cosine": -1.0, "min_cosine_sample": -1.0})
        Agent(b.state).install(w.r1)
        kh = write_known_hosts(tmp_path / "kh", [b])
        fl = load_fleet(fleet_toml(tmp_path / "f.toml", [b], key=w.key, known_hosts=kh))
        t0 = time.perf_counter()
        with Store(fl.store) as st:
            rep = push(w.r2, fl, policy=Policy(), store=st)
        r = rep.boards[0]
        assert r.result == "committed" and r.kind == "delta", r
        big = tmp_path / "pad.bin"
        big.write_bytes(os.urandom(500_000))
        from edgepack.fleet import open_transport, send_file
        with open_transport(fl.boards[0], fl) as t:
            t1 = time.perf_counter()
            ts = send_file(t, big, str(b.incoming))
            dt_ = time.perf_counter() - t1
        assert ts.bytes_sent == 500_000
        assert dt_ >= 0.7 * 500_000 * 8 / 2e6, dt_  # the link really is ~2 Mbit/s
        assert time.perf_counter() - t0 > dt_
        s.kill()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", hv], capture_output=True)
