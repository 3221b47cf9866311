"""The install transaction, recovery and rollback of one board (state directory).

``Agent.install(bundle)``::

    recover()                          finish/undo whatever a crash interrupted
    open_bundle(...)                   signature, trust root, anti-rollback, expiry, target (header only)
    pre-write checks                   storage + free disk + RAM budgets, runtime compatibility,
                                       delta base == active release, active slot hash-verified
    state.writing = X; wipe slot X     X = the inactive slot (scratch from now on)
    extract(vm, slots/X, base=active)  streamed, verified, fsynced, renamed in (bundle.extract)
    slots/X/.slot.json                 slot complete
    state: active=X, trial={...}       ATOMIC SWITCH (one rename of state.json), then `current` symlink
    trial                              load in the runtime, golden inputs vs reference, latency budget
    pass -> state: trial=None, counter=release, trust=updated        COMMIT
    fail -> state: active=old, trial=None, history gets the reason   ROLLBACK (HealthCheckFailed)

Every state change is one atomic replace of state.json, so after a crash at *any* point the
board is in exactly one of: old release active (new one scratch or never written), or new
release on trial (recover() rolls it back: a trial that did not commit did not pass), or new
release committed. The crash-injection test kills the installer at every boundary to prove it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from .agent_errors import (ActiveSlotCorrupt, AgentError, BudgetExceeded, Busy, DiskFull, HealthCheckFailed, Incompatible,
                           NoRollbackTarget, NotInitialized)
from .bundle import VerifiedManifest, extract, open_bundle
from .errors import RollbackError
from .health import HealthReport, Thresholds, check
from .runtime import choose_runtime, load_model
from .slots import Slots, arm_crash_injection, boundary, disarm_crash_injection
from .state import AgentState, BoardConfig, StateDir, iso, now_utc
from .trust import TrustRoot

MiB = 1 << 20
RUNTIME_BASE_RAM_MB = 48.0  # runtime + agent baseline assumed by the RAM budget check (measured: docs/agent.md)
RAM_MODEL_FACTOR = 1.25     # weights are held once plus arena/prepacking headroom
TRIAL_TIMEOUT_S = float(os.environ.get("EDGEPACK_AGENT_TRIAL_TIMEOUT", "600"))
LOCK_TIMEOUT_S = float(os.environ.get("EDGEPACK_AGENT_LOCK_TIMEOUT", "60"))


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec from the
    parent, so a small agent started by a big process would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class InstallReport:
    status: str  # committed | rolled_back
    release: int
    version: str
    model: str
    kind: str
    slot: str
    previous_slot: str | None
    bundle_bytes: int
    seconds: float
    seconds_verify_write: float
    peak_rss_mb_before_trial: float
    trial: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Agent:
    """One board. Every public method starts with recover(), as the agent does on boot."""

    def __init__(self, state_dir: str | Path | None = None):
        self.sd = StateDir(state_dir)
        self.slots = Slots(self.sd.path)
        self._lock_depth = 0

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive flock on ``state_dir/lock`` for the whole command.

        Without it a ``status`` (which runs recover()) arriving during another process's trial
        would see an uncommitted trial and roll it back. The kernel drops the lock when the
        holder dies, so a crashed installer never blocks the next start.
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        if not self.sd.path.is_dir():
            raise NotInitialized(f"{self.sd.path} does not exist; run `edgepack-agent init --state DIR ...` first")
        fd = os.open(self.sd.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise Busy(f"another agent process holds {self.sd.path}/lock (install or trial running); "
                                   f"waited {LOCK_TIMEOUT_S:.0f} s, try again later") from None
                    time.sleep(0.05)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------- setup
    def init(self, cfg: BoardConfig, trust_root: str | Path, release_keys: str | Path | None = None,
             force: bool = False) -> dict[str, Any]:
        """Write board.json and an empty state.json holding the flashed trust root."""
        tr = TrustRoot.from_files(trust_root, release_keys)  # refuses a root without its threshold
        self.sd.path.mkdir(parents=True, exist_ok=True)
        with self.locked():
            return self._init(cfg, tr, force)

    def _init(self, cfg: BoardConfig, tr: TrustRoot, force: bool) -> dict[str, Any]:
        self.slots.ensure()
        self.sd.save_board(cfg)
        if self.sd.state_file.exists() and not force:
            st = self.sd.load()
            st.log("reconfigure", target=cfg.target)
        else:
            st = AgentState(trust=tr.to_documents())
            st.log("init", target=cfg.target, root_version=tr.root.version)
        self.sd.save(st)
        return {"state_dir": str(self.sd.path), "board": cfg.to_json(), "counter": st.counter}

    def board(self) -> BoardConfig:
        return self.sd.board()

    def trust(self, st: AgentState) -> TrustRoot:
        t = st.trust
        if not t or "root" not in t:
            raise NotInitialized("state.json holds no trust root; run `edgepack-agent init --trust-root ROOT.json`")
        tr = TrustRoot.from_bytes(t["root"], t.get("release_keys"))
        return tr.with_release_keys_floor(int(t.get("release_keys_floor") or 0))

    # ------------------------------------------------------------------- recovery
    def recover(self) -> dict[str, Any]:
        with self.locked():
            return self._recover()

    def _recover(self) -> dict[str, Any]:
        """Bring the state dir back to a consistent state after a crash. Idempotent; cheap.

        * temp files and extractor staging dirs are removed;
        * a trial that never committed is rolled back (it did not pass, so it does not run);
        * a slot that was being written is wiped (it was scratch);
        * an active slot that lost files is replaced by the previous one if that one is good;
        * the ``current`` symlink is re-pointed at the active slot.
        """
        st = self.sd.load()
        actions: list[str] = []
        self.slots.ensure()
        actions += [f"removed {p}" for p in self.slots.clean_partials()]
        changed = False
        if st.trial:
            tr = st.trial
            st.active, st.previous, st.trial = tr.get("previous"), None, None
            st.log("rollback", release=tr.get("release"), slot=tr.get("slot"), to_slot=st.active,
                   reason="interrupted trial: the agent stopped before the new release passed its health check")
            actions.append(f"rolled back interrupted trial of release {tr.get('release')}")
            changed = True
        if st.writing and st.writing != st.active:
            if self.slots.dir(st.writing).exists():
                self.slots.wipe(st.writing)
                actions.append(f"wiped interrupted write into slot {st.writing}")
            st.writing = None
            changed = True
        if st.previous and (st.previous == st.active or self.slots.info(st.previous) is None):
            st.previous = None
            changed = True
        if st.active and self.slots.info(st.active) is None:
            actions.append(f"active slot {st.active} is incomplete")
            st.log("slot-missing", slot=st.active)
            st.active, st.previous = st.previous, None
            changed = True
        if changed:
            self.sd.save(st)
        for s in ("a", "b"):
            if s not in (st.active, st.previous) and self.slots.dir(s).exists() and self.slots.info(s) is None:
                self.slots.wipe(s)
                actions.append(f"wiped incomplete slot {s}")
        self.slots.point_current(st.active)
        return {"actions": actions}

    def _ensure_good_active(self, st: AgentState) -> None:
        """Deep-check the active slot; switch to a good previous one if it is corrupt."""
        if st.active is None or self.slots.is_good(st.active):
            return
        bad = st.active
        if st.previous and self.slots.is_good(st.previous):
            st.active, st.previous = st.previous, None
            st.log("rollback", slot=bad, to_slot=st.active, reason=f"active slot {bad} failed its hash check")
            self.sd.save(st)
            self.slots.point_current(st.active)
            return
        raise ActiveSlotCorrupt(f"active slot {bad} is corrupt and no good previous release is kept; "
                                "install a full bundle to repair the board")

    # ------------------------------------------------------------------- install
    def install(self, bundle: str | Path, *, trial_in_process: bool | None = None) -> InstallReport:
        arm_crash_injection()
        try:
            with self.locked():
                return self._install(Path(bundle), trial_in_process)
        finally:
            boundary("install-end")
            disarm_crash_injection()

    def _install(self, bundle: Path, trial_in_process: bool | None) -> InstallReport:
        t0 = time.perf_counter()
        cfg = self.board()
        self.recover()
        st = self.sd.load()
        vm = open_bundle(bundle, self.trust(st), now=now_utc(), min_release=st.counter + 1, target=cfg.target)
        if vm.release <= st.counter:  # open_bundle refuses < min_release already; belt and braces
            raise RollbackError(f"release {vm.release} is not newer than committed release {st.counter}")
        try:
            self._ensure_good_active(st)
        except ActiveSlotCorrupt:
            if vm.kind == "delta":
                raise
            st.log("install-over-corrupt", slot=st.active)  # full bundle: nothing good left to lose
        old = st.active
        self._prewrite_checks(vm, cfg, st)
        new = Slots.other(old) if old else "a"
        if st.previous == new:
            st.previous = None
        st.writing = new
        st.log("install-start", release=vm.release, kind=vm.kind, slot=new, manifest_sha256=vm.manifest_sha256)
        self.sd.save(st)
        try:
            self.slots.wipe(new)
            extract(vm, self.slots.dir(new), base_dir=self.slots.dir(old) if vm.kind == "delta" and old else None)
            self.slots.write_meta(new, self._slot_meta(vm, new))
        except BaseException as e:
            self._abandon_write(st, new, e)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"disk full while writing release {vm.release} into slot {new}; the partial "
                               f"slot was removed and release {self._release_of(old)} stays active") from None
            raise
        t_write = time.perf_counter() - t0
        peak_before = peak_rss_mb()
        # ---- atomic switch: from here a crash means "trial interrupted" -> rollback on restart
        st.active, st.previous, st.writing = new, old, None
        st.trial = {"slot": new, "release": vm.release, "previous": old, "started": iso()}
        st.log("switch", release=vm.release, slot=new, previous=old)
        self.sd.save(st)
        self.slots.point_current(new)
        inproc = cfg.trial_in_process if trial_in_process is None else trial_in_process
        report = self.trial(new, cfg, in_process=inproc)
        base = dict(release=vm.release, version=vm.manifest.version, model=vm.manifest.model, kind=vm.kind,
                    slot=new, previous_slot=old, bundle_bytes=vm.summary()["bundle_bytes"],
                    seconds_verify_write=t_write, peak_rss_mb_before_trial=peak_before, trial=report)
        st = self.sd.load()
        if report.get("passed"):
            st.trial = None
            st.counter = max(st.counter, vm.release)
            st.trust = vm.trust.to_documents()
            st.log("commit", release=vm.release, slot=new, seconds=round(time.perf_counter() - t0, 3))
            self.sd.save(st)
            return InstallReport(status="committed", seconds=time.perf_counter() - t0, **base)
        reason = report.get("reason", "trial failed")
        st.active, st.previous, st.trial = old, None, None
        st.log("rollback", release=vm.release, slot=new, to_slot=old, reason=reason)
        self.sd.save(st)
        self.slots.point_current(old)
        rep = InstallReport(status="rolled_back", seconds=time.perf_counter() - t0, **base)
        err = HealthCheckFailed(f"release {vm.release} failed its trial ({reason}); rolled back to "
                                f"release {self._release_of(old)}")
        err.report = rep  # type: ignore[attr-defined]
        raise err

    def _release_of(self, slot: str | None) -> int | None:
        info = self.slots.info(slot) if slot else None
        return info.release if info else None

    def _abandon_write(self, st: AgentState, slot: str, exc: BaseException) -> None:
        """Undo a failed write into the scratch slot (best effort; recover() finishes it)."""
        try:
            self.slots.wipe(slot)
            st.writing = None
            st.log("install-failed", slot=slot, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            self.sd.save(st)
        except Exception:
            pass

    def _slot_meta(self, vm: VerifiedManifest, slot: str) -> dict[str, Any]:
        settings: dict[str, Any] = {}
        se = vm.file("settings")
        if se is not None:
            try:
                s = json.loads((self.slots.dir(slot) / se.path).read_text())
                settings = s if isinstance(s, dict) else {}
            except ValueError:
                settings = {}
        m = vm.manifest
        return {"release": m.release, "version": m.version, "model": m.model, "content_sha256": m.content_sha256,
                "manifest_sha256": vm.manifest_sha256, "installed": iso(), "agent_version": __version__,
                "files": [{"path": f.path, "role": f.role, "length": f.length, "sha256": f.sha256} for f in m.files],
                "settings": settings}

    def _prewrite_checks(self, vm: VerifiedManifest, cfg: BoardConfig, st: AgentState) -> None:
        """Everything that can be refused before a byte is written."""
        m = vm.manifest
        total = sum(f.length for f in m.files)
        kept = self._slot_bytes(st.active)
        if total + kept > cfg.storage_mb * MiB:
            raise BudgetExceeded(f"release {m.release} needs {total / MiB:.1f} MiB; with the active release "
                                 f"({kept / MiB:.1f} MiB) that exceeds the board's storage budget {cfg.storage_mb} MiB")
        scratch = Slots.other(st.active) if st.active else "a"
        free = self.free_bytes() + self._slot_bytes(scratch)
        if total + 64 * 1024 > free:
            raise BudgetExceeded(f"release {m.release} needs {total / MiB:.2f} MiB but only {free / MiB:.2f} MiB "
                                 f"is free on {self.sd.path}; nothing was written")
        models = [f for f in m.files if f.role == "model"]
        if not models:
            raise Incompatible(f"bundle release {m.release} carries no model file")
        biggest = max(f.length for f in models)
        need = biggest / MiB * RAM_MODEL_FACTOR + RUNTIME_BASE_RAM_MB
        if need > cfg.ram_budget_mb:
            raise BudgetExceeded(f"model needs about {need:.0f} MiB of RAM ({biggest / MiB:.1f} MiB weights x "
                                 f"{RAM_MODEL_FACTOR} + {RUNTIME_BASE_RAM_MB:.0f} MiB runtime), the board's budget "
                                 f"is {cfg.ram_budget_mb} MiB")
        for f in models:
            choose_runtime(Path(f.path), cfg.runtimes)
        if vm.kind == "delta":
            info = self.slots.info(st.active) if st.active else None
            if info is None or info.release != m.base_release or info.content_sha256 != m.base_content_sha256:
                raise Incompatible(f"delta bundle is against release {m.base_release}, this board runs "
                                   f"{info.release if info else 'nothing'}; send the full bundle")

    def _slot_bytes(self, slot: str | None) -> int:
        info = self.slots.info(slot) if slot else None
        return sum(int(f["length"]) for f in info.files) if info else 0

    def free_bytes(self) -> int:
        s = os.statvfs(self.sd.path)
        return s.f_bavail * s.f_frsize

    # ------------------------------------------------------------------- trial
    def trial(self, slot: str, cfg: BoardConfig, *, in_process: bool = False) -> dict[str, Any]:
        """Load the slot's model and run the health check. Returns a dict; never raises for a bad model.

        By default it runs in a child process, so a model that crashes the runtime (segfault,
        OOM kill) fails its trial instead of taking the agent down; the parent also measures the
        child's peak RSS.
        """
        if in_process:
            return trial_report(self.slots.dir(slot).parent.parent, slot, cfg)
        pkg_parent = str(Path(__file__).resolve().parent.parent) if "__file__" in globals() else ""
        code = ("import sys, json; sys.path.insert(0, %r)\n"
                "from device_agent.install import _trial_main; _trial_main(%r, %r)") % (
                    pkg_parent, str(self.sd.path), slot)
        try:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TRIAL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"passed": False, "reason": f"trial timed out after {TRIAL_TIMEOUT_S:.0f} s"}
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or [""])[-1][:200]
            return {"passed": False, "reason": f"trial process died (exit {r.returncode}{', signal ' + str(-r.returncode) if r.returncode < 0 else ''}) {tail}".strip()}
        try:
            return json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"passed": False, "reason": "trial process printed no report"}

    # ------------------------------------------------------------------- rollback / status
    def rollback(self, reason: str = "requested") -> dict[str, Any]:
        with self.locked():
            return self._rollback(reason)

    def _rollback(self, reason: str) -> dict[str, Any]:
        """Switch to the kept previous release after hash-verifying it. The counter does not move back."""
        self.recover()
        st = self.sd.load()
        if not st.previous:
            raise NoRollbackTarget("no previous release is kept on this board (first install, or it was used "
                                   "for a newer install); nothing to roll back to")
        try:
            info = self.slots.verify(st.previous)
        except ActiveSlotCorrupt as e:
            raise NoRollbackTarget(f"the kept previous release is not usable: {e}") from None
        old = st.active
        st.active, st.previous = st.previous, old
        st.log("rollback", slot=old, to_slot=st.active, release=info.release, reason=reason)
        self.sd.save(st)
        self.slots.point_current(st.active)
        return {"active": info.to_json(), "previous_slot": old, "counter": st.counter,
                "note": "the anti-rollback counter does not move back: re-installing needs a higher release"}

    def status(self, verify: bool = False, history: int = 10) -> dict[str, Any]:
        with self.locked():
            return self._status(verify, history)

    def _status(self, verify: bool, history: int) -> dict[str, Any]:
        self.recover()
        st = self.sd.load()
        cfg = self.board()

        def slot(name: str | None) -> dict[str, Any] | None:
            if not name:
                return None
            info = self.slots.info(name)
            if info is None:
                return {"slot": name, "complete": False}
            d = info.to_json()
            if verify:
                try:
                    self.slots.verify(name)
                    d["verified"] = True
                except ActiveSlotCorrupt as e:
                    d["verified"] = False
                    d["error"] = str(e)
            return d

        if verify:
            self._ensure_good_active(st)  # heal from a corrupt active slot if the previous one is good
            st = self.sd.load()
        return {"state_dir": str(self.sd.path), "target": cfg.target, "agent_version": __version__,
                "active": slot(st.active), "previous": slot(st.previous), "counter": st.counter,
                "trial": st.trial, "trust": {"root_version": self.trust(st).root.version,
                                             "release_keys_floor": st.trust.get("release_keys_floor")},
                "history": st.history[-history:] if history else []}

    def active_info(self, verify: bool = True):
        st = self.sd.load()
        if not st.active:
            raise NoRollbackTarget("no release is installed on this board; run `edgepack-agent install BUNDLE`")
        return self.slots.verify(st.active, deep=verify)


def trial_report(state_dir: Path, slot: str, cfg: BoardConfig) -> dict[str, Any]:
    """Hash-verify the slot, load its model, run the health check. A dict with passed/reason."""
    slots = Slots(state_dir)
    rss0 = rss_mb()
    try:
        info = slots.verify(slot)
        accel = cfg.accelerator or _settings_accelerator(info.settings)
        rt = choose_runtime(info.model_path, cfg.runtimes, info.settings.get("runtime"))
        sess = load_model(info.model_path, rt, threads=cfg.threads, accelerator=accel)
    except AgentError as e:
        return {"passed": False, "reason": f"model failed to load: {e}", "error_type": type(e).__name__}
    rss1 = rss_mb()
    from .machine import EMULATOR, latency_source
    src = latency_source()  # an emulator's clock is not the board's: no latency budget there
    th = Thresholds.from_settings(info.settings, cfg.latency_budget_ms if src != EMULATOR else None)
    try:
        rep: HealthReport = check(sess, info.file("golden"), th, runs=cfg.trial_runs)
    except AgentError as e:
        return {"passed": False, "reason": f"health check could not run: {e}", "error_type": type(e).__name__}
    return {**rep.to_json(), **sess.describe(), "load_seconds": sess.load_seconds,
            "model_rss_mb": round(rss1 - rss0, 2), "peak_rss_mb": round(peak_rss_mb(), 2), "latency_source": src,
            **({"latency_budget_skipped": cfg.latency_budget_ms} if src == EMULATOR and cfg.latency_budget_ms else {})}


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


__all__ = ["Agent", "InstallReport", "trial_report", "rss_mb", "peak_rss_mb"]
