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
import math
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from ._internal.encoding import canonical_json
from ._internal.files import read_bounded
from .agent_errors import (AcceleratorUnavailable, ActiveSlotCorrupt, AgentError, BudgetExceeded, Busy, DiskFull,
                           HealthCheckFailed, Incompatible, NoRollbackTarget, NotInitialized, StateCorrupt, UsageError)
from .bundle import VerifiedManifest, extract, open_bundle
from .errors import MalformedBundle, OtaError, RollbackError
from .health import HealthReport, Thresholds, check
from .runtime import choose_runtime, load_model
from .slots import Slots, arm_crash_injection, atomic_write_json, boundary, disarm_crash_injection
from .state import AgentState, BoardConfig, StateDir, iso, now_utc
from .trust import CounterReset, TrustRoot

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
        fd = self._open_lock()
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

    def _open_lock(self) -> int:
        """The lock file, refused (StateCorrupt) if something other than a regular file is there."""
        path = self.sd.path / "lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StateCorrupt(f"{path} cannot be opened as the board lock ({e.strerror}); run "
                               "`edgepack-agent recover` to repair the state directory") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StateCorrupt(f"{path} is not a regular file; run `edgepack-agent recover` to repair it")
        return fd

    # ------------------------------------------------------------------- setup
    def init(self, cfg: BoardConfig, trust_root: str | Path, release_keys: str | Path | None = None,
             force: bool = False) -> dict[str, Any]:
        """Write board.json and an empty state.json holding the flashed trust root."""
        tr = TrustRoot.from_files(trust_root, release_keys)  # refuses a root without its threshold
        cfg.validate()
        self.sd.path.mkdir(parents=True, exist_ok=True)
        with self.locked():
            return self._init(cfg, tr, force)

    def _init(self, cfg: BoardConfig, tr: TrustRoot, force: bool) -> dict[str, Any]:
        self.slots.ensure()
        keep = os.path.lexists(self.sd.state_file) and not force
        if keep:
            st = self.sd.load()
            self._same_root_or_refuse(st, tr)
        self.sd.save_board(cfg)
        atomic_write_json(self.flashed_root_file, tr.root.document) if not keep else None
        if keep:
            st.log("reconfigure", target=cfg.target)
        else:
            st = AgentState(trust=tr.to_documents())
            st.log("init", target=cfg.target, root_version=tr.root.version)
        self.sd.save(st)
        return {"state_dir": str(self.sd.path), "board": cfg.to_json(), "counter": st.counter}

    @property
    def flashed_root_file(self) -> Path:
        """The root document ``init`` flashed (the start of the chain; recover's last resort)."""
        return self.sd.path / "root.json"

    def _same_root_or_refuse(self, st: AgentState, tr: TrustRoot) -> None:
        """``init`` again on an initialised board keeps its trust: only the same root may be given.

        Why: silently keeping the old root (or silently switching) hides that the board will
        refuse (or accept) other bundles than the operator expects."""
        new = canonical_json(tr.root.document.get("signed"))
        held = [st.trust.get("root")]
        try:
            held.append(json.loads(read_bounded(self.flashed_root_file, 1 << 20, follow_symlinks=False)))
        except (OSError, ValueError):
            pass
        if any(isinstance(h, dict) and canonical_json(h.get("signed")) == new for h in held):
            return
        cur = self.trust(st).root
        raise UsageError(f"{self.sd.path} already trusts root v{cur.version} (keys "
                         f"{', '.join(k[:12] for k in sorted(cur.keys))}), not the root given; pass --force to "
                         "re-flash the trust root (forgets installed releases)")

    def board(self) -> BoardConfig:
        return self.sd.board()

    def trust(self, st: AgentState) -> TrustRoot:
        t = st.trust
        if not t or "root" not in t:
            raise NotInitialized("state.json holds no trust root; run `edgepack-agent init --trust-root ROOT.json`")
        try:
            tr = TrustRoot.from_bytes(t["root"], t.get("release_keys"))
            floor = t.get("release_keys_floor") or 0
            if not isinstance(floor, int) or isinstance(floor, bool) or floor < 0:
                raise MalformedBundle("release_keys_floor is not a non-negative integer")
        except OtaError as e:
            raise StateCorrupt(f"state.json holds trust documents that do not verify ({e}); run "
                               "`edgepack-agent recover` (it falls back to the flashed root)") from None
        return tr.with_release_keys_floor(floor)

    def _persist_trust(self, tr: TrustRoot) -> None:
        """Store a newer, verified root / release-key list right away (a revocation must stick)."""
        st = self.sd.load()
        if st.trust == tr.to_documents():
            return
        st.trust = tr.to_documents()
        st.log("trust-update", root_version=tr.root.version,
               release_keys_version=tr.release_keys.version if tr.release_keys else None)
        self.sd.save(st)

    # ------------------------------------------------------------------- recovery
    def recover(self, rebuild: bool = False) -> dict[str, Any]:
        """Finish/undo an interrupted install. ``rebuild`` (the ``recover`` command) also repairs a
        state directory whose state.json / lock / ``current`` is unusable (StateCorrupt)."""
        if not rebuild:
            with self.locked():
                return self._recover()
        moved = self._move_aside_non_regular()
        with self.locked():
            try:
                r = self._recover()
                self.trust(self.sd.load())  # trust documents that no longer verify are corrupt too
            except StateCorrupt as e:
                r = self._rebuild_state(str(e))
            except NotInitialized as e:
                if not (moved and self.sd.board_file.is_file()):
                    raise
                r = self._rebuild_state(str(e))  # state.json was not a file and was moved aside
            r["actions"] = moved + r["actions"]
            return r

    def _move_aside_non_regular(self) -> list[str]:
        """A directory / FIFO / symlink where the lock, state.json or `current` belongs is renamed
        to NAME.corrupt-<time> (kept for inspection, never followed)."""
        out = []
        for name, want in (("lock", stat.S_ISREG), ("state.json", stat.S_ISREG), ("current", stat.S_ISLNK)):
            p = self.sd.path / name
            try:
                mode = os.lstat(p).st_mode
            except OSError:
                continue
            if not want(mode):
                dst = p.with_name(f"{name}.corrupt-{int(time.time())}")
                os.replace(p, dst)
                out.append(f"moved unusable {name} aside to {dst.name}")
        return out

    def _rebuild_state(self, why: str) -> dict[str, Any]:
        """A new state.json from what can be verified: the slots that hash-verify (the highest
        release active, the other kept), the trust documents if they still verify (else the
        flashed root.json), the counter = the highest verified release or the old one if readable."""
        old: dict[str, Any] = {}
        try:
            d = json.loads(read_bounded(self.sd.state_file, 4 << 20, follow_symlinks=False))
            old = d if isinstance(d, dict) else {}
        except (OSError, ValueError, RecursionError):
            pass
        trust = None
        for cand in (old.get("trust"), ):
            try:
                if isinstance(cand, dict) and isinstance(cand.get("root"), dict):
                    TrustRoot.from_bytes(cand["root"], cand.get("release_keys"))
                    trust = {"root": cand["root"], "release_keys": cand.get("release_keys"),
                             "release_keys_floor": cand.get("release_keys_floor")
                             if isinstance(cand.get("release_keys_floor"), int) else 0}
            except (OtaError, TypeError, ValueError):
                trust = None
        if trust is None:
            try:
                tr = TrustRoot.from_bytes(read_bounded(self.flashed_root_file, 1 << 20, follow_symlinks=False))
            except (OSError, ValueError, OtaError) as e:
                raise StateCorrupt(f"{why}; and no verifiable trust root is left (flashed root.json: "
                                   f"{e}); re-run `edgepack-agent init --force --trust-root ROOT.json`") from None
            trust = tr.to_documents()
        good = sorted(((self.slots.verify(n).release, n) for n in ("a", "b") if self.slots.is_good(n)), reverse=True)
        st = AgentState(trust=trust)
        if good:
            st.active = good[0][1]
            st.previous = good[1][1] if len(good) > 1 else None
        c = old.get("counter")
        st.counter = max([r for r, _ in good] + ([c] if isinstance(c, int) and not isinstance(c, bool)
                                                   and 0 <= c < 2**63 else []), default=0)
        st.log("rebuild", reason=why[:300], active=st.active, counter=st.counter)
        self.sd.save(st)
        r = self._recover()
        r["actions"].insert(0, f"rebuilt state.json from the verified slots (active {st.active}, counter {st.counter})")
        return r

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
        vm = open_bundle(bundle, self.trust(st), now=now_utc(), min_release=st.counter + 1, target=cfg.target,
                         max_release=st.counter + cfg.max_release_step, on_trust=self._persist_trust)
        st = self.sd.load()  # _persist_trust may have written a newer trust root
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
        try:
            self.slots.point_current(new)
            inproc = cfg.trial_in_process if trial_in_process is None else trial_in_process
            report = self.trial(new, cfg, in_process=inproc)
            base = dict(release=vm.release, version=vm.manifest.version, model=vm.manifest.model, kind=vm.kind,
                        slot=new, previous_slot=old, bundle_bytes=vm.summary()["bundle_bytes"],
                        seconds_verify_write=t_write, peak_rss_mb_before_trial=peak_before, trial=report)
            st = self.sd.load()
            if report.get("passed") is True:
                st.trial = None
                st.counter = max(st.counter, vm.release)
                st.trust = vm.trust.to_documents()
                st.log("commit", release=vm.release, slot=new, seconds=round(time.perf_counter() - t0, 3))
                self.sd.save(st)
                return InstallReport(status="committed", seconds=time.perf_counter() - t0, **base)
            reason = str(report.get("reason", "trial failed"))[:500]
            # `current` first: if the state write below fails (disk full), the service must not keep
            # running the uncommitted release; state.json still says "trial", which recover() undoes
            self.slots.point_current(old)
            st.active, st.previous, st.trial = old, None, None
            st.log("rollback", release=vm.release, slot=new, to_slot=old, reason=reason)
            self.sd.save(st)
        except (OSError, DiskFull, StateCorrupt) as e:
            self._undo_switch(old, vm.release, e)
            if isinstance(e, DiskFull) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
                raise DiskFull(f"disk full during the trial of release {vm.release}; it was not committed, release "
                               f"{self._release_of(old)} stays active: free space on the board") from None
            raise
        rep = InstallReport(status="rolled_back", seconds=time.perf_counter() - t0, **base)
        err = HealthCheckFailed(f"release {vm.release} failed its trial ({reason}); rolled back to "
                                f"release {self._release_of(old)}")
        err.report = rep  # type: ignore[attr-defined]
        raise err

    def _undo_switch(self, old: str | None, release: int, exc: BaseException) -> None:
        """After the switch something failed (disk full): point `current` back, then try to record
        the rollback. Each step is best effort; whatever does not land, recover() finishes."""
        try:
            self.slots.point_current(old)
        except Exception:
            pass
        try:
            st = self.sd.load()
            if st.trial:
                st.active, st.previous, st.trial = old, None, None
                st.log("rollback", release=release, to_slot=old, reason=f"{type(exc).__name__}: {str(exc)[:200]}")
                self.sd.save(st)
        except Exception:
            pass

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

        By default it runs in a child process (run_trial_process: own process group, rlimits, RSS
        watchdog, killed with the agent), so a model that crashes the runtime or eats the board's
        memory fails its trial instead of taking the agent down.
        """
        if in_process:
            return trial_report(self.slots.dir(slot).parent.parent, slot, cfg)
        return run_trial_process(self.sd.path, slot, cfg)

    def reset_counter(self, doc_path: str | Path) -> dict[str, Any]:
        """Apply a root-signed counter reset (``edgepack keys reset-counter``). Installs nothing."""
        from ._internal.files import describe
        try:
            data = read_bounded(doc_path, 1 << 20)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read counter reset {doc_path}: {describe(e)}") from None
        with self.locked():
            self._recover()
            st = self.sd.load()
            cfg = self.board()
            tr = self.trust(st)
            r = CounterReset.parse(data, tr.root, now_utc())
            if cfg.target not in r.targets:
                raise UsageError(f"counter reset v{r.version} is for {', '.join(r.targets)}, this board is {cfg.target!r}")
            if r.version <= st.counter_reset_version:
                raise RollbackError(f"counter reset v{r.version} is not newer than v{st.counter_reset_version} which "
                                    "this board already applied; sign a new one with a higher --version")
            before = st.counter
            st.counter = r.counter  # may go below the active release: that one stays, later ones install
            st.counter_reset_version = r.version
            st.log("counter-reset", version=r.version, before=before, after=st.counter)
            self.sd.save(st)
            return {"counter_before": before, "counter": st.counter, "reset_version": r.version}

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
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from device_agent.install import _trial_main; _trial_main(%r, %r)") % (pkg_parent, str(state_dir), slot)
    limit = trial_rss_limit_mb(cfg)
    env = {**os.environ, "EDGEPACK_AGENT_TRIAL": _MARK, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("EDGEPACK_AGENT_CRASH_AT", None)
    env.pop("EDGEPACK_AGENT_BOUNDARY_LOG", None)
    try:
        proc = subprocess.Popen([sys.executable, "-c", code, _MARK], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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


__all__ = ["Agent", "InstallReport", "trial_report", "rss_mb", "peak_rss_mb"]
