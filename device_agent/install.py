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
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from . import testing
from .agent_errors import (ActiveSlotCorrupt, Busy, DiskFull, HealthCheckFailed, NoRollbackTarget, NotInitialized,
                           StateCorrupt, UsageError)
from .budgets import check_before_write, free_bytes, peak_rss_mb
from .bundle import VerifiedManifest, extract, open_bundle
from .durable import board_now, boundary, iso, read_bounded
from .errors import MalformedBundle, OtaError, RollbackError
from .recovery import Recovery
from .slots import Slots, atomic_write_json
from .state import AgentState, BoardConfig, StateDir
from .trust import CounterReset, TrustRoot
from .trial import run_trial_process, trial_report
from .wire.encoding import canonical_json

LOCK_TIMEOUT_S = float(os.environ.get("EDGEPACK_AGENT_LOCK_TIMEOUT", "60"))


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


class Agent(Recovery):
    """One board. Every public method starts with recover(), as the agent does on boot.

    The transaction lives here; recovery after a crash in recovery.py, the pre-write budget
    checks in budgets.py, the health-checked trial (a child process) in trial.py."""

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

    # ------------------------------------------------------------------- install
    def install(self, bundle: str | Path, *, trial_in_process: bool | None = None) -> InstallReport:
        testing.arm_crash_injection()
        try:
            with self.locked():
                return self._install(Path(bundle), trial_in_process)
        finally:
            boundary("install-end")
            testing.disarm_crash_injection()

    def _install(self, bundle: Path, trial_in_process: bool | None) -> InstallReport:
        t0 = time.perf_counter()
        cfg = self.board()
        self.recover()
        st = self.sd.load()
        vm = open_bundle(bundle, self.trust(st), now=board_now(), min_release=st.counter + 1, target=cfg.target,
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
        check_before_write(vm, cfg, self.slots, st.active, self.free_bytes())
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
                               f"slot was removed and {self._kept(old)} stays active") from None
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
                raise DiskFull(f"disk full during the trial of release {vm.release}; it was not committed, "
                               f"{self._kept(old)} stays active: free space on the board") from None
            raise
        rep = InstallReport(status="rolled_back", seconds=time.perf_counter() - t0, **base)
        err = HealthCheckFailed(f"release {vm.release} failed its trial ({reason}); " + (
            f"rolled back to release {self._release_of(old)}" if self._release_of(old) is not None
            else "removed it: this was the board's first install, so no release is active"))
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

    def _kept(self, slot: str | None) -> str:
        """How a message names what stays active: a first install keeps no release at all."""
        rel = self._release_of(slot)
        return f"release {rel}" if rel is not None else "no release (the board's first install)"

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

    def free_bytes(self) -> int:
        return free_bytes(self.sd.path)

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
        from .durable import describe
        try:
            data = read_bounded(doc_path, 1 << 20)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read counter reset {doc_path}: {describe(e)}") from None
        with self.locked():
            self._recover()
            st = self.sd.load()
            cfg = self.board()
            tr = self.trust(st)
            r = CounterReset.parse(data, tr.root, board_now())
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


__all__ = ["Agent", "InstallReport"]
