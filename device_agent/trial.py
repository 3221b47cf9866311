"""The trial: load a freshly written slot in the board's runtime and run its health check.

It runs as its own process (``python -m device_agent.trial STATE SLOT``, started by
:func:`run_trial_process`): own process group (killed as a whole), rlimits (CPU, files, address
space), an RSS watchdog at the board's RAM budget, and PR_SET_PDEATHSIG, so a model that crashes
the runtime or eats the board's memory fails its trial instead of taking the agent down.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .agent_errors import AcceleratorUnavailable, AgentError, UsageError
from .budgets import MiB, peak_rss_mb, rss_mb
from .health import HealthReport, Thresholds, check
from .runtime import choose_runtime, load_model
from .slots import Slots
from .state import BoardConfig, StateDir

TRIAL_TIMEOUT_S = float(os.environ.get("EDGEPACK_AGENT_TRIAL_TIMEOUT", "600"))
TRIAL_RSS_SLACK_MB = float(os.environ.get("EDGEPACK_AGENT_TRIAL_RSS_SLACK_MB", "160"))  # interpreter + numpy + runtime
TRIAL_MAX_OUTPUT = 1 << 20
_MARK = "edgepack-trial"


def trial_rss_limit_mb(cfg: BoardConfig) -> float:
    """RSS the trial process may reach: the board's RAM budget plus the interpreter's own baseline."""
    return cfg.ram_budget_mb + TRIAL_RSS_SLACK_MB


def _child_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return 0.0


def _trial_preexec(parent: int, cfg: BoardConfig, rss_mb: float):
    """Runs in the child between fork and exec: die with the agent, and cap what the trial may use."""
    def setup() -> None:
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: SIGKILL when the agent dies
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:  # the agent died before prctl took effect
            os._exit(111)
        lim = [(resource.RLIMIT_CPU, cfg.trial_cpu_s), (resource.RLIMIT_NOFILE, cfg.trial_max_files),
               (resource.RLIMIT_CORE, 0)]
        # address space: a hard backstop well above the RSS limit (runtimes reserve virtual memory
        # for thread stacks and arenas they never touch); the RSS watchdog enforces the budget
        lim.append((resource.RLIMIT_AS, int((4 * rss_mb + 4096) * MiB)))
        for res, v in lim:
            try:
                soft, hard = resource.getrlimit(res)
                v = v if hard == resource.RLIM_INFINITY else min(v, hard)
                resource.setrlimit(res, (v, v))
            except (ValueError, OSError):
                pass
    return setup


def _parse_trial_output(out: str) -> dict[str, Any] | None:
    """The child's last stdout line as a trial report, or None if it is not a well-formed one."""
    lines = out.strip().splitlines()
    if not lines:
        return None
    try:
        rep = json.loads(lines[-1])
    except ValueError:
        return None
    if not isinstance(rep, dict) or not isinstance(rep.get("passed"), bool) or not isinstance(rep.get("reason"), str):
        return None
    return rep


def run_trial_process(state_dir: Path, slot: str, cfg: BoardConfig) -> dict[str, Any]:
    """The trial in a child: own process group (killed as a whole), rlimits (CPU, files, address
    space), an RSS watchdog at the board's RAM budget, and PR_SET_PDEATHSIG so a SIGKILLed agent
    never leaves a trial running. A child that dies, overruns or prints no report failed."""
    pkg_parent = str(Path(__file__).resolve().parent.parent)  # the agent may run from a zipapp or a folder
    limit = trial_rss_limit_mb(cfg)
    env = {**os.environ, "EDGEPACK_AGENT_TRIAL": _MARK, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([pkg_parent, *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("EDGEPACK_AGENT_CRASH_AT", None)
    env.pop("EDGEPACK_AGENT_BOUNDARY_LOG", None)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "device_agent.trial", str(state_dir), slot, _MARK], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                preexec_fn=_trial_preexec(os.getpid(), cfg, limit))
    except OSError as e:
        return {"passed": False, "reason": f"trial process could not start ({e.strerror})"}
    peak = [0.0]
    killed: list[str] = []

    def kill(why: str) -> None:
        if not killed:
            killed.append(why)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def watch() -> None:
        t_end = time.monotonic() + TRIAL_TIMEOUT_S
        while proc.poll() is None:
            rss = _child_rss_mb(proc.pid)
            peak[0] = max(peak[0], rss)
            if rss > limit:
                kill(f"trial exceeded the board's RAM budget (RSS {rss:.0f} MiB > {limit:.0f} MiB)")
            elif time.monotonic() > t_end:
                kill(f"trial timed out after {TRIAL_TIMEOUT_S:.0f} s")
            time.sleep(0.02)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        out_b, err_b = proc.communicate()
    except BaseException:
        kill("agent interrupted")
        proc.wait()
        raise
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing the trial started outlives it
        except OSError:
            pass
    w.join(1.0)
    out, err = out_b[-TRIAL_MAX_OUTPUT:].decode(errors="replace"), err_b[-4096:].decode(errors="replace")
    if killed:
        return {"passed": False, "reason": killed[0], "peak_rss_mb": round(peak[0], 1)}
    if proc.returncode != 0:
        rc = proc.returncode
        tail = (err.strip().splitlines() or [""])[-1][:200]
        return {"passed": False, "reason": f"trial process died (exit {rc}"
                f"{', signal ' + str(-rc) if rc < 0 else ''}) {tail}".strip()}
    rep = _parse_trial_output(out)
    if rep is None:
        return {"passed": False, "reason": "trial process printed no well-formed report"}
    hwm = rep.get("peak_rss_mb")
    if isinstance(hwm, (int, float)) and hwm > limit:
        return {**rep, "passed": False,
                "reason": f"trial exceeded the board's RAM budget (peak RSS {hwm:.0f} MiB > {limit:.0f} MiB)"}
    return rep


def trial_report(state_dir: Path, slot: str, cfg: BoardConfig) -> dict[str, Any]:
    """Hash-verify the slot, load its model, run the health check. A dict with passed/reason."""
    slots = Slots(state_dir)
    rss0 = rss_mb()
    try:
        info = slots.verify(slot)
        accel = board_accelerator(cfg, info.settings)
        rt = choose_runtime(info.model_path, cfg.runtimes, info.settings.get("runtime"))
        sess = load_model(info.model_path, rt, threads=cfg.threads, accelerator=accel)
    except AgentError as e:
        return {"passed": False, "reason": f"model failed to load: {e}", "error_type": type(e).__name__}
    rss1 = rss_mb()
    from .machine import EMULATOR, latency_source
    src = latency_source()  # an emulator's clock is not the board's: no latency budget there
    try:
        th = Thresholds.from_settings(info.settings, cfg.latency_budget_ms if src != EMULATOR else None,
                                      floors=cfg.health_floors)
    except UsageError as e:
        return {"passed": False, "reason": f"health thresholds refused: {e}", "error_type": "UsageError"}
    try:
        rep: HealthReport = check(sess, info.file("golden"), th, runs=cfg.trial_runs)
    except AgentError as e:
        return {"passed": False, "reason": f"health check could not run: {e}", "error_type": type(e).__name__}
    return {**rep.to_json(), **sess.describe(), "load_seconds": sess.load_seconds,
            "model_rss_mb": round(rss1 - rss0, 2), "peak_rss_mb": round(peak_rss_mb(), 2), "latency_source": src,
            **({"latency_budget_skipped": cfg.latency_budget_ms} if src == EMULATOR and cfg.latency_budget_ms else {})}


def board_accelerator(cfg: BoardConfig, settings: dict[str, Any]) -> str | None:
    """The EP / delegate to use: the board's own, else one the bundle asks for *by name* that the
    board's allow-list (``accelerators`` in board.json) names. Never a path from a bundle: a
    delegate is native code, so it comes from the board's configuration only."""
    if cfg.accelerator:
        return cfg.accelerator
    want = _settings_accelerator(settings)
    if want is None:
        return None
    if want in cfg.accelerators:
        return want
    raise AcceleratorUnavailable(f"bundle asks for accelerator {want[:80]!r}, which is not on this board's "
                                 "allow-list (board.json 'accelerators'); the board decides which native "
                                 "delegates and execution providers run")


def _settings_accelerator(settings: dict[str, Any]) -> str | None:
    ep = settings.get("execution_provider")
    if isinstance(ep, str) and ep != "CPUExecutionProvider":
        return ep
    eps = settings.get("execution_providers")
    if isinstance(eps, list):
        return next((e for e in eps if isinstance(e, str) and e != "CPUExecutionProvider"), None)
    d = settings.get("delegate")
    return d if isinstance(d, str) else None


def _trial_main(state_dir: str, slot: str) -> None:
    """Entry point of the trial child process: prints one JSON line."""
    sd = StateDir(state_dir)
    print(json.dumps(trial_report(sd.path, slot, sd.board()), default=float))


__all__ = ["run_trial_process", "trial_report", "board_accelerator", "trial_rss_limit_mb", "TRIAL_TIMEOUT_S"]


if __name__ == "__main__":  # python -m device_agent.trial STATE_DIR SLOT edgepack-trial
    _trial_main(sys.argv[1], sys.argv[2])
