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
    from device_agent._internal.encoding import utc_now  # noqa: F401
    from edgepack.delta import make_delta_bundle
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
