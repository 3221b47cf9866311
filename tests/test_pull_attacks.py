"""Repository attacks against `edgepack-agent pull` (TUF's attack classes), through real nginx on
loopback serving a repository folder the "attacker" rewrites. Each is refused with a named error
and nothing is installed (the board stays on release 1, no install was even started)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pull_helpers import Nginx, Trickle, have_nginx, init_boards, make_releases

from device_agent import pull as P
from device_agent.install import Agent
from edgepack.fleet import Store
from edgepack.fleet.ingest import ingest, repository_refusals
from edgepack.fleet.publish import RepoOptions, TufRepository, publish
from edgepack.fleet.storage import FolderBackend

pytestmark = pytest.mark.skipif(not have_nginx(), reason="nginx not installed (scripts/setup.sh installs it via APT_PKGS)")


@pytest.fixture(scope="module")
def rel(tmp_path_factory):
    return make_releases(tmp_path_factory.mktemp("rel"))


@dataclass
class World:
    repo: Path
    keys: Path
    board: Path
    ng: Nginx
    rel: object

    @property
    def meta(self) -> Path:
        return self.repo / "metadata"

    def opt(self, **kw) -> P.PullOptions:
        return P.PullOptions(repo_url=kw.pop("url", self.ng.url), board_id="victim", model="mlp",
                             tuf_root=self.meta / "root.json", **kw)

    def pull(self, **kw) -> P.PullResult:
        return P.pull(self.board, self.opt(**kw))

    def publish_r2(self, percent: float = 100) -> None:
        publish(self.rel.r2, str(self.repo), self.keys, percent=percent)

    def assert_nothing_installed(self) -> None:
        a = Agent(self.board)
        st = a.sd.load()
        assert st.counter == 1 and a.slots.info(st.active).release == 1
        assert [h for h in st.history if h["event"] == "install-start" and h.get("release") != 1] == []
        dl = self.board / "pull" / "downloads"
        assert not dl.exists() or not list(dl.glob("*.bundle"))


def _world(tmp_path, rel, options=None) -> World:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    TufRepository.init(str(repo), keys, options=options)
    publish(rel.r1, str(repo), keys, percent=100, options=options)
    ng = Nginx(tmp_path / "nginx", repo).start()
    [board] = init_boards(tmp_path / "boards", rel, 1)
    w = World(repo, keys, board, ng, rel)
    assert w.pull().release_after == 1  # the board trusts the repository at its current versions
    return w


@pytest.fixture
def world(tmp_path, rel):
    w = _world(tmp_path, rel)
    yield w
    w.ng.stop()


def _signer(keys: Path, role: str):
    from securesystemslib.signer import CryptoSigner

    from edgepack.ota.keys import load_signing_key
    return CryptoSigner(load_signing_key(keys / f"tuf-{role}.key")._key)


def _forge_timestamp(w: World, version: int, snapshot_version: int) -> None:
    """What an attacker holding only the timestamp key can publish."""
    from tuf.api.metadata import Metadata
    from tuf.api.serialization.json import JSONSerializer
    md = Metadata.from_bytes((w.meta / "timestamp.json").read_bytes())
    md.signed.version = version
    md.signed.snapshot_meta.version = snapshot_version
    md.signed.snapshot_meta.length = None
    md.sign(_signer(w.keys, "timestamp"))
    (w.meta / "timestamp.json").write_bytes(md.to_bytes(JSONSerializer(compact=True)))


def _target_object(w: World, name: str) -> Path:
    [p] = list((w.repo / "targets" / "mlp").glob(f"*.{name}"))
    return p


def test_arbitrary_package_replaced_bytes(world):
    world.publish_r2()
    for name in ("r2-full.bundle", "r2-from-r1.bundle"):
        p = _target_object(world, name)
        p.write_bytes(bytes(len(p.read_bytes())))  # same length, other bytes
    with pytest.raises(P.TargetHashMismatch):
        world.pull()
    world.assert_nothing_installed()


def test_arbitrary_package_forged_targets_metadata(world):
    """A targets file naming the attacker's bundle, without the targets key: refused before download."""
    world.publish_r2()
    tv = max(int(p.name.split(".")[0]) for p in world.meta.glob("*.targets.json"))
    f = world.meta / f"{tv}.targets.json"
    d = json.loads(f.read_text())
    for t in d["signed"]["targets"].values():
        t["hashes"]["sha256"] = "0" * 64
    f.write_text(json.dumps(d, separators=(",", ":")))
    (world.meta / "timestamp.json").touch()
    # snapshot pins the targets length: pad/cut the forged file to that length so the signature check decides
    with pytest.raises((P.MetadataUnsigned, P.MetadataMismatch)):
        world.pull()
    world.assert_nothing_installed()


def test_rollback_old_timestamp_replayed(world):
    old = (world.meta / "timestamp.json").read_bytes()
    world.publish_r2(percent=0)
    assert world.pull().action == "not-admitted"  # the board now trusts the newer timestamp
    (world.meta / "timestamp.json").write_bytes(old)
    with pytest.raises(P.MetadataRollback):
        world.pull()
    world.assert_nothing_installed()


def test_indefinite_freeze_expired_timestamp(tmp_path, rel):
    w = _world(tmp_path, rel, RepoOptions(timestamp_days=3 / 86400))  # a 3 s timestamp
    try:
        publish(rel.r2, str(w.repo), w.keys, percent=100, options=RepoOptions(timestamp_days=3 / 86400))
        frozen = (w.meta / "timestamp.json").read_bytes()
        time.sleep(3.5)
        (w.meta / "timestamp.json").write_bytes(frozen)  # ... metadata that has since expired
        with pytest.raises(P.MetadataExpired):
            w.pull()
        w.assert_nothing_installed()
    finally:
        w.ng.stop()


def test_endless_data_metadata_and_target(world):
    good = (world.meta / "timestamp.json").read_bytes()
    (world.meta / "timestamp.json").write_bytes(good[:-1] + b" " * 200_000 + b"}")
    with pytest.raises(P.EndlessData):
        world.pull()
    (world.meta / "timestamp.json").write_bytes(good)
    world.publish_r2()
    for name in ("r2-full.bundle", "r2-from-r1.bundle"):
        p = _target_object(world, name)
        p.write_bytes(p.read_bytes() + bytes(5 << 20))
    with pytest.raises(P.EndlessData):
        world.pull()
    world.assert_nothing_installed()


def test_mix_and_match_old_targets_under_new_snapshot(world):
    world.publish_r2()
    vs = sorted(int(p.name.split(".")[0]) for p in world.meta.glob("*.targets.json"))
    (world.meta / f"{vs[-1]}.targets.json").write_bytes((world.meta / f"{vs[-2]}.targets.json").read_bytes())
    with pytest.raises((P.MetadataMismatch, P.MetadataRollback)):
        world.pull()
    world.assert_nothing_installed()


def test_fast_forward_then_recovery_by_key_rotation(world):
    """A stolen timestamp key fast-forwards the board to timestamp v1000000 (TUF cannot tell: the
    signature is valid). Recovery: the host rotates the timestamp key in a new root; the board
    drops the fast-forwarded timestamp with the old key and installs the next release."""
    sv = json.loads((world.meta / "timestamp.json").read_text())["signed"]["meta"]["snapshot.json"]["version"]
    _forge_timestamp(world, 1_000_000, sv)
    assert world.pull().action == "nothing-new"
    world.assert_nothing_installed()
    world.publish_r2(percent=0)
    TufRepository.open(str(world.repo), world.keys).rotate_key("timestamp")
    from edgepack.fleet.rollout import set_rollout
    set_rollout(str(world.repo), world.keys, 2, percent=100)
    r = world.pull()
    assert r.action == "installed" and r.release_after == 2


def _forge_snapshot(w: World, version: int, targets_version: int) -> None:
    """What an attacker holding the snapshot key can publish: a snapshot of any version naming a
    targets version of its choice (it cannot sign targets)."""
    from tuf.api.metadata import Metadata
    from tuf.api.serialization.json import JSONSerializer
    snaps = sorted(w.meta.glob("*.snapshot.json"), key=lambda p: int(p.name.split(".")[0]))
    md = Metadata.from_bytes(snaps[-1].read_bytes())
    md.signed.version = version
    md.signed.meta["targets.json"].version = targets_version
    md.signed.meta["targets.json"].length = None
    md.sign(_signer(w.keys, "snapshot"))
    (w.meta / f"{version}.snapshot.json").write_bytes(md.to_bytes(JSONSerializer(compact=True)))


def test_snapshot_fast_forward_needs_snapshot_and_timestamp_rotation(world):
    """Stolen snapshot + timestamp keys: the board is made to trust targets v1000000 (which does not
    exist), so every honest snapshot after it is a rollback. Rotating the timestamp key alone is not
    enough (the stored snapshot still verifies); rotating the snapshot key too recovers, and the
    board installs the next release. Every step before that is a named error, nothing installed."""
    honest = (world.meta / "timestamp.json").read_bytes()
    _forge_snapshot(world, 1_000_000, 1_000_000)
    _forge_timestamp(world, 1_000_000, 1_000_000)
    with pytest.raises(P.RepositoryUnreachable):  # 1000000.targets.json: 404, but the snapshot is now trusted
        world.pull()
    world.assert_nothing_installed()
    (world.meta / "timestamp.json").write_bytes(honest)  # the attacker's mirror is gone ...
    (world.meta / "1000000.snapshot.json").unlink()
    world.publish_r2()  # ... and the honest repository moves on
    with pytest.raises(P.MetadataRollback):
        world.pull()
    with Store(world.repo.parent / "fleet.db") as st:  # the host sees it in the uploaded reports
        ingest(st, FolderBackend(world.repo))
        [ref] = repository_refusals(st)
    assert ref["board"] == "victim" and ref["error"] == "MetadataRollback" and "repo rotate" in ref["advice"]
    repo = TufRepository.open(str(world.repo), world.keys)
    root_v = repo.root.signed.version
    repo.rotate_keys(["timestamp"])
    with pytest.raises(P.MetadataRollback, match="targets"):  # the forged snapshot still verifies: still stuck
        world.pull()
    world.assert_nothing_installed()
    assert TufRepository.open(str(world.repo), world.keys).rotate_keys(["snapshot", "timestamp"]) == root_v + 2
    r = world.pull()
    assert r.action == "installed" and r.release_after == 2


def test_compromised_timestamp_key_alone_freeze_ends_at_snapshot_expiry(tmp_path, rel):
    """The timestamp key alone can keep re-signing a fresh timestamp that points at the snapshot the
    board already has, hiding newer releases; the snapshot's own (short) expiry bounds that freeze:
    once it passes, the board refuses the repository (MetadataExpired) instead of staying silent."""
    short = RepoOptions(snapshot_days=6 / 86400)  # a 6 s snapshot
    w = _world(tmp_path, rel)
    try:
        publish(rel.r2, str(w.repo), w.keys, percent=0, options=short)
        t_pub = time.monotonic()
        assert w.pull().action == "not-admitted"  # the board now holds the short-lived snapshot
        sv = json.loads((w.meta / "timestamp.json").read_text())["signed"]["meta"]["snapshot.json"]["version"]
        from edgepack.fleet.rollout import set_rollout
        set_rollout(str(w.repo), w.keys, 2, percent=100)  # the honest host admits everyone ...
        _forge_timestamp(w, 1_000, sv)  # ... but the attacker's timestamp still points at the old snapshot
        assert w.pull().action == "not-admitted"  # frozen, while the snapshot lasts
        time.sleep(max(0.0, 6.5 - (time.monotonic() - t_pub)))
        _forge_timestamp(w, 1_001, sv)
        with pytest.raises(P.MetadataExpired, match="snapshot"):
            w.pull()
        w.assert_nothing_installed()
    finally:
        w.ng.stop()


def test_compromised_timestamp_key_alone_cannot_install(world):
    """The timestamp key can point at any snapshot, but cannot sign one: a snapshot naming the
    attacker's targets is refused."""
    from tuf.api.metadata import Metadata
    snaps = sorted(world.meta.glob("*.snapshot.json"), key=lambda p: int(p.name.split(".")[0]))
    md = Metadata.from_bytes(snaps[-1].read_bytes())
    md.signed.version = 99
    md.sign(_signer(world.keys, "timestamp"))  # the only key the attacker holds
    (world.meta / "99.snapshot.json").write_bytes(md.to_bytes())
    _forge_timestamp(world, 99, 99)
    with pytest.raises(P.MetadataUnsigned):
        world.pull()
    world.assert_nothing_installed()


# ----------------------------------------------------------------- slow retrieval
# A trickling server is refused by the pull's budget (device_agent.pull._Watch): a minimum average
# rate after a grace period, and a total deadline that shuts the socket down wherever the read is
# blocked (headers included). Small limits here so that each case ends in about a second.
FAST = dict(gap_s=1.0, grace_s=0.3)


def _trickle(w: World, **kw) -> Trickle:
    return Trickle(w.repo, **kw)


def test_slow_retrieval_metadata_under_minimum_rate(world):
    t = _trickle(world, slow=lambda p: p.endswith("/timestamp.json"), rate=5)  # 5 B/s, one byte per 0.2 s
    try:
        t0 = time.monotonic()
        with pytest.raises(P.SlowRetrieval, match="minimum average rate"):
            world.pull(url=t.url, deadline_s=30, min_rate_bps=256, **FAST)
        assert time.monotonic() - t0 < 5 and t.hits == 1  # the rate, not the 30 s deadline, ended it
    finally:
        t.stop()
    world.assert_nothing_installed()


def test_slow_retrieval_headers_trickled_bounded_by_deadline(world):
    """A byte of the status line every 0.2 s: under the gap timeout, no body byte for the rate check
    to see. Only the total deadline can end it, by shutting the socket down mid-read."""
    t = _trickle(world, slow=lambda p: p.endswith("/timestamp.json"), rate=5, mode="headers")
    try:
        t0 = time.monotonic()
        with pytest.raises(P.SlowRetrieval, match="deadline"):
            world.pull(url=t.url, deadline_s=1.5, min_rate_bps=256, **FAST)
        assert time.monotonic() - t0 < 6
    finally:
        t.stop()
    world.assert_nothing_installed()


@pytest.mark.parametrize("bound", ["min-rate", "deadline"])
def test_slow_retrieval_bundle_refused_then_resumed(world, bound):
    """Metadata at full speed, the bundle at 400 B/s: refused by the minimum rate, or (rate check
    off) by the deadline, with nothing installed; the partial download is kept, and the next poll
    against an honest server resumes it with a Range request and installs."""
    world.publish_r2()
    t = _trickle(world, slow=lambda p: "/targets/" in p, rate=400)
    opts = dict(deadline_s=30, min_rate_bps=4096) if bound == "min-rate" else dict(deadline_s=1.0, min_rate_bps=0)
    try:
        t0 = time.monotonic()
        with pytest.raises(P.SlowRetrieval, match="minimum average rate" if bound == "min-rate" else "deadline") as ei:
            world.pull(url=t.url, **opts, **FAST)
        assert time.monotonic() - t0 < 6 and t.hits == 1
    finally:
        t.stop()
    world.assert_nothing_installed()
    res = ei.value.report
    [part] = list((world.board / "pull" / "downloads").glob("*.part"))
    kept = part.stat().st_size
    assert 0 < kept < res.bundle_bytes
    r = world.pull()  # nginx honours Range
    assert r.action == "installed" and r.release_after == 2 and r.target == res.target
    assert r.bytes_downloaded == r.bundle_bytes - kept  # resumed, not fetched again


def test_slow_report_endpoint_does_not_hold_the_board(world):
    """The install is done; a report endpoint that trickles its reply is cut off by the deadline
    and the report stays queued for the next run."""
    world.publish_r2()
    t = _trickle(world, slow=lambda p: p.startswith("/reports/"), rate=5)
    try:
        t0 = time.monotonic()
        r = world.pull(report_url=t.url + "/reports", deadline_s=1.5, min_rate_bps=256, **FAST)
        assert time.monotonic() - t0 < 8 and t.hits == 1
    finally:
        t.stop()
    assert r.action == "installed" and r.report_uploaded is False
    assert len(list((world.board / "pull" / "outbox").glob("*.json"))) == 1


def test_named_errors_over_the_cli(world, tmp_path):
    """The real agent process: one JSON error naming the check, exit 12, nothing installed."""
    import subprocess
    import sys

    from pull_helpers import ROOT_DIR
    good = (world.meta / "timestamp.json").read_bytes()
    world.publish_r2(percent=0)
    assert world.pull().action == "not-admitted"
    (world.meta / "timestamp.json").write_bytes(good)
    r = subprocess.run([sys.executable, "-m", "device_agent", "--state", str(world.board), "pull", "--repo",
                        world.ng.url, "--board-id", "victim"], capture_output=True, text=True, cwd=ROOT_DIR, timeout=120)
    j = json.loads(r.stdout)
    assert r.returncode == 12 and j["error"]["type"] == "MetadataRollback", (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    world.assert_nothing_installed()
    # the operator's way out of a fast-forward: rotate both online roles in one root version
    r = subprocess.run([sys.executable, "-m", "edgepack.cli", "repo", "rotate", "snapshot", "timestamp", "--repo",
                        str(world.repo), "--keys", str(world.keys), "--json"], capture_output=True, text=True,
                       cwd=ROOT_DIR, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"root_version": 2, "roles": ["snapshot", "timestamp"]}
    assert sorted(p.name for p in world.keys.glob("tuf-*.key.retired-1")) == ["tuf-snapshot.key.retired-1",
                                                                              "tuf-timestamp.key.retired-1"]
