"""Crash recovery of one state directory: finish or undo whatever an interrupted install left.

A mixin of :class:`device_agent.install.Agent` (it uses the agent's state dir, slots, lock and
trust): every public agent method starts with ``recover()``, as the agent does on boot, and the
``recover`` command rebuilds a state.json that is unusable from the slots that still verify.
"""
from __future__ import annotations

import json
import os
import stat
import time
from typing import Any

from .agent_errors import ActiveSlotCorrupt, NotInitialized, StateCorrupt
from .durable import read_bounded
from .errors import OtaError
from .state import AgentState
from .trust import TrustRoot


class Recovery:
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
