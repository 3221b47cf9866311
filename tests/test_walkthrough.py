"""The README's newcomer walkthrough, run command by command as written (issue 13), each under three
flags thanks to edgepack.toml; then what a user does next in the same project: the plan of a second
release as a delta, diff, status from a subfolder and --watch, rollback, abort, doctor."""
from __future__ import annotations

import json
import os

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from conftest import small_cnn

ROOT = Path(__file__).resolve().parents[1]


def readme_walkthrough() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- walkthrough -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [ln.split("#", 1)[0].strip() for ln in block.strip().splitlines() if ln.split("#", 1)[0].strip()]


def ep(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(ROOT), "EDGEPACK_EMULATED_BOARD": "0"}
    env.pop("EDGEPACK_PROJECT", None)
    return subprocess.run([sys.executable, "-m", "edgepack.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def data_for(folder: Path) -> None:
    m = small_cnn(folder / "model.onnx")
    x = np.random.default_rng(3).normal(0, 1, (96, 1, 8, 8)).astype(np.float32)
    y = ort.InferenceSession(str(m)).run(None, {"x": x})[0].argmax(1)
    np.savez(folder / "calib.npz", inputs=x[:48])
    np.savez(folder / "eval.npz", inputs=x[48:], labels=y[48:])


def test_readme_walkthrough_then_the_next_release(tmp_path):
    cmds = readme_walkthrough()
    assert cmds[0].startswith("edgepack init") and cmds[-1].startswith("edgepack report")
    cwd = tmp_path
    for c in cmds:
        argv = shlex.split(c)
        if argv[0] == "cd":
            cwd = cwd / argv[1]
            data_for(cwd)
            continue
        assert argv[0] == "edgepack"
        flags = [a for a in argv if a.startswith("-")]
        assert len(flags) <= 3, f"{c}: {len(flags)} flags; the project file should carry the rest"
        r = ep(argv[1:], cwd)
        ok = (0, 4) if argv[1] == "quantize" else (0,)  # 4: the budget was missed, the model still written
        assert r.returncode in ok, f"{c}\n{r.stdout}\n{r.stderr}"
    proj = tmp_path / "demo"
    assert (proj / "edgepack.toml").is_file() and (proj / "out" / "fleet.html").is_file()
    assert oct((proj / "keys" / "release-1.key").stat().st_mode & 0o777) == "0o600"

    # status from a subfolder: the project's board, not an empty one under the cwd
    (proj / "sub").mkdir()
    r = ep(["fleet", "status", "--json"], proj / "sub")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["board"], x["release"], x["last_install"]) for x in rows] == [("local", 1, "committed")]
    assert not (proj / "sub" / ".edgepack").exists()
    r = ep(["fleet", "status", "--watch", "0.2", "--count", "2"], proj)
    assert r.returncode == 0 and r.stderr.count("fleet (1 boards)") == 2, r.stderr

    # release 2: a re-trained model under another file name still goes out as a delta
    small_cnn(proj / "model-v2.onnx", seed=0)
    import onnx
    from onnx import numpy_helper
    mv = onnx.load(str(proj / "model-v2.onnx"))
    for t in mv.graph.initializer:
        if t.name == "wf":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.01, "wf"))
    onnx.save(mv, str(proj / "model-v2.onnx"))
    r = ep(["quantize", "model-v2.onnx", "--calib", "calib.npz", "--eval", "eval.npz"], proj)
    assert r.returncode in (0, 4), r.stderr
    assert ep(["bundle", "out/model-v2-int8.onnx", "--release", "2"], proj).returncode == 0
    r = ep(["delta", "out/demo-r1.bundle", "out/demo-r2.bundle", "-o", "out/r1-r2.bundle", "--json"], proj)
    d = json.loads(r.stdout)
    assert r.returncode == 0 and not d["fallback_to_full"] and d["ratio"] < 0.8 and not d["warnings"], r.stderr
    plan = json.loads(ep(["push", "out/demo-r2.bundle", "--dry-run", "--json"], proj).stdout)
    assert plan["dry_run"] and [(b["board"], b["kind"], b["holds_release"]) for b in plan["boards"]] == \
        [("local", "delta", 1)]
    assert plan["bytes_total"] < plan["full_bytes"] and any("canary" in g for g in plan["gates"])

    r = ep(["diff", "out/demo-r1.bundle", "out/demo-r2.bundle", "--json"], proj)
    df = json.loads(r.stdout)
    assert r.returncode == 0 and (df["old"]["release"], df["new"]["release"]) == (1, 2)
    changed = {t["tensor"] for t in df["tensors"]}
    assert any(n.startswith("wf") for n in changed) and not any(n.startswith("w1") for n in changed)
    assert df["golden_samples"] > 0 and 0 <= df["agreement"] <= 1 and df["latency_ms"]["new"] > 0

    assert ep(["push", "out/demo-r2.bundle"], proj).returncode == 0
    r = ep(["rollback", "--reason", "walkthrough", "--json"], proj)
    assert r.returncode == 0, r.stderr
    assert [(x["release_before"], x["release_after"]) for x in json.loads(r.stdout)] == [(2, 1)]

    r = ep(["abort", "--reason", "stop", "--json"], proj)
    assert r.returncode == 0 and Path(json.loads(r.stdout)["abort_file"]).read_text().strip() == "stop"

    r = ep(["doctor", "--json"], proj)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["ok"], r.stdout
    assert {c["area"] for c in doc["checks"]} >= {"host", "targets", "keys", "board"}
    os.chmod(proj / "keys" / "release-1.key", 0o644)
    r = ep(["doctor", "--no-boards", "--json"], proj)
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and any("chmod 600" in c["advice"] for c in doc["checks"] if c["status"] == "fail")


def test_abort_halts_a_push_before_its_next_wave(tmp_path):
    """The library side of `edgepack abort`: push asks before each wave after the canary."""
    sys.path.insert(0, str(ROOT))
    from edgepack.fleet import Fleet, Policy, push
    from edgepack.fleet.control import abort_requested, request_abort

    r = ep(["init", "proj", "-t", "rpi4-2gb"], tmp_path)  # the default local board's profile
    assert r.returncode == 0, r.stderr
    proj = tmp_path / "proj"
    data_for(proj)
    assert ep(["quantize", "model.onnx", "--calib", "calib.npz", "--eval", "eval.npz", "--threads", "1"],
              proj).returncode in (0, 4)
    assert ep(["bundle", "out/model-int8.onnx", "--release", "1"], proj).returncode == 0
    home = tmp_path / "home"
    two = Fleet.default(home)
    from dataclasses import replace
    b = two.boards[0]
    two.boards = [b, replace(b, name="second", state=str(home / "boards/second/state"),
                             incoming=str(home / "boards/second/incoming"))]
    from edgepack.fleet import bootstrap
    assert all(x.ok for x in bootstrap(two, trust_root=proj / "keys" / "root.json"))
    request_abort(home / "fleet.db", "operator said stop")
    rep = push(proj / "out" / "demo-r1.bundle" if (proj / "out" / "demo-r1.bundle").exists()
               else proj / "out" / "proj-r1.bundle", two, policy=Policy(canary=1, wave_size=1),
               abort=lambda: abort_requested(home / "fleet.db"))
    assert rep.halted and "aborted before wave 1: operator said stop" in rep.halt_reason
    assert [x.result for x in rep.boards] == ["committed", "not_started"] or rep.boards[1].result != "committed"
    assert rep.exit_code == 25

