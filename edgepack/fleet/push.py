"""Staged rollout of one release to a fleet: canary wave, then waves, automatic halt.

Per board: ask the agent for its active release (``status``); send the delta bundle when the
board holds its base, the full bundle otherwise (resumable, bounded retries and bytes); run
``install`` (the agent verifies, writes the inactive slot, trials the model against the golden
outputs and rolls back by itself when the trial fails); then judge the trial's figures against
the policy (top-1 drift, p90 latency against the board's budget and the previous release) and
ask the agent to roll back when they regress. Every agent JSON goes to the store.

A wave's release failures (failed install, trial rollback, host-side regression) add up; when
they pass ``max_failures`` the rollout halts: the boards of the halting wave that committed the
release are rolled back, later waves are never touched. Boards that could not be reached
(unreachable, authentication, host key) are reported and retried by the next push; they do not
judge the release unless ``count_unreachable`` is set.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .agent_client import AgentClient, agent_error
from .errors import AuthFailed, HostKeyRejected, InventoryError, RolloutHalted, TransferFailed, UnreachableBoard
from .inventory import Board, Fleet
from .store import Store, figures
from .thresholds import DEFAULT_MAX_DRIFT, Thresholds, judge
from .transport import Transport, file_sha256, open_transport, send_file

# results
COMMITTED, CURRENT, ROLLED_BACK, FAILED = "committed", "current", "rolled_back", "failed"
UNREACHABLE, AUTH_FAILED, HOST_KEY_REJECTED, TRANSFER_FAILED, NOT_READY, NOT_STARTED, SKIPPED = (
    "unreachable", "auth_failed", "host_key_rejected", "transfer_failed", "not_ready", "not_started", "skipped")
RELEASE_FAILURES = {ROLLED_BACK, FAILED}
NOT_REACHED = {UNREACHABLE, AUTH_FAILED, HOST_KEY_REJECTED, TRANSFER_FAILED, NOT_READY}
RESEND_ERRORS = {"HashMismatch", "TruncatedBundle", "LengthExceeded", "NotABundle", "MalformedBundle"}
BASE_ERRORS = {"BaseMismatch", "Incompatible"}


# --------------------------------------------------------------------------- board replies
# A board's JSON is hostile input: every field is read through these, so a string where an object
# belongs (or a list where a number belongs) is "no value", never a crash that skips the halt.
def _obj(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63 else None


def _str(x: Any, n: int = 300) -> str | None:
    return None if x is None else str(x)[:n]


# --------------------------------------------------------------------------- the release
@dataclass
class BundleFile:
    path: Path
    kind: str  # full | delta
    release: int
    version: str
    model: str
    content_sha256: str
    bytes: int
    sha256: str
    base_release: int | None = None
    base_content_sha256: str | None = None


def read_bundle_info(path: str | Path) -> BundleFile:
    """The manifest facts of a bundle (header only, unverified: the boards verify)."""
    from device_agent.durable import open_regular
    from device_agent.errors import OtaError
    from device_agent.wire import parse_json, parse_manifest, read_header, safe_text
    p = Path(path)
    if not p.is_file():
        raise InventoryError(f"bundle {p} not found; build it with `edgepack bundle`")
    try:
        with open_regular(p) as f:
            m = parse_manifest(parse_json(read_header(f).manifest_bytes, "manifest"))  # schema only: boards verify
    except (OtaError, OSError) as e:
        raise InventoryError(f"{p} is not a readable edgepack bundle: {safe_text(e)}") from None
    return BundleFile(path=p, kind=m.kind, release=m.release, version=m.version, model=m.model,
                      content_sha256=m.content_sha256, bytes=p.stat().st_size, sha256=file_sha256(p),
                      base_release=m.base_release, base_content_sha256=m.base_content_sha256)


@dataclass
class Release:
    full: BundleFile
    deltas: list[BundleFile] = field(default_factory=list)

    @property
    def release(self) -> int:
        return self.full.release

    def for_base(self, content_sha256: str | None) -> BundleFile:
        for d in self.deltas:
            if content_sha256 and d.base_content_sha256 == content_sha256:
                return d
        return self.full


def load_release(bundle: str | Path, deltas: list[str | Path] | None = None, discover: bool = True) -> Release:
    """The full bundle plus its deltas: those given, and (``discover``) delta bundles of the same
    release lying next to it (``*.bundle``)."""
    full = read_bundle_info(bundle)
    if full.kind != "full":
        raise InventoryError(f"{bundle} is a delta bundle; push the full bundle of the release (its deltas are "
                             f"found next to it or given with --delta)")
    out: list[BundleFile] = []
    cands = [Path(d) for d in deltas or []]
    if discover:
        cands += [p for p in sorted(full.path.parent.glob("*.bundle")) if p.resolve() != full.path.resolve()]
    seen = set()
    for c in cands:
        if c.resolve() in seen:
            continue
        seen.add(c.resolve())
        try:
            d = read_bundle_info(c)
        except InventoryError:
            if c in (Path(x) for x in deltas or []):
                raise
            continue
        if d.kind != "delta" or d.content_sha256 != full.content_sha256:
            if c in (Path(x) for x in deltas or []):
                raise InventoryError(f"--delta {c} is not a delta to release {full.release} ({full.path.name})")
            continue
        out.append(d)
    return Release(full, out)


# --------------------------------------------------------------------------- policy and plan
@dataclass
class Policy:
    canary: int | str = 1  # boards, or "10%"
    wave_size: int | str = "25%"
    max_failures: int | str = 0  # release failures tolerated in the whole rollout (count or % of boards)
    max_drift: float = DEFAULT_MAX_DRIFT  # top-1 drift (1 - agreement with the host's reference outputs)
    latency_margin: float = 0.20  # p90 may grow this much over the previous release ...
    latency_floor_ms: float = 0.5  # ... and by at least this many ms before it counts (timer noise)
    concurrency: int = 8
    retries: int = 3
    max_bytes_factor: float = 2.0  # bytes sent per board <= factor x the file sent
    command_timeout: float = 900.0
    rollback_wave_on_halt: bool = True
    count_unreachable: bool = False

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(max_drift=self.max_drift, latency_margin=self.latency_margin,
                          latency_floor_ms=self.latency_floor_ms)


def _count(spec: int | str, n: int, what: str) -> int:
    s = str(spec).strip()
    try:
        if s.endswith("%"):
            pct = float(s[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return math.ceil(pct * n / 100)
        v = int(s)
        if v < 0:
            raise ValueError
        return v
    except ValueError:
        raise InventoryError(f"{what} must be a count or a percentage like 10%, not {spec!r}") from None


def plan_waves(boards: list[Board], policy: Policy) -> list[list[Board]]:
    """Canary first (the first N boards in fleet-file order), then waves of ``wave_size``."""
    n = len(boards)
    c = min(_count(policy.canary, n, "--canary"), n)
    w = max(_count(policy.wave_size, n, "--wave-size"), 1)
    waves = [boards[:c]] if c else []
    rest = boards[c:]
    waves += [rest[i:i + w] for i in range(0, len(rest), w)]
    return waves


# --------------------------------------------------------------------------- results
@dataclass
class BoardResult:
    board: str
    wave: int
    result: str = NOT_STARTED
    kind: str | None = None  # delta | full
    release_before: int | None = None
    release_after: int | None = None
    bytes_sent: int = 0
    ideal_bytes: int = 0
    attempts: int = 0
    resumed_at: list[int] = field(default_factory=list)
    p90_ms: float | None = None
    baseline_p90_ms: float | None = None
    drift: float | None = None
    seconds: float = 0.0
    error: str | None = None
    flags: list[str] = field(default_factory=list)


@dataclass
class PushReport:
    release: int
    version: str
    bundle: str
    boards: list[BoardResult]
    waves: list[dict[str, Any]]
    halted: bool = False
    halt_reason: str | None = None
    seconds: float = 0.0
    rollout_id: int | None = None

    @property
    def bytes_sent(self) -> int:
        return sum(b.bytes_sent for b in self.boards)

    def count(self, *results: str) -> int:
        return sum(b.result in results for b in self.boards)

    @property
    def exit_code(self) -> int:
        """0 all done; 25 halted; 24 some boards failed; 21 some boards not reached."""
        if self.halted:
            return RolloutHalted.exit_code
        if self.count(*RELEASE_FAILURES):
            return TransferFailed.exit_code
        if self.count(*NOT_REACHED):
            return UnreachableBoard.exit_code
        return 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["bytes_sent"] = self.bytes_sent
        d["exit_code"] = self.exit_code
        return d


Event = Callable[[dict[str, Any]], None]


def judge_install(r: BoardResult, p: Policy, latency_budget_ms: float | None) -> list[str]:
    """The regression judgement (fleet/thresholds.py) on a committed install's trial figures.
    Shared by push and the pull rollout watch."""
    return [f.message for f in judge(p.thresholds, drift=r.drift, p90_ms=r.p90_ms, baseline_p90_ms=r.baseline_p90_ms,
                                     latency_budget_ms=latency_budget_ms)]


# --------------------------------------------------------------------------- one board
class _BoardPush:
    def __init__(self, board: Board, fleet: Fleet, rel: Release, policy: Policy, store: Store | None,
                 rollout: int | None, wave: int, transport: Transport | None = None,
                 on_bytes: Callable[[str, int], None] | None = None):
        self.b, self.fleet, self.rel, self.p, self.store, self.rollout = board, fleet, rel, policy, store, rollout
        self.r = BoardResult(board=board.name, wave=wave)
        self.t = transport or open_transport(board, fleet)
        self.on_bytes = on_bytes

    def _save(self, kind: str, data: dict[str, Any], ok: bool | None = None) -> None:
        if self.store is not None:
            self.store.add(self.b.name, kind, data, ok=ok, rollout=self.rollout)

    def _connect(self) -> None:
        for i in range(self.p.retries + 1):
            try:
                self.t.connect()
                return
            except UnreachableBoard:
                if i == self.p.retries:
                    raise
                time.sleep(0.5 * (i + 1))

    def _agent(self, *args: str) -> tuple[int, dict[str, Any]]:
        reply = AgentClient(self.t, timeout=self.p.command_timeout).call(*args)
        return reply.rc, reply.data

    def run(self) -> BoardResult:
        t0 = time.perf_counter()
        try:
            self._run()
        except UnreachableBoard as e:
            self.r.result, self.r.error = UNREACHABLE, str(e)
        except AuthFailed as e:
            self.r.result, self.r.error = AUTH_FAILED, str(e)
        except HostKeyRejected as e:
            self.r.result, self.r.error = HOST_KEY_REJECTED, str(e)
        except TransferFailed as e:
            self.r.result, self.r.error = TRANSFER_FAILED, str(e)
        except Exception as e:  # a reply we could not make sense of: fail closed, the wave still judges
            self.r.result = FAILED
            self.r.error = f"board {self.b.name}: unusable reply or error ({type(e).__name__}: {str(e)[:200]})"
        finally:
            try:
                self.t.close()
            except Exception:
                pass
            self.r.seconds = round(time.perf_counter() - t0, 3)
        return self.r

    def _status(self) -> dict[str, Any] | None:
        rc, st = self._agent("status", "--history", "0")
        if rc != 0 or st.get("ok") is not True:  # agent_client turned a malformed reply into an error
            e = agent_error(st)
            self.r.result = NOT_READY
            self.r.error = (f"board {self.b.name}: agent status failed ({e.type}: {e.message}); "
                            f"run `edgepack fleet bootstrap` for it")
            return None
        self._save("status", st)
        return st

    def _run(self) -> None:
        b, rel, r = self.b, self.rel, self.r
        self._connect()
        st = self._status()
        if st is None:
            return
        active = _obj(st.get("active"))
        r.release_before = _int(active.get("release"))
        content = _str(active.get("content_sha256"), 64)
        # "current" means this very release is active; a new release with the same bytes is still
        # installed (as a delta of base copies, a few KB) so the board's release number moves on
        if content == rel.full.content_sha256 and r.release_before == rel.release:
            r.result, r.release_after = CURRENT, r.release_before
            return
        if r.release_before is not None and r.release_before >= rel.release:
            r.result, r.release_after = SKIPPED, r.release_before
            r.error = f"board holds release {r.release_before} >= {rel.release} (anti-rollback); nothing to do"
            return
        if self.store is not None:
            r.baseline_p90_ms = self.store.baseline_p90(b.name, rel.release)
        f = rel.for_base(content)
        rc, j, f = self._send_and_install(f)
        if rc is None:
            return
        committed = (rc == 0 and j.get("ok") is True and j.get("status") == "committed"
                     and _int(j.get("release")) == f.release and isinstance(j.get("trial"), dict))
        r.release_after = f.release if committed else r.release_before
        if committed:
            fig = figures("install", j)
            r.p90_ms, r.drift = fig["p90_ms"], fig["drift"]
            r.result = COMMITTED
            self._judge()
        elif rc == 0:
            # exit 0 without a well-formed commit report (garbage, another release): not a commit
            r.result = FAILED
            r.error = (f"board {b.name}: install exited 0 but did not report release {f.release} committed; "
                       "treated as a failure (check the agent on the board)")
        elif rc == 7:
            r.result = ROLLED_BACK
            fig = figures("install", _obj(j.get("report")))
            r.p90_ms, r.drift = fig["p90_ms"], fig["drift"]
            r.error = agent_error(j).message
        else:
            r.result = FAILED
            e = agent_error(j)
            r.error = f"install refused ({e.type}, exit {rc}): {e.message}"

    def _send_and_install(self, f: BundleFile) -> tuple[int | None, dict[str, Any], BundleFile]:
        r = self.r
        fresh = False
        for attempt in range(3):
            r.kind = f.kind
            r.ideal_bytes = f.bytes
            budget = int(self.p.max_bytes_factor * f.bytes) + (0 if attempt == 0 else r.bytes_sent)
            ts = send_file(self.t, f.path, self.b.incoming, sha256=f.sha256, retries=self.p.retries,
                           max_bytes=budget, fresh=fresh,
                           progress=(lambda n: self.on_bytes(self.b.name, n)) if self.on_bytes else None)
            r.bytes_sent += ts.bytes_sent
            r.attempts += ts.attempts
            r.resumed_at += ts.resumed_at
            rc, j = self._install(ts.remote, f)
            etype = agent_error(j).type
            if rc != 0 and etype in RESEND_ERRORS and not fresh:
                fresh = True  # what arrived is not what was signed: send it again from byte 0
                continue
            if rc != 0 and f.kind == "delta" and etype in BASE_ERRORS:
                f, fresh = self.rel.full, False  # the board's base moved under us: send the full bundle
                self.t.remove(ts.remote)
                continue
            if rc in (0, 7):
                self.t.remove(ts.remote)
            return rc, j, f
        return rc, j, f

    def _install(self, remote: str, f: BundleFile) -> tuple[int, dict[str, Any]]:
        for i in range(self.p.retries + 1):
            try:
                rc, j = self._agent("install", remote)
                self._save("install", j, ok=rc == 0)
                return rc, j
            except UnreachableBoard:
                # connection lost while installing: the agent's transaction either committed or will be
                # undone by recover(); status tells which.
                if i == self.p.retries:
                    raise
                time.sleep(0.5 * (i + 1))
                self._connect()
                st = self._status()
                act = _obj(_obj(st).get("active"))
                if act.get("content_sha256") == f.content_sha256 and _int(act.get("release")) == f.release:
                    return 0, {"ok": True, "release": f.release, "status": "committed",
                               "note": "install finished while the connection was down"}
        raise AssertionError("unreachable")

    def _judge(self) -> None:
        """Host-side policy on the trial's figures; a regression is rolled back by the agent."""
        if self.b.kind != "board":  # an emulated board's timings are the emulator's: judged on outputs only
            self.r.p90_ms = self.r.baseline_p90_ms = None
        self.r.flags += judge_install(self.r, self.p, self.b.latency_budget_ms)
        if self.r.flags:
            self.rollback("; ".join(self.r.flags))

    def rollback(self, reason: str) -> None:
        rc, j = self._agent("rollback", "--reason", f"edgepack push: {reason}")
        self._save("rollback", j, ok=rc == 0)
        self.r.result = ROLLED_BACK
        self.r.error = reason
        if rc == 0 and j.get("ok") is True:
            self.r.release_after = _int(_obj(j.get("active")).get("release"))
        else:
            self.r.result = FAILED
            self.r.error = f"{reason}; rollback failed: {_str(_obj(j.get('error')).get('message'))}"


# --------------------------------------------------------------------------- the rollout
def _roll_back_wave(done: list[BoardResult], jobs: dict[str, "_BoardPush"], name: str) -> None:
    """The halting wave's committed boards go back to their previous release, each on its own."""
    for d in done:
        if d.result != COMMITTED:
            continue
        bp = jobs[d.board]
        try:
            bp.t.connect()
            bp.rollback(f"rollout halted ({name})")
        except Exception as e:  # one bad board must not skip the others' rollback
            d.result = FAILED
            d.error = f"halt rollback failed: {type(e).__name__}: {str(e)[:200]}"
        finally:
            try:
                bp.t.close()
            except Exception:
                pass


def push(release: Release | str | Path, fleet: Fleet, *, boards: list[Board] | None = None,
         policy: Policy | None = None, store: Store | None = None, on_event: Event | None = None,
         raise_on_halt: bool = False, on_bytes: Callable[[str, int], None] | None = None,
         abort: Callable[[], str | None] | None = None) -> PushReport:
    """Roll ``release`` out to ``boards`` (default: the whole fleet) wave by wave.

    ``on_event`` gets wave_start / wave_end / halted dicts; ``on_bytes(board, n)`` the bytes sent so
    far to a board (progress bars, fault injection in tests); ``abort()`` is asked before each wave
    after the first and halts the rollout when it returns a reason (``edgepack abort``)."""
    t0 = time.perf_counter()
    p = policy or Policy()
    rel = release if isinstance(release, Release) else load_release(release)
    boards = list(boards if boards is not None else fleet.boards)
    if not boards:
        raise InventoryError("no boards selected; check --group and the fleet file")
    if p.concurrency < 1 or p.retries < 0 or p.max_bytes_factor < 1:
        raise InventoryError("--concurrency must be >= 1, --retries >= 0, --max-bytes-factor >= 1")
    waves = plan_waves(boards, p)
    limit = _count(p.max_failures, len(boards), "--max-failures")
    emit = on_event or (lambda e: None)
    rid = store.start_rollout(rel.release, str(rel.full.path)) if store else None
    results: dict[str, BoardResult] = {b.name: BoardResult(board=b.name, wave=i)
                                       for i, w in enumerate(waves) for b in w}
    rep = PushReport(release=rel.release, version=rel.full.version, bundle=str(rel.full.path),
                     boards=list(results.values()), waves=[], rollout_id=rid)
    failures = 0
    for i, wave in enumerate(waves):
        name = "canary" if i == 0 and _count(p.canary, len(boards), "--canary") else f"wave {i}"
        stop = abort() if abort is not None and i else None
        if stop:
            rep.halted, rep.halt_reason = True, f"aborted before {name}: {stop}"[:500]
            emit({"event": "halted", "reason": rep.halt_reason})
            break
        emit({"event": "wave_start", "wave": i, "name": name, "boards": [b.name for b in wave]})
        tw = time.perf_counter()
        jobs = {b.name: _BoardPush(b, fleet, rel, p, store, rid, i, on_bytes=on_bytes) for b in wave}
        with ThreadPoolExecutor(max_workers=min(p.concurrency, len(wave))) as ex:
            done = list(ex.map(lambda j: j.run(), jobs.values()))
        for d in done:
            results[d.board] = d
        bad = [d for d in done if d.result in RELEASE_FAILURES
               or (p.count_unreachable and d.result in NOT_REACHED)]
        is_canary = name == "canary"
        if is_canary:
            # no canary result means no go: a canary that was not reached tested nothing
            bad += [d for d in done if d.result in NOT_REACHED and d not in bad]
        failures += len(bad)
        no_verdict = is_canary and not any(d.result in (COMMITTED, CURRENT) for d in done)
        summary = {"wave": i, "name": name, "boards": len(wave), "seconds": round(time.perf_counter() - tw, 3),
                   **{k: sum(d.result == k for d in done) for k in (COMMITTED, CURRENT, ROLLED_BACK, FAILED)},
                   "not_reached": sum(d.result in NOT_REACHED for d in done),
                   "bytes_sent": sum(d.bytes_sent for d in done), "failures_so_far": failures}
        rep.waves.append(summary)
        emit({"event": "wave_end", **summary})
        if failures > limit or no_verdict:
            rep.halted = True
            why = (f"{failures} release failure(s) > max {limit}" if failures > limit
                   else "no canary board committed the release (no canary result means no go)")
            rep.halt_reason = (f"{name}: {why}: " + "; ".join(f"{d.board}: {d.result}: {d.error}" for d in bad))[:500]
            if p.rollback_wave_on_halt:
                _roll_back_wave(done, jobs, name)
            emit({"event": "halted", "reason": rep.halt_reason})
            break
    rep.boards = [results[b.name] for b in boards]
    rep.seconds = round(time.perf_counter() - t0, 3)
    if store is not None and rid is not None:
        store.finish_rollout(rid, rep.halted, rep.halt_reason, rep.to_json())
    if rep.halted and raise_on_halt:
        raise RolloutHalted(f"rollout of release {rel.release} halted: {rep.halt_reason}; fix the release and push "
                            f"again (boards of the halting wave were rolled back)", rep)
    return rep


__all__ = ["judge_install", "Policy", "Release", "BundleFile", "BoardResult", "PushReport", "push", "load_release", "read_bundle_info",
           "plan_waves"]
