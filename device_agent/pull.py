"""``edgepack-agent pull``: one poll of a TUF repository, then the normal verified A/B install.

One run (a systemd timer starts it; docs/fleet.md has the unit files)::

    tuf.ngclient refresh          root N+1 probe, timestamp; snapshot/targets only when they changed
    choose                        newest release of this board's model, for its target, newer than
                                  its anti-rollback counter, whose rollout admits its cohort
                                  (delta against the active release if published, else full)
    download                      resumable (HTTP Range into state/pull/downloads/*.part), bounded
                                  by the signed length, a per-request deadline and minimum average
                                  rate (slow retrieval); then TUF's length+hash check
    Agent.install(file)           the same verified install as `edgepack-agent install`: bundle
                                  signature chain, anti-rollback, budgets, A/B write, trial, commit
    report                        one JSON object PUT to <repo>/reports/ (or --report-url); kept in
                                  state/pull/outbox/ and retried next run when the upload fails

Nothing new costs two small GETs (the next-root probe, answered 404, and the timestamp). A
recalled release (``rollout --halt --recall``) makes a board that runs it roll back.

Every repository or download failure becomes one named error (exit 12 or 13), and nothing is
installed: TUF refuses the metadata before the agent ever sees a bundle, and the agent verifies
the bundle again on its own trust root.

The only dependency beyond the agent's own is python-tuf (its urllib3 and securesystemslib);
it is imported here only, so boards that never pull do not need it.
"""
from __future__ import annotations

import contextvars
import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .agent_errors import AgentError, UsageError
from .errors import OtaError
from .durable import commit_file, fsync_dir
from .slots import atomic_write, atomic_write_json
from .durable import iso

CUSTOM = "edgepack"
BOARD_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
DEFAULT_TIMEOUT_S = 30.0       # per request: total deadline (plus length / min rate for a bundle), not a gap timeout
DEFAULT_GAP_S = 10             # socket timeout between bytes
DEFAULT_MIN_RATE = 1024.0      # B/s: minimum average rate of a transfer once past the grace period
DEFAULT_GRACE_S = 5.0          # seconds a transfer may run before the minimum rate applies
CHUNK = 256 * 1024
TRANSIENT = {"Busy", "DiskFull"}  # install refusals worth retrying with the same bundle next poll


# --------------------------------------------------------------------------- named errors
class PullError(AgentError):
    """The repository could not be used; nothing was installed."""

    exit_code = 12


class RepositoryUnreachable(PullError):
    """The repository could not be reached (network, HTTP error); try again on the next poll."""

    exit_code = 13


class MetadataUnsigned(PullError):
    """Metadata is not signed by the threshold of keys the trusted root names (forged or tampered)."""


class MetadataRollback(PullError):
    """Metadata older than (or inconsistent with) what the board already trusts: rollback or mix-and-match."""


class MetadataExpired(PullError):
    """Metadata has expired: the repository is frozen or not refreshed (``edgepack repo refresh``)."""


class MetadataMismatch(PullError):
    """Metadata whose length or hash differs from what the newer signed metadata says (mix-and-match)."""


class TargetHashMismatch(PullError):
    """A downloaded bundle's length or hash differs from the signed targets metadata (arbitrary package)."""


class EndlessData(PullError):
    """The server sent more bytes than the signed length allows."""


class SlowRetrieval(PullError):
    """The server did not deliver within the deadline (slow retrieval attack or a bad link)."""


class RepositoryRefused(PullError):
    """Other metadata verification failure (malformed, wrong type, bad delegation)."""


def _tuf_errors() -> list[tuple[type, type[PullError]]]:
    from tuf.api import exceptions as X
    # most specific first: ExpiredMetadataError etc. all derive from RepositoryError
    return [(X.SlowRetrievalError, SlowRetrieval), (X.DownloadLengthMismatchError, EndlessData),
            (X.DownloadError, RepositoryUnreachable), (X.UnsignedMetadataError, MetadataUnsigned),
            (X.BadVersionNumberError, MetadataRollback), (X.ExpiredMetadataError, MetadataExpired),
            (X.LengthOrHashMismatchError, TargetHashMismatch), (X.RepositoryError, RepositoryRefused)]


def named(e: BaseException, *, metadata: bool = False) -> PullError:
    """The board's named error for a python-tuf exception (the TUF class stays in the message)."""
    from tuf.api import exceptions as X
    if metadata and isinstance(e, X.LengthOrHashMismatchError):
        return MetadataMismatch(f"{type(e).__name__}: {e}")
    for tuf_cls, ours in _tuf_errors():
        if isinstance(e, tuf_cls):
            return ours(f"{type(e).__name__}: {e or tuf_cls.__doc__ or ''}".strip().rstrip(":"))
    return RepositoryRefused(f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------- cohorts
def cohort_bucket(board_id: str, model: str) -> int:
    """The board's stable place in [0, 10000) for ``model``'s rollouts (SHA-256 of model and board
    id). A rollout at B basis points (B/100 %) admits the boards with bucket < B, so raising it
    only ever adds boards. Integers: TUF's canonical JSON has no floats."""
    h = hashlib.sha256(f"edgepack-cohort-v1\0{model}\0{board_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") % 10_000


def admitted(rollout: Any, bucket: int) -> bool:
    if not isinstance(rollout, dict) or rollout.get("halted"):
        return False
    bp = rollout.get("basis_points")
    return isinstance(bp, int) and not isinstance(bp, bool) and bucket < bp


# --------------------------------------------------------------------------- network
class _Watch:
    """One request's whole-transfer budget, so a server cannot hold a board by trickling bytes
    (TUF's slow retrieval attack). A per-read (gap) socket timeout alone lets a server drip one
    byte per gap forever, in the body or in the headers. Two bounds:

    - a total deadline: a timer shuts the request's socket down when it passes, which unblocks a
      read stuck anywhere (status line, headers or body); the transfer is then refused;
    - a minimum average rate: after ``grace_s``, fewer than ``min_rate_bps`` bytes per second
      since the request started is refused at once, without waiting for the deadline.

    The socket is handed over by the connection class of :func:`_watched` once the request is sent."""

    def __init__(self, url: str, *, deadline_s: float, min_rate_bps: float = 0.0, grace_s: float = 0.0):
        self.url, self.deadline_s, self.min_rate, self.grace_s = url, deadline_s, min_rate_bps, grace_s
        self.t0 = time.monotonic()
        self.n = 0
        self.fired = False
        self._sock: Any = None
        self._lock = threading.Lock()
        self._t = threading.Timer(deadline_s, self._fire)
        self._t.daemon = True
        self._t.start()

    def attach(self, sock: Any) -> None:
        with self._lock:
            self._sock = sock
            if self.fired:
                self._shut()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            self._shut()

    def _shut(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass

    def slow(self) -> Exception:
        from tuf.api import exceptions as X
        return X.SlowRetrievalError(f"{self.url}: not complete after the {self.deadline_s:g} s deadline")

    def count(self, k: int) -> None:
        """Account ``k`` more bytes; raise SlowRetrievalError past the deadline or under the rate."""
        from tuf.api import exceptions as X
        self.n += k
        el = time.monotonic() - self.t0
        if self.fired or el > self.deadline_s:
            self.fired = True
            raise self.slow()
        if self.min_rate and el > self.grace_s and self.n < self.min_rate * el:
            raise X.SlowRetrievalError(f"{self.url}: {self.n} bytes in {el:.1f} s, under the minimum average rate "
                                       f"of {self.min_rate:g} B/s")

    def cancel(self) -> None:
        self._t.cancel()


_WATCH: contextvars.ContextVar[_Watch | None] = contextvars.ContextVar("edgepack_pull_watch", default=None)


def _watched(base: type) -> type:
    class Conn(base):  # type: ignore[misc, valid-type]
        """Hands its socket to the request's :class:`_Watch` once the request is sent, before the
        status line is read."""

        def getresponse(self, *a: Any, **kw: Any) -> Any:
            w = _WATCH.get()
            if w is not None:
                w.attach(self.sock)
            return super().getresponse(*a, **kw)

    Conn.__name__ = Conn.__qualname__ = f"Watched{base.__name__}"
    return Conn


def _pool_manager() -> Any:
    """A urllib3 PoolManager whose connections report their sockets to the current _Watch."""
    import urllib3
    from urllib3.connection import HTTPConnection, HTTPSConnection

    class Pool(urllib3.HTTPConnectionPool):
        ConnectionCls = _watched(HTTPConnection)

    class PoolS(urllib3.HTTPSConnectionPool):
        ConnectionCls = _watched(HTTPSConnection)

    pm = urllib3.PoolManager(headers={"User-Agent": "edgepack-agent"})
    pm.pool_classes_by_scheme = {"http": Pool, "https": PoolS}
    return pm


def _read1(r: Any) -> Iterator[bytes]:
    """Whatever bytes have arrived (up to CHUNK) per read, so the budget is checked while a server
    drips; ``stream()`` would block until a whole chunk is in."""
    while True:
        b = r.read1(CHUNK)
        if not b:
            return
        yield b


class _Net:
    """The pull's HTTP client: one connection pool, per-request budgets (:class:`_Watch`), and
    request/byte counters (what a poll costs is measured, not estimated)."""

    def __init__(self, *, deadline_s: float, gap_s: float, min_rate_bps: float, grace_s: float):
        self.deadline_s, self.gap_s, self.min_rate, self.grace_s = deadline_s, gap_s, min_rate_bps, grace_s
        self.http = _pool_manager()
        self.requests = 0
        self.bytes = 0
        self.log: list[tuple[str, int]] = []

    def open(self, method: str, url: str, *, length: int | None = None, **kw: Any) -> tuple[Any, _Watch]:
        """Send the request; return the response (headers read, body not) and its watch. The
        deadline is ``deadline_s`` plus, for a body of known ``length``, the time it takes at the
        minimum rate: a large bundle on a slow but honest link is not cut off."""
        import urllib3
        from tuf.api import exceptions as X
        deadline = self.deadline_s + (length / self.min_rate if length and self.min_rate else 0.0)
        w = _Watch(url, deadline_s=deadline, min_rate_bps=self.min_rate, grace_s=self.grace_s)
        self.requests += 1
        tok = _WATCH.set(w)
        try:
            r = self.http.request(method, url, preload_content=False, retries=False,
                                  timeout=urllib3.Timeout(connect=self.gap_s, read=self.gap_s), **kw)
        except urllib3.exceptions.HTTPError as e:
            w.cancel()
            if w.fired:
                raise w.slow() from None
            if isinstance(e, urllib3.exceptions.TimeoutError):
                raise X.SlowRetrievalError(f"{url}: no byte for {self.gap_s:g} s ({e})") from None
            raise X.DownloadError(f"{url}: {e}") from None
        finally:
            _WATCH.reset(tok)
        return r, w

    def body(self, url: str, r: Any, w: _Watch) -> Iterator[bytes]:
        """The response body, chunk by chunk, under the watch's budget. The connection goes back to
        the pool only after a complete, in-budget body; otherwise it is closed."""
        import urllib3
        from tuf.api import exceptions as X
        ok = False
        try:
            for chunk in _read1(r):
                self.bytes += len(chunk)
                w.count(len(chunk))
                yield chunk
            if w.fired:  # a shut-down socket may read as a quiet end: never pass that on as complete
                raise w.slow()
            ok = True
        except urllib3.exceptions.HTTPError as e:
            if w.fired:
                raise w.slow() from None
            if isinstance(e, urllib3.exceptions.TimeoutError):
                raise X.SlowRetrievalError(f"{url}: no byte for {self.gap_s:g} s ({e})") from None
            raise X.DownloadError(f"{url}: {e} (resumes next run)") from None
        except OSError as e:
            if w.fired:
                raise w.slow() from None
            raise X.DownloadError(f"{url}: {e} (resumes next run)") from None
        finally:
            w.cancel()
            self.log.append((url.rsplit("/", 1)[-1], w.n))
            if ok:
                r.release_conn()
            else:
                r.close()


def _fetcher_cls():
    from tuf.api import exceptions as X
    from tuf.ngclient import FetcherInterface

    class BoundedFetcher(FetcherInterface):
        """python-tuf's fetcher interface over :class:`_Net`: every metadata request is bounded by
        the total deadline and the minimum rate (TUF itself bounds the length)."""

        def __init__(self, net: _Net):
            self.net = net

        def _fetch(self, url: str) -> Iterator[bytes]:
            r, w = self.net.open("GET", url)
            if r.status >= 400:
                w.cancel()
                r.close()
                self.net.log.append((url.rsplit("/", 1)[-1], 0))
                raise X.DownloadHTTPError(f"HTTP {r.status} for {url}", r.status)
            return self.net.body(url, r, w)

    return BoundedFetcher


def _download(url: str, dest: Path, length: int, *, net: _Net) -> int:
    """GET ``url`` into ``dest`` (``dest.part`` resumed with a Range request), never reading more
    than ``length`` bytes in total, within the request's budget. Returns the bytes transferred."""
    from tuf.api import exceptions as X
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > length:
        part.unlink()
        have = 0
    if have == length:
        commit_file(part, dest)
        return 0
    r, w = net.open("GET", url, length=length - have, headers={"Range": f"bytes={have}-"} if have else {})
    if r.status >= 400:
        w.cancel()
        r.close()
        raise X.DownloadHTTPError(f"HTTP {r.status} for {url}", r.status)
    if have and r.status != 206:  # the server ignored the Range: start again from byte 0
        have = 0
    got = 0
    with open(part, "ab" if have else "wb") as f:
        try:
            for chunk in net.body(url, r, w):
                got += len(chunk)
                if have + got > length:
                    raise X.DownloadLengthMismatchError(f"{url}: more than the signed {length} bytes")
                f.write(chunk)
        finally:
            f.flush()
            os.fsync(f.fileno())
    if have + got != length:
        raise X.DownloadError(f"{url}: connection closed after {have + got} of {length} bytes (resumes next run)")
    commit_file(part, dest)
    return got


# --------------------------------------------------------------------------- the poll
@dataclass(frozen=True, kw_only=True)
class PullOptions:
    repo_url: str
    board_id: str | None = None
    model: str | None = None
    tuf_root: Path | None = None          # first run: the repository's root.json (flashed with the board)
    report_url: str | None = None         # default: <repo_url>/reports
    deadline_s: float = DEFAULT_TIMEOUT_S
    gap_s: float = DEFAULT_GAP_S
    min_rate_bps: float = DEFAULT_MIN_RATE  # 0: no minimum rate (the deadline alone)
    grace_s: float = DEFAULT_GRACE_S
    upload: bool = True


@dataclass
class PullResult:
    board: str
    action: str  # nothing-new | installed | rolled-back | recalled | refused | not-admitted
    release_before: int | None
    release_after: int | None
    target: str | None = None
    kind: str | None = None
    bundle_bytes: int = 0
    bytes_downloaded: int = 0
    requests: int = 0
    metadata_bytes: int = 0
    bucket: int | None = None
    seconds: float = 0.0
    install: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    report_key: str | None = None
    report_uploaded: bool | None = None
    fetched: list[tuple[str, int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Puller:
    def __init__(self, agent: Any, opt: PullOptions):
        self.agent, self.opt = agent, opt
        self.dir = agent.sd.path / "pull"
        self.meta_dir = self.dir / "tuf"
        self.dl_dir = self.dir / "downloads"
        self.outbox = self.dir / "outbox"
        self.repo = opt.repo_url.rstrip("/")
        self.install_error: BaseException | None = None

    def _skipped(self) -> set[str]:
        try:
            d = json.loads((self.dir / "skip.json").read_text())
            return set(d) if isinstance(d, dict) else set()
        except (OSError, ValueError):
            return set()

    def _skip(self, content_sha256: Any, error: dict[str, Any]) -> None:
        """Remember a release this board refused or rolled back: a new release (other content) clears it."""
        if not isinstance(content_sha256, str):
            return
        try:
            d = json.loads((self.dir / "skip.json").read_text())
        except (OSError, ValueError):
            d = {}
        d = d if isinstance(d, dict) else {}
        d[content_sha256] = {"time": iso(), "error": error}
        atomic_write_json(self.dir / "skip.json", dict(list(d.items())[-50:]))

    # ------------------------------------------------------------ identity
    def board_id(self) -> str:
        bid = self.opt.board_id or os.environ.get("EDGEPACK_BOARD_ID")
        f = self.dir / "board-id"
        if not bid:
            if f.is_file():
                bid = f.read_text().strip()
            else:
                bid = f"board-{uuid.uuid4().hex[:16]}"
                self.dir.mkdir(parents=True, exist_ok=True)
                atomic_write(f, bid.encode() + b"\n")
        if not BOARD_ID_RE.match(bid):
            raise UsageError(f"board id {bid!r} must match {BOARD_ID_RE.pattern}")
        return bid

    # ------------------------------------------------------------ TUF
    def updater(self, fetcher: Any):
        from tuf.ngclient import Updater
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        boot = None
        if not (self.meta_dir / "root.json").exists():
            if not self.opt.tuf_root:
                raise UsageError(f"no trusted repository root in {self.meta_dir}; pass --tuf-root ROOT.json once "
                                 "(the repository's metadata/root.json, flashed with the board)")
            try:
                boot = Path(self.opt.tuf_root).read_bytes()
            except OSError as e:
                raise UsageError(f"cannot read --tuf-root {self.opt.tuf_root}: {e.strerror}") from None
        try:
            return Updater(str(self.meta_dir), f"{self.repo}/metadata/", str(self.dl_dir), f"{self.repo}/targets/",
                           fetcher=fetcher, bootstrap=boot)
        except Exception as e:  # a corrupt or forged bootstrap root
            raise named(e) from None

    def verified_targets(self) -> dict[str, Any]:
        """The targets metadata this refresh verified (ngclient persists only verified bytes)."""
        from tuf.api.metadata import Metadata
        md = Metadata.from_bytes((self.meta_dir / "targets.json").read_bytes())
        return dict(md.signed.targets)

    # ------------------------------------------------------------ the run
    def run(self) -> PullResult:
        t0 = time.perf_counter()
        with self.agent.locked():
            res = self._run()
        res.seconds = round(time.perf_counter() - t0, 3)
        if res.action != "nothing-new" and res.action != "not-admitted":
            self.report(res)
        return res

    def _active(self) -> tuple[Any, Any]:
        self.agent.recover()
        st = self.agent.sd.load()
        info = self.agent.slots.info(st.active) if st.active else None
        return st, info

    def _run(self) -> PullResult:
        cfg = self.agent.board()
        bid = self.board_id()
        st, info = self._active()
        model = self.opt.model or (info.model if info else None)
        if not model:
            raise UsageError("no release installed and no --model given: which model should this board pull?")
        before = info.release if info else None
        res = PullResult(board=bid, action="nothing-new", release_before=before, release_after=before,
                         bucket=cohort_bucket(bid, model))
        net = self.net()
        fetcher = _fetcher_cls()(net)
        try:
            up = self.updater(fetcher)
            up.refresh()
            targets = self.verified_targets()
        except PullError:
            raise
        except Exception as e:
            raise self._fail(res, net, named(e, metadata=True)) from None
        finally:
            res.requests, res.metadata_bytes, res.fetched = net.requests, net.bytes, list(net.log)
        ours = {}
        for path, tf in targets.items():
            c = (tf.custom or {}).get(CUSTOM) if isinstance(tf.custom, dict) else None
            if isinstance(c, dict) and c.get("model") == model and cfg.target in (c.get("targets") or []) \
                    and isinstance(c.get("release"), int):
                ours[path] = (tf, c)
        # a recalled release that this board runs: roll back to the kept previous one
        if info is not None:
            for path, (tf, c) in ours.items():
                if c["release"] == info.release and c.get("content_sha256") == info.content_sha256 \
                        and (c.get("rollout") or {}).get("recall") and st.previous:
                    r = self.agent.rollback(f"release {info.release} recalled by the repository")
                    res.action, res.release_after = "recalled", (r.get("active") or {}).get("release")
                    res.install = {"ok": True, "rollback": r}
                    return res
        skip = self._skipped()
        newer = [(tf, c) for tf, c in ours.values() if c["release"] > st.counter
                 and c.get("content_sha256") not in skip]
        if not newer:
            return res
        best = max(c["release"] for _, c in newer)
        cands = [(tf, c) for tf, c in newer if c["release"] == best]
        if not admitted(cands[0][1].get("rollout"), res.bucket):
            res.action = "not-admitted"
            return res
        pick = next(((tf, c) for tf, c in cands if c.get("kind") == "delta" and info is not None
                     and c.get("base_content_sha256") == info.content_sha256), None) \
            or next(((tf, c) for tf, c in cands if c.get("kind") == "full"), None)
        if pick is None:
            return res
        tf, c = pick
        res.target, res.kind, res.bundle_bytes = tf.path, c.get("kind"), tf.length
        path = self._fetch_target(tf, net, res)
        try:
            rep = self.agent.install(path)
            res.action, res.release_after = "installed", rep.release
            res.install = {"ok": True, **rep.to_json()}
        except (AgentError, OtaError) as e:
            res.action = "rolled-back" if getattr(e, "report", None) is not None else "refused"
            res.install = {"ok": False, "error": {"type": type(e).__name__, "message": str(e),
                                                  "exit_code": getattr(e, "exit_code", 1)},
                           **({"report": e.report.to_json()} if getattr(e, "report", None) else {})}
            res.error = res.install["error"]
            self.install_error = e
            if type(e).__name__ not in TRANSIENT:
                self._skip(c.get("content_sha256"), res.error)  # do not fetch it again every poll
            _, info2 = self._active()
            res.release_after = info2.release if info2 else None
        finally:
            path.unlink(missing_ok=True)
        return res

    def _fail(self, res: PullResult, net: _Net, err: PullError) -> PullError:
        res.action = "refused"
        res.error = {"type": type(err).__name__, "message": str(err), "exit_code": err.exit_code}
        res.requests = net.requests
        err.result = res  # type: ignore[attr-defined]
        return err

    def _fetch_target(self, tf: Any, net: _Net, res: PullResult) -> Path:
        h = tf.hashes["sha256"]
        d, _, leaf = tf.path.rpartition("/")
        url = f"{self.repo}/targets/{d + '/' if d else ''}{h}.{leaf}"
        self.dl_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dl_dir.glob("*.part"):
            if not stale.name.startswith(h[:32]):
                stale.unlink()  # a partial download of a release that is no longer the one to fetch
        dest = self.dl_dir / f"{h[:32]}.bundle"
        from tuf.api import exceptions as X
        try:
            res.bytes_downloaded += _download(url, dest, tf.length, net=net)
            with open(dest, "rb") as f:
                tf.verify_length_and_hashes(f)
        except X.DownloadHTTPError as e:
            raise self._fail(res, net, named(e)) from None
        except Exception as e:
            if isinstance(e, (X.LengthOrHashMismatchError, X.DownloadLengthMismatchError)):
                dest.unlink(missing_ok=True)
                dest.with_name(dest.name + ".part").unlink(missing_ok=True)
            raise self._fail(res, net, named(e)) from None
        finally:
            res.requests = net.requests
        return dest

    # ------------------------------------------------------------ reports
    def report_doc(self, res: PullResult) -> dict[str, Any]:
        return {"format": "edgepack-pull-report", "version": 1, "board": res.board, "time": iso(),
                "repo": self.repo, "target": self.agent.board().target, "result": res.to_json()}

    def report(self, res: PullResult) -> None:
        """Queue the report in the outbox, then upload everything queued (oldest first)."""
        doc = self.report_doc(res)
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"  # keys sort by time
        key = f"{stamp}-{res.board}-{uuid.uuid4().hex[:8]}.json"
        self.outbox.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.outbox / key, doc)
        res.report_key = f"reports/{key}"
        atomic_write_json(self.dir / "last-report.json", doc)
        if self.opt.upload:
            res.report_uploaded = self.flush_outbox()

    def net(self) -> _Net:
        o = self.opt
        return _Net(deadline_s=o.deadline_s, gap_s=o.gap_s, min_rate_bps=o.min_rate_bps, grace_s=o.grace_s)

    def flush_outbox(self) -> bool:
        """PUT every queued report (oldest first); stop at the first failure and keep the rest for
        the next run. Each upload is under the same budget as a download: a report endpoint that
        trickles its reply cannot hold the board either."""
        base = (self.opt.report_url or f"{self.repo}/reports").rstrip("/")
        net = self.net()
        for p in sorted(self.outbox.glob("*.json")):
            url = f"{base}/{p.name}"
            try:
                r, w = net.open("PUT", url, body=p.read_bytes(), headers={"Content-Type": "application/json"})
                status, got = r.status, 0
                for chunk in net.body(url, r, w):  # the reply is not used: read at most 64 KiB of it
                    got += len(chunk)
                    if got > 65536:
                        break
            except Exception:  # network or budget: the report stays queued
                return False
            if status >= 300:
                return False
            p.unlink()
        fsync_dir(self.outbox)
        return True


# securesystemslib imports, at import time, the SDK of every optional cloud/HSM signer it finds
# installed (boto3 alone costs ~0.45 s of CPU per poll on a 2-core host). A board only verifies
# metadata, never signs it, so these are hidden while python-tuf is first imported, and made
# importable again right after (a host process that imports this module keeps its boto3).
_SIGNER_SDKS = ("boto3", "hvac", "pkcs11", "google.cloud.kms", "azure.identity")


def _import_tuf() -> None:
    import sys
    if "tuf.ngclient" in sys.modules:
        return
    hidden = [m for m in _SIGNER_SDKS if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]  # import of m raises ImportError
    try:
        import tuf.ngclient  # noqa: F401
    finally:
        for m in hidden:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]


def pull(state_dir: str | Path | None, options: PullOptions) -> PullResult:
    """One poll-and-install run for the board in ``state_dir`` (see the module docstring).

    A refused or rolled-back install re-raises the agent's own error (exit 5/6/7 as for
    ``install``) with ``.report`` = the PullResult; repository failures raise a ``PullError``."""
    from .install import Agent
    try:
        _import_tuf()
    except ImportError:
        raise UsageError("`pull` needs python-tuf on the board: pip install 'edgepack[agent-pull]' "
                         "(tuf, with urllib3 and securesystemslib)") from None
    p = Puller(Agent(state_dir), options)
    try:
        res = p.run()
    except PullError as e:
        res = getattr(e, "result", None)
        if res is not None:
            e.report = res  # type: ignore[attr-defined]
            try:
                p.report(res)
            except Exception:  # the report is best effort; the named error is what matters
                pass
        raise
    if p.install_error is not None:
        p.install_error.report = res  # type: ignore[attr-defined]
        raise p.install_error
    return res


__all__ = ["pull", "PullOptions", "PullResult", "Puller", "cohort_bucket", "admitted", "named", "PullError",
           "RepositoryUnreachable", "MetadataUnsigned", "MetadataRollback", "MetadataExpired", "MetadataMismatch", "TargetHashMismatch",
           "EndlessData", "SlowRetrieval", "RepositoryRefused"]
