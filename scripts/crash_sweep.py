#!/usr/bin/env python
"""SIGKILL ``edgepack-agent install`` at every durability boundary (>= 200) and during the trial.

The full sweep behind issue 12 (CI runs a sample: tests/test_agent_crash.py). The board holds
release 1 (slot a) and release 2 (slot b, active); installing release 3 (a bundle of 60 extra
files, so a few hundred boundaries) is killed at boundary N for every N, with the trial in its
own process (the default). In addition ``--trial-kills`` installs are SIGKILLed from outside
while their trial process runs. After every kill:

* no trial process of that board is left (PR_SET_PDEATHSIG + own process group),
* ``edgepack-agent recover`` (a real process) exits 0,
* the active slot hash-verifies and its model runs, the counter equals the active release,
  no staging or temp file is left, ``current`` points at the active slot.

    PYTHONPATH=. python scripts/crash_sweep.py [--json out.json] [--workers 2]

Prints ``N kill points, N failures, N trial processes left`` and exits non-zero on any failure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    from agent_helpers import active_ok, agent_cmd, golden_for, init_board, make_onnx, make_pki, multi_file_bundle
    from device_agent.install import Agent
    from test_agent_crash import trial_processes, wait_gone

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extras", type=int, default=60, help="extra files in the bundle (more boundaries)")
    ap.add_argument("--trial-kills", type=int, default=10, help="external SIGKILLs during the trial")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="edgepack-crash-"))
    try:
        pki = make_pki(d / "pki")
        bundles = {}
        for r in (1, 2, 3):
            (d / f"m{r}").mkdir()
            m = make_onnx(d / f"m{r}" / "mlp.onnx", seed=0, drift=0.002 * (r - 1))
            bundles[r] = multi_file_bundle(pki, d / f"r{r}.bundle", m, release=r, golden=golden_for(m, d / f"g{r}.npz", n=4),
                                           extras=args.extras)
        tpl = d / "tpl"
        a = init_board(tpl, pki, threads=1, trial_in_process=True, trial_runs=2)
        a.install(bundles[1])
        a.install(bundles[2])
        cfg = a.board()
        a.sd.save_board(cfg.__class__(**{**cfg.__dict__, "trial_in_process": False, "trial_runs": 3}))

        def crash(dest: Path, n: int, log: Path | None = None) -> int:
            shutil.copytree(tpl, dest, symlinks=True)
            env = {**os.environ, "EDGEPACK_AGENT_CRASH_AT": str(n), "PYTHONPATH": str(ROOT)}
            if log:
                env["EDGEPACK_AGENT_BOUNDARY_LOG"] = str(log)
            return subprocess.run(agent_cmd(dest, "install", str(bundles[3])), env=env, capture_output=True,
                                  cwd=ROOT, timeout=300).returncode

        def check(board: Path) -> tuple[int, list[str]]:
            errs = []
            left = wait_gone(board, 5.0)
            if left:
                errs.append(f"trial processes left: {left}")
            r = subprocess.run(agent_cmd(board, "recover"), capture_output=True, text=True, cwd=ROOT, timeout=120,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
            if r.returncode != 0:
                errs.append(f"recover exit {r.returncode}: {r.stderr.strip()[-200:]}")
            try:
                release, slot = active_ok(board)
                if Agent(board).sd.load().counter != release:
                    errs.append(f"counter != active release {release}")
                if (board / "current").resolve() != (board / "slots" / slot).resolve():
                    errs.append("current does not point at the active slot")
                junk = [p.name for p in board.rglob("*") if ".tmp-" in p.name or ".edgepack-partial-" in p.name]
                if junk:
                    errs.append(f"leftovers {junk[:3]}")
            except Exception as e:  # noqa: BLE001
                errs.append(f"{type(e).__name__}: {e}")
            return len(left), errs

        log = d / "boundaries.json"
        t0 = time.perf_counter()
        if crash(d / "count", 0, log) != 0:
            print("the uninterrupted install failed", file=sys.stderr)
            return 2
        labels = json.loads(log.read_text())["labels"]
        k = len(labels)
        results = []

        def one(n: int) -> dict:
            board = d / f"n{n}"
            rc = crash(board, n)
            left, errs = check(board)
            if rc != -signal.SIGKILL:
                errs.insert(0, f"installer not killed (exit {rc})")
            shutil.rmtree(board, ignore_errors=True)
            return {"point": n, "label": labels[n - 1], "errors": errs, "trial_left": left}

        with ThreadPoolExecutor(max_workers=args.workers) as ex:
            results += list(ex.map(one, range(1, k + 1)))

        for i in range(args.trial_kills):
            board = d / f"t{i}"
            shutil.copytree(tpl, board, symlinks=True)
            c = Agent(board).board()
            Agent(board).sd.save_board(c.__class__(**{**c.__dict__, "trial_runs": 500_000}))
            p = subprocess.Popen(agent_cmd(board, "install", str(bundles[3])), cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
            end = time.monotonic() + 120
            while not trial_processes(board) and p.poll() is None and time.monotonic() < end:
                time.sleep(0.01)
            time.sleep(0.1 * (i % 5))  # at different moments of the trial
            started = bool(trial_processes(board))
            p.kill()
            p.wait()
            left, errs = check(board)
            if not started:
                errs.insert(0, "trial never started")
            results.append({"point": f"trial+{0.1 * (i % 5):.1f}s", "label": "during trial", "errors": errs,
                            "trial_left": left})
            shutil.rmtree(board, ignore_errors=True)

        bad = [r for r in results if r["errors"]]
        for r in bad[:20]:
            print(f"  point {r['point']} ({r['label']}): {'; '.join(r['errors'])}")
        left = sum(r["trial_left"] for r in results)
        secs = time.perf_counter() - t0
        if args.json:
            args.json.write_text(json.dumps({"boundaries": k, "kill_points": len(results), "failures": len(bad),
                                             "trial_processes_left": left, "seconds": round(secs, 1),
                                             "results": results}, indent=1))
        print(f"{k} boundaries + {args.trial_kills} kills during the trial in {secs:.0f} s")
        print(f"{len(results)} kill points, {len(bad)} failures, {left} trial processes left")
        return 0 if not bad and not left else 1
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
