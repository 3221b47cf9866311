"""Crash injection: SIGKILL a real installer process at every durability boundary of an install.

The board starts with release 1 (slot a) and release 2 (slot b, active, committed), so installing
release 3 wipes a populated slot, extracts a multi-file bundle into it, switches, runs the trial
and commits. ``EDGEPACK_AGENT_CRASH_AT=N`` makes the agent SIGKILL itself at the N-th boundary
(every write-open, write chunk, fsync, rename, unlink, mkdir, rmdir, pointer switch and state
write; see device_agent/slots.py). After each crash: recover() as the next start would, the active
release is 2 or 3 and hash-verifies and runs, the state parses and is consistent, no staging
or temp files remain, and installing release 4 succeeds.

Note: SIGKILL loses no page cache, so this proves the transaction's crash consistency, not the
disk's behaviour on power loss; that is what the fsyncs are for.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent_helpers import ROOT, active_ok, agent_cmd, golden_for, init_board, make_onnx, make_pki, multi_file_bundle
from device_agent.install import Agent

EXTRAS = 60
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash")
    pki = make_pki(d / "pki")
    bundles = {}
    for r in (1, 2, 3, 4):
        (d / f"m{r}").mkdir()
        m = make_onnx(d / f"m{r}" / "mlp.onnx", seed=0, drift=0.002 * (r - 1))
        g = golden_for(m, d / f"g{r}.npz", n=4)
        bundles[r] = multi_file_bundle(pki, d / f"r{r}.bundle", m, release=r, golden=g, extras=EXTRAS)
    tpl = d / "template"
    a = init_board(tpl, pki, threads=1, trial_in_process=True, trial_runs=2)
    a.install(bundles[1])
    a.install(bundles[2])
    return d, tpl, bundles


def _crash_run(tpl: Path, dest: Path, bundle: Path, n: int, log: Path | None = None) -> int:
    shutil.copytree(tpl, dest, symlinks=True)
    env = {**os.environ, "EDGEPACK_AGENT_CRASH_AT": str(n)}
    if log:
        env["EDGEPACK_AGENT_BOUNDARY_LOG"] = str(log)
    r = subprocess.run(agent_cmd(dest, "install", str(bundle)), env=env, capture_output=True, cwd=ROOT, timeout=120)
    return r.returncode


def test_sigkill_at_every_boundary(world, tmp_path):
    d, tpl, bundles = world
    log = tmp_path / "boundaries.json"
    assert _crash_run(tpl, tmp_path / "count", bundles[3], 0, log) == 0
    labels = json.loads(log.read_text())["labels"]
    k = len(labels)
    assert k >= 200, f"only {k} boundaries"
    print(f"{k} crash points")
    assert active_ok(tmp_path / "count")[0] == 3
    shutil.rmtree(tmp_path / "count")

    failures: list[str] = []
    seen = {2: 0, 3: 0}

    def one(n: int) -> tuple[int, int]:
        return n, _crash_run(tpl, tmp_path / f"n{n}", bundles[3], n)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for n, rc in pool.map(one, range(1, k + 1)):
            where = f"N={n} ({labels[n - 1]})"
            board = tmp_path / f"n{n}"
            try:
                assert rc == -9, f"installer was not killed (exit {rc})"
                release, slot = active_ok(board)
                seen[release] += 1
                st = Agent(board).sd.load()
                assert st.counter == release, f"counter {st.counter} but release {release} active"
                leftovers = [p.name for p in board.rglob("*") if ".tmp-" in p.name or ".edgepack-partial-" in p.name]
                assert not leftovers, leftovers
                assert (board / "current").resolve() == (board / "slots" / slot).resolve()
                Agent(board).install(bundles[4], trial_in_process=True)
                assert active_ok(board)[0] == 4
            except Exception as e:  # collect every failure, not just the first
                failures.append(f"{where}: {type(e).__name__}: {e}")
            shutil.rmtree(board, ignore_errors=True)
    assert not failures, "\n".join(failures[:20])
    assert seen[2] > 0 and seen[3] > 0, seen  # crashes landed on both sides of the commit


def test_sigkill_during_delta_install(tmp_path):
    """Same invariants for a delta bundle applied against the active slot (fewer files: fast)."""
    from device_agent.durable import utc_now  # noqa: F401
    from edgepack.ota.delta import make_delta_bundle
    pki = make_pki(tmp_path / "pki")
    b = {}
    for r in (1, 2, 3):
        (tmp_path / f"m{r}").mkdir()
        m = make_onnx(tmp_path / f"m{r}" / "mlp.onnx", seed=0, drift=0.002 * (r - 1))
        g = golden_for(m, tmp_path / f"g{r}.npz", n=4)
        b[r] = multi_file_bundle(pki, tmp_path / f"r{r}.bundle", m, release=r, golden=g, extras=5, same_extras=True)
    d = make_delta_bundle(b[1], b[2], tmp_path / "d12.bundle", trust=pki.board_trust(), signer=pki.release[0])
    assert not d.fallback and any(f["encoding"] == "base-copy" for f in d.files)
    tpl = tmp_path / "tpl"
    init_board(tpl, pki, threads=1, trial_in_process=True, trial_runs=2).install(b[1])
    log = tmp_path / "log.json"
    assert _crash_run(tpl, tmp_path / "count", d.path, 0, log) == 0
    k = json.loads(log.read_text())["count"]
    assert active_ok(tmp_path / "count")[0] == 2
    failures = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for n, rc in pool.map(lambda n: (n, _crash_run(tpl, tmp_path / f"n{n}", d.path, n)), range(1, k + 1)):
            board = tmp_path / f"n{n}"
            try:
                assert rc == -9, f"exit {rc}"
                release, _ = active_ok(board)
                assert release in (1, 2) and Agent(board).sd.load().counter == release
                Agent(board).install(b[3], trial_in_process=True)
                assert active_ok(board)[0] == 3
            except Exception as e:
                failures.append(f"N={n}: {type(e).__name__}: {e}")
            shutil.rmtree(board, ignore_errors=True)
    assert not failures, "\n".join(failures[:20])


# --------------------------------------------------------------------------- the trial child dies with the installer
def trial_processes(state: Path) -> list[int]:
    """Pids of trial children (marked ``edgepack-trial`` in argv) working on ``state``."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if b"edgepack-trial" in cmd and str(state).encode() in cmd:
            out.append(int(p.name))
    return out


def wait_gone(state: Path, seconds: float = 10.0) -> list[int]:
    import time
    end = time.monotonic() + seconds
    while (left := trial_processes(state)) and time.monotonic() < end:
        time.sleep(0.05)
    return left


@pytest.fixture(scope="module")
def child_world(world, tmp_path_factory):
    """The crash world's template, but the trial runs in its own process (the default)."""
    d, tpl, bundles = world
    ctpl = tmp_path_factory.mktemp("child") / "tpl"
    shutil.copytree(tpl, ctpl, symlinks=True)
    a = Agent(ctpl)
    cfg = a.board()
    a.sd.save_board(cfg.__class__(**{**cfg.__dict__, "trial_in_process": False, "trial_runs": 3}))
    return ctpl, bundles


def test_sigkill_during_trial_leaves_no_trial_process(child_world, tmp_path):
    import signal
    import time
    from agent_helpers import run_agent
    tpl, bundles = child_world
    for i in range(3):
        board = tmp_path / f"k{i}"
        shutil.copytree(tpl, board, symlinks=True)
        cfg = Agent(board).board()  # a long trial (~10 s): only a kill can end it within the check below
        Agent(board).sd.save_board(cfg.__class__(**{**cfg.__dict__, "trial_runs": 500_000}))
        p = subprocess.Popen(agent_cmd(board, "install", str(bundles[3])), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 60
        while not trial_processes(board) and p.poll() is None and time.monotonic() < end:
            time.sleep(0.01)
        assert trial_processes(board), "the trial child never started"
        time.sleep(0.5)  # let the child get into its inference loop
        assert trial_processes(board)
        p.send_signal(signal.SIGKILL) if p.poll() is None else None
        p.wait()
        assert not wait_gone(board, 2.0), "trial process outlived the SIGKILLed installer"
        code, out, err = run_agent(board, "recover")
        assert code == 0, err
        assert active_ok(board)[0] == 2 and Agent(board).sd.load().counter == 2


def test_sigkill_sample_with_trial_child_then_recover(child_world, tmp_path):
    """CI-sized sample of the crash points with the trial in its own process; the full sweep
    (every boundary, >= 200) is scripts/crash_sweep.py."""
    from agent_helpers import run_agent
    tpl, bundles = child_world
    log = tmp_path / "log.json"
    assert _crash_run(tpl, tmp_path / "count", bundles[3], 0, log) == 0
    k = json.loads(log.read_text())["count"]
    points = sorted({1, k, *range(1, k + 1, max(1, k // 12))})
    failures = []
    for n in points:
        board = tmp_path / f"n{n}"
        try:
            rc = _crash_run(tpl, board, bundles[3], n)
            assert rc == -9, f"exit {rc}"
            assert not wait_gone(board), "trial process left running"
            code, _, err = run_agent(board, "recover")
            assert code == 0, err
            release, _ = active_ok(board)
            assert release in (2, 3) and Agent(board).sd.load().counter == release
        except Exception as e:
            failures.append(f"N={n}: {type(e).__name__}: {e}")
        shutil.rmtree(board, ignore_errors=True)
    assert not failures, "\n".join(failures)
