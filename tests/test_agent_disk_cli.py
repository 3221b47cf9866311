"""Full disk (a real 2 MiB tmpfs), the zipapp build, and the board-side import rules."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from agent_helpers import ROOT, TARGET, active_ok, bundle, golden_for, init_board, make_onnx, make_pki, write_trust
from device_agent.agent_errors import BudgetExceeded, DiskFull
from device_agent.install import Agent


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tmpfs(tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("full-disk test needs root to mount a 2 MiB tmpfs (mount -t tmpfs -o size=2m)")
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): needs CAP_SYS_ADMIN")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_full_disk(tmp_path, tmpfs, pki, monkeypatch):
    small = make_onnx(tmp_path / "mlp.onnx", seed=0)
    r1 = bundle(pki, tmp_path / "r1.bundle", small, release=1, golden=golden_for(small, tmp_path / "g1.npz"))
    (tmp_path / "big").mkdir()
    big = make_onnx(tmp_path / "big" / "mlp.onnx", seed=0, hidden=6000)  # ~1 MiB of weights
    r2 = bundle(pki, tmp_path / "r2.bundle", big, release=2, golden=golden_for(big, tmp_path / "g2.npz"))
    (tmp_path / "huge").mkdir()
    huge = make_onnx(tmp_path / "huge" / "mlp.onnx", seed=0, hidden=20000)  # ~3 MiB: never fits
    r3 = bundle(pki, tmp_path / "r3.bundle", huge, release=3, golden=golden_for(huge, tmp_path / "g3.npz"))
    board = tmpfs / "board"
    a = init_board(board, pki, trial_in_process=True)
    a.install(r1)

    def snapshot() -> list[str]:
        return sorted(str(p.relative_to(board)) for p in board.rglob("*"))

    before = snapshot()
    with pytest.raises(BudgetExceeded, match="free"):  # refused by the free-space check, nothing written
        a.install(r3)
    assert snapshot() == before

    filler = tmpfs / "filler"
    free = a.free_bytes()
    filler.write_bytes(b"\0" * (free - 600 * 1024))  # leave ~600 KiB: r2 passes nothing but the write fails
    monkeypatch.setattr(Agent, "free_bytes", lambda self: 1 << 40)  # pretend the space check passed
    with pytest.raises(DiskFull, match="disk full"):
        a.install(r2)
    assert snapshot() == before  # the partial slot is gone, state.json unchanged in shape
    assert active_ok(board) == (1, "a")
    st = a.sd.load()
    assert st.history[-1]["event"] == "install-failed" and st.writing is None
    filler.unlink()
    monkeypatch.undo()
    a.install(r2)
    assert active_ok(board) == (2, "b")


def test_zipapp_build_and_run(tmp_path, pki):
    """`edgepack agent build` makes a pyz that holds only device_agent/ and runs a full install."""
    from edgepack.fleet.agent_zipapp import build_zipapp
    pyz = build_zipapp(tmp_path / "edgepack-agent.pyz")
    with zipfile.ZipFile(pyz.path) as z:
        names = z.namelist()
    assert "__main__.py" in names and all(n == "__main__.py" or n.startswith("device_agent/") for n in names)
    assert not any("__pycache__" in n for n in names)
    assert pyz.bytes < 200 * 1024

    m = make_onnx(tmp_path / "mlp.onnx", seed=0)
    r1 = bundle(pki, tmp_path / "r1.bundle", m, release=1, golden=golden_for(m, tmp_path / "g.npz"))
    root, _ = write_trust(pki)
    state = tmp_path / "board"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(pyz.path), "--state", str(state), *args], capture_output=True,
                              text=True, cwd=tmp_path, env=env, timeout=120)

    import json
    v = json.loads(run("version").stdout)
    assert v["path"].startswith(str(pyz.path)), v  # the agent ran from the zipapp, not the checkout
    assert run("init", "--target", TARGET, "--trust-root", str(root)).returncode == 0
    r = run("install", str(r1))  # default trial mode: a child process, which must also import from the pyz
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["trial"]["passed"]
    assert active_ok(state) == (1, "a")


def test_cli_build_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgepack.cli", "agent", "build", "-o", str(tmp_path / "a.pyz"), "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    import json
    assert json.loads(r.stdout)["files"] > 10
    r = subprocess.run([sys.executable, "-m", "edgepack.cli", "agent", "build", "-o", str(tmp_path / "a.zip")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and ".pyz" in r.stderr


def test_agent_imports_stay_light():
    """Importing the whole agent CLI and install path pulls in no runtime and nothing of the host side."""
    code = ("import sys, device_agent.cli, device_agent.install, device_agent.benchmark\n"
            "heavy = [m for m in ('onnxruntime', 'ai_edge_litert', 'openvino', 'edgepack', 'onnx', 'typer') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
