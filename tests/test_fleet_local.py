"""Fleet pieces that need no sshd: the fleet file, ~/.ssh/config, wave planning, the store, the
regression judge, and the embedded default (one local board: the agent as a subprocess) running
the whole pipeline through the CLI: bootstrap, push full, push delta, check, report."""
from __future__ import annotations

import json
import os

import pytest

from test_fleet_ssh import cli


def test_fleet_file_and_ssh_config(tmp_path):
    from edgepack.fleet import load_fleet
    from edgepack.fleet.inventory import resolve_ssh
    (tmp_path / "ssh_config").write_text("Host cam-*\n  HostName 127.0.0.1\n  Port 2299\n  User pi\n"
                                         "  IdentityFile ~/.ssh/cam_key\n  StrictHostKeyChecking accept-new\n")
    (tmp_path / "fleet.toml").write_text(f"""
[fleet]
ssh_config = "{tmp_path / 'ssh_config'}"
known_hosts = "kh"
[defaults]
target = "rpi4"
[[boards]]
name = "cam-01"
host = "cam-01"
groups = ["canary"]
tags = {{ site = "a" }}
[[boards]]
name = "cam-02"
host = "cam-02"
port = 2300
user = "root"
[[boards]]
name = "dev"
transport = "local"
state = "boards/dev"
""")
    fl = load_fleet(tmp_path / "fleet.toml")
    assert fl.known_hosts == tmp_path / "kh" and fl.store == tmp_path / "fleet.db" and not fl.trust_on_first_use
    t1 = resolve_ssh(fl.board("cam-01"), fl)
    assert (t1.hostname, t1.port, t1.user) == ("127.0.0.1", 2299, "pi")
    assert t1.key_files == [os.path.expanduser("~/.ssh/cam_key")] and t1.accept_new  # explicit opt-in in ssh config
    t2 = resolve_ssh(fl.board("cam-02"), fl)
    assert (t2.port, t2.user) == (2300, "root")  # the fleet file wins, like ssh's command line
    assert [b.name for b in fl.select("canary")] == ["cam-01"] and [b.name for b in fl.select("site=a")] == ["cam-01"]
    assert fl.board("dev").state == str(tmp_path / "boards" / "dev")


@pytest.mark.parametrize("text, msg", [
    ("[[boards]]\nname = 'a'\n", "needs a host"),
    ("[[boards]]\nname = 'a'\nhost = 'h'\nport = 'x'\n", "port must be a int"),
    ("[[boards]]\nname = 'a'\nhost = 'h'\n[[boards]]\nname = 'a'\nhost = 'h'\n", "appears twice"),
    ("[[boards]]\nname = 'a'\nhost = 'h'\ncolour = 1\n", "unknown key"),
    ("[fleet]\ntrust_on_first_use = 'yes'\n[[boards]]\nname = 'a'\nhost = 'h'\n", "true or false"),
    ("boards = [\n", "not valid TOML"),
    ("", "no boards"),
])
def test_bad_fleet_files(tmp_path, text, msg):
    from edgepack.fleet import InventoryError, load_fleet
    (tmp_path / "f.toml").write_text(text)
    with pytest.raises(InventoryError, match=msg):
        load_fleet(tmp_path / "f.toml")


def test_plan_waves():
    from edgepack.fleet import Board, InventoryError, Policy, plan_waves
    bs = [Board(name=f"b{i}", host="h") for i in range(10)]
    w = plan_waves(bs, Policy(canary="10%", wave_size=4))
    assert [len(x) for x in w] == [1, 4, 4, 1]
    assert [len(x) for x in plan_waves(bs, Policy(canary=0, wave_size="50%"))] == [5, 5]
    with pytest.raises(InventoryError, match="percentage"):
        plan_waves(bs, Policy(canary="lots"))


def test_judge_flags():
    from edgepack.fleet import Board, BoardCheck, CheckPolicy
    from edgepack.fleet.monitor import judge
    b = Board(name="x", host="h", latency_budget_ms=5.0, ram_budget_mb=100)
    c = BoardCheck(board="x", release=3, drift=0.1, p90_ms=6.0, baseline_p90_ms=2.0, peak_rss_mb=150)
    assert {f.kind for f in judge(b, c, CheckPolicy())} == {"drift", "latency_budget", "latency_regression", "ram"}
    ok = BoardCheck(board="x", release=3, drift=0.0, p90_ms=0.05, baseline_p90_ms=0.03, peak_rss_mb=50)
    assert judge(b, ok, CheckPolicy()) == []  # +66% but only 0.02 ms: below the noise floor


def test_local_default_board_whole_pipeline(tmp_path):
    """The README's main job on the embedded default: bootstrap, push (full), push (delta), check, report."""
    from agent_helpers import bundle, golden_for, make_onnx, make_pki
    from edgepack.ota.delta import make_delta_bundle
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "root.json").write_text(json.dumps(pki.root_doc))
    m1, m2 = make_onnx(tmp_path / "m1.onnx", seed=1), make_onnx(tmp_path / "m2.onnx", seed=1, drift=0.01)
    (tmp_path / "r2").mkdir()
    r1 = bundle(pki, tmp_path / "r1.bundle", m1, release=1, golden=golden_for(m1, tmp_path / "g1.npz"))
    r2 = bundle(pki, tmp_path / "r2" / "r2.bundle", m2, release=2, golden=golden_for(m2, tmp_path / "g2.npz"))
    make_delta_bundle(r1, r2, tmp_path / "r2" / "r1-r2.bundle", trust=pki.board_trust(True), signer=pki.release[0])
    env = {"EDGEPACK_FLEET_HOME": str(tmp_path / "home")}
    r = cli("fleet", "bootstrap", "--trust-root", str(tmp_path / "root.json"), env=env)
    assert r.returncode == 0, r.stderr
    r = cli("push", str(r1), "--json", env=env)
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)["boards"][0]
    assert (b["board"], b["result"], b["kind"]) == ("local", "committed", "full")
    r = cli("push", str(r2), env=env)  # human output: progress per wave and the final table on stderr
    assert r.returncode == 0 and "canary" in r.stderr and "delta" in r.stderr and "committed" in r.stderr, r.stderr
    r = cli("fleet", "check", "--runs", "10", "--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["boards"][0]["release"] == 2
    html = tmp_path / "report.html"
    r = cli("report", "--html", str(html), env=env)
    assert r.returncode == 0 and 'id="latency"' in html.read_text()
    assert (tmp_path / "home" / "fleet.db").is_file() and (tmp_path / "home" / "boards" / "local" / "state").is_dir()


def test_cli_bad_input_one_line(tmp_path):
    (tmp_path / "bad.toml").write_text("[[boards]]\nname = 'x'\n")
    (tmp_path / "junk.bundle").write_bytes(b"not a bundle")
    for args, code in ((["push", str(tmp_path / "none.bundle")], 2),
                       (["push", str(tmp_path / "junk.bundle")], 2),
                       (["fleet", "status", "--fleet", str(tmp_path / "bad.toml")], 2),
                       (["fleet", "history", "nope", "--fleet", str(tmp_path / "missing.toml")], 2),
                       (["report", "--html", str(tmp_path / "r.html"), "--store", str(tmp_path / "none.db")], 2)):
        r = cli(*args, env={"EDGEPACK_FLEET_HOME": str(tmp_path / "home")})
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_new_release_with_identical_bytes_is_installed(tmp_path):
    """'current' means this very release is active; a re-release of the same model moves the
    board's release number on instead of being skipped."""
    from agent_helpers import bundle, golden_for, make_onnx, make_pki
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "root.json").write_text(json.dumps(pki.root_doc))
    m = make_onnx(tmp_path / "m.onnx", seed=1)
    g = golden_for(m, tmp_path / "g.npz")
    r1 = bundle(pki, tmp_path / "r1.bundle", m, release=1, golden=g)
    (tmp_path / "r2").mkdir()
    r2 = bundle(pki, tmp_path / "r2" / "r2.bundle", m, release=2, golden=g)
    env = {"EDGEPACK_FLEET_HOME": str(tmp_path / "home")}
    assert cli("fleet", "bootstrap", "--trust-root", str(tmp_path / "root.json"), env=env).returncode == 0
    assert cli("push", str(r1), env=env).returncode == 0
    again = json.loads(cli("push", str(r1), "--json", env=env).stdout)["boards"][0]
    assert again["result"] == "current"  # the same release: nothing to do
    r = cli("push", str(r2), "--json", env=env)
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)["boards"][0]
    assert (b["result"], b["release_after"]) == ("committed", 2)
