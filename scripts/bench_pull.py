"""Pull-fleet benchmark (issue 16). Two parts, each writing its section of the JSON:

fleet (``--boards N``): a real SeaweedFS S3 server (origin) behind a real Debian nginx (the CDN,
caching bundles and versioned metadata) on loopback; N simulated boards, each its own state
directory (copied from one board flashed and on release 1) and a real ``edgepack-agent pull``
process per poll (``python -m device_agent``, this checkout), ``--concurrency`` at a time:

- release 2 (full + delta) published at 0 %, then ``edgepack rollout set 2 --percent 100``: time
  to 99 % of boards committed, bytes per board (the delta is chosen), CPU seconds (boards, nginx +
  weed, this process), peak RSS of a pulling board (``wait4``);
- a poll with nothing new, measured on the wire (nginx's log: requests, bytes);
- a bad release 3 (its trial fails on every board) at 5 %: every board polls, ``rollout watch``
  halts it from the reports, and no board outside the cohort touched it (its history and counter);
- the same release 2 to ``--ssh-sample`` boards on release 1 by ``edgepack push`` over SSH (one
  Debian sshd per board), for comparison.

All boards share this host's cores: the wall time is the boards' own CPU (python start, verify,
delta apply, ORT trial) queued on 2 cores, which a real fleet spends on its own boards.

ingest (``--reports R``): R report objects in the agent's format (2 rows each) into the SQLite
store through the path ``fleet ingest`` uses after fetching (``ingest_objects``): rows/s, store
size, re-ingest adds nothing, then ``fleet check-reports`` over them.

    PYTHONPATH=. nice -n 10 python scripts/bench_pull.py --boards 200 --concurrency 3 --ssh-sample 30 \
        --reports 500000 --ingest-boards 100000 -o docs/bench_pull.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the loopback servers and release set of the pull tests

from edgepack.fleet import Store  # noqa: E402
from edgepack.fleet.ingest import check_reports, ingest_objects, repository_refusals  # noqa: E402


def objects(n: int, boards: int):
    t0 = 1_790_000_000
    for i in range(n):
        b = f"board-{i % boards:07d}"
        rel = 1 + i // boards
        ts = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t0 + i)) + f".{i % 1000000:06d}Z"
        doc = {"format": "edgepack-pull-report", "version": 1, "board": b, "time": ts, "target": "rpi4-2gb",
               "result": {"board": b, "action": "installed", "release_before": rel - 1, "release_after": rel,
                          "kind": "delta", "bytes_downloaded": 40000, "requests": 5,
                          "install": {"ok": True, "status": "committed", "release": rel, "bundle_bytes": 40000,
                                      "trial": {"passed": True, "latency": {"p90_ms": 1.0 + (i % 7) * 0.01},
                                                "comparison": {"top1_agreement": 1.0}, "peak_rss_mb": 90.0}}}}
        yield f"reports/{ts}-{b}-{i:08x}.json", json.dumps(doc).encode()


def bench_ingest(reports: int, boards: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "fleet.db"
        with Store(db) as st:
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            rep = ingest_objects(st, objects(reports, boards), batch=5000)
            secs, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            again = ingest_objects(st, objects(2000, boards))
            t1, c1 = time.perf_counter(), time.process_time()
            chk = check_reports(st, save_flags=False)
            check_s, check_cpu = time.perf_counter() - t1, time.process_time() - c1
            t2 = time.perf_counter()
            refusals = repository_refusals(st)
            refusals_s = time.perf_counter() - t2
        size = sum(p.stat().st_size for p in Path(d).glob("fleet.db*"))
    return {"reports": reports, "rows": rep.rows, "boards": boards, "ingest_seconds": round(secs, 2),
            "ingest_cpu_seconds": round(cpu, 2), "rows_per_s": round(rep.rows / secs), "store_bytes": size,
            "reingest_new": again.new, "check_reports_seconds": round(check_s, 2),
            "check_reports_cpu_seconds": round(check_cpu, 2), "boards_judged": len(chk.boards),
            "flags": len(chk.flags), "repository_refusals_seconds": round(refusals_s, 2),
            "repository_refusals": len(refusals)}


# --------------------------------------------------------------------------- the pull fleet
def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its direct children (nginx's worker)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = st.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(st.parent.name) == pid or int(f[1]) == pid:
            total += (int(f[11]) + int(f[12])) / tick
    return total


class Cdn:
    """Debian nginx as the CDN in front of the S3 origin: bundles and versioned metadata (immutable
    names) are cached; timestamp.json and the root probe go to the origin every time; report PUTs
    are passed to the bucket. Access log: method uri status bytes_sent request_length."""

    def __init__(self, d: Path, origin: str):
        from pull_helpers import NGINX, _wait, free_port
        self.d, self.port = d, free_port()
        d.mkdir(parents=True, exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""
        up = origin.split("://", 1)[1]
        (d / "nginx.conf").write_text(f"""{user}
daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  log_format tiny '$request_method $uri $status $bytes_sent $request_length $upstream_cache_status';
  access_log {d}/access.log tiny;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  proxy_cache_path {d}/cache levels=1:2 keys_zone=cdn:10m max_size=1g inactive=1h use_temp_path=off;
  server_tokens off; keepalive_timeout 30;
  upstream origin {{ server {up}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{self.port};
    proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host {up};
    client_max_body_size 1m;
    # what a CDN in front of a bucket is set up to do: drop the origin's own headers, answer a
    # missing object with an empty 404 (the board's next-root probe), cache the immutable names
    proxy_hide_header X-Amz-Request-Id; proxy_hide_header Seaweed-X-Amz-ETag; proxy_hide_header Seaweed-X-Amz-Owner;
    proxy_hide_header Vary; proxy_intercept_errors on; error_page 403 404 = @missing;
    location @missing {{ default_type text/plain; return 404 "-"; }}  # "" would send the default page
    location ~ /(targets/|metadata/[0-9]+\\.(targets|snapshot)\\.json$) {{
      proxy_pass http://origin; proxy_cache cdn; proxy_cache_valid 200 1h; proxy_cache_lock on;
    }}
    location / {{ proxy_pass http://origin; }}
  }}
}}
""")
        self.proc = subprocess.Popen([NGINX, "-c", str(d / "nginx.conf"), "-p", str(d)], stdout=subprocess.DEVNULL,
                                     stderr=open(d / "stderr.log", "wb"))
        _wait(self.url + "/", 15)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> list[list[str]]:
        p = self.d / "access.log"
        return [ln.split() for ln in p.read_text().splitlines()] if p.exists() else []

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_pulls(states: list[tuple[str, Path]], url: str, concurrency: int, t0: float) -> list[dict]:
    """One real `edgepack-agent pull` process per board (``python -m device_agent``, this checkout),
    ``concurrency`` at a time; per process: exit code, its JSON, CPU and peak RSS (wait4)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    lock = threading.Lock()
    out: list[dict] = []

    def one(item: tuple[str, Path]) -> None:
        bid, st = item
        rss_file = st.parent / f"{st.name}.rss"
        # GNU time reports the peak RSS of the exec'd agent alone; wait4's ru_maxrss would also
        # count this (large) benchmark process's pages shared with the child at fork
        timer = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] if Path("/usr/bin/time").exists() else []
        with open(st.parent / f"{st.name}.out", "wb") as o, open(st.parent / f"{st.name}.err", "wb") as e:
            p = subprocess.Popen([*timer, sys.executable, "-m", "device_agent", "--state", str(st), "pull", "--repo",
                                  url, "--board-id", bid], stdout=o, stderr=e, env=env)
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
        try:
            maxrss_kb = int(rss_file.read_text().split()[-1])
        except (OSError, ValueError, IndexError):
            maxrss_kb = ru.ru_maxrss
        try:
            j = json.loads((st.parent / f"{st.name}.out").read_text() or "{}")
        except ValueError:
            j = {}
        r = {"board": bid, "rc": p.returncode, "done_s": time.perf_counter() - t0, "action": j.get("action"),
             "kind": j.get("kind"), "bytes": j.get("bytes_downloaded", 0), "metadata_bytes": j.get("metadata_bytes", 0),
             "requests": j.get("requests"), "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kb": maxrss_kb,
             "release_after": j.get("release_after")}
        with lock:
            out.append(r)

    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, states))
    return sorted(out, key=lambda r: r["done_s"])


def bench_releases(d: Path, hidden: int = 1024):
    """Release 1, release 2 (one tensor added, W1/W2 unchanged: what a delta is for) as full + delta,
    and a bad release 3 whose golden outputs are another model's (its trial fails on every board).
    The model file keeps one name across releases, so the delta is per tensor, not the whole file."""
    from device_agent.trust import TrustRoot
    from edgepack.ota.delta import make_delta_bundle
    from pull_helpers import Releases, bundle, golden_for, make_onnx, make_pki, write_trust
    pki = make_pki(d / "pki")
    root, _ = write_trust(pki)
    out = {}
    for r, kw in ((1, {}), (2, {"extra_tensor": True}), (3, {"drift": 0.02})):
        v = d / f"v{r}"
        v.mkdir(parents=True)
        m = make_onnx(v / "model.onnx", hidden=hidden, **kw)
        g = golden_for(make_onnx(d / "other.onnx", hidden=hidden, seed=9) if r == 3 else m, v / "golden.npz")
        (d / f"r{r}").mkdir()
        out[r] = bundle(pki, d / f"r{r}" / f"r{r}.bundle", m, release=r, golden=g)
    delta = d / "r2" / "r2-from-r1.bundle"
    make_delta_bundle(out[1], out[2], delta, trust=TrustRoot.from_bytes(pki.root_doc, pki.rk_doc), signer=pki.release[0])
    return Releases(pki, root, out[1], out[2], delta, out[3])


def _median(xs: list[float]) -> float | None:
    return round(sorted(xs)[len(xs) // 2], 2) if xs else None


def bench_fleet(n: int, concurrency: int, ssh_sample: int) -> dict:
    import random
    import shutil as sh

    from device_agent.install import Agent
    from device_agent.pull import PullOptions, cohort_bucket, pull
    from edgepack.fleet import Store
    from edgepack.fleet.publish import TufRepository, publish
    from edgepack.fleet.rollout import watch
    from edgepack.fleet.storage import S3Backend
    from pull_helpers import Weed, init_boards

    td = Path(tempfile.mkdtemp(prefix="edgepack-bench-pull-"))
    weed = cdn = None
    res: dict = {"boards": n, "concurrency": concurrency}
    try:
        rel = bench_releases(td / "rel")
        weed = Weed(td / "weed").start()  # before the credentials below: weed would make them its only identity
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        be = S3Backend("fleet", "prod", endpoint_url=weed.endpoint)
        be.ensure_bucket()
        keys = td / "keys"
        TufRepository.init(be, keys)
        publish(rel.r1, be, keys, percent=100, discover=False)
        cdn = Cdn(td / "cdn", weed.endpoint)
        url = f"{cdn.url}/fleet/prod"
        # one board flashed and on release 1, then copied: every simulated board has its own state
        # directory (slots, state.json, trusted TUF metadata), as boards flashed from one image would
        [tmpl] = init_boards(td / "tmpl", rel, 1)
        (td / "root.json").write_bytes(be.get("metadata/root.json"))
        assert pull(tmpl, PullOptions(repo_url=url, board_id="template", model="mlp",
                                      tuf_root=td / "root.json")).release_after == 1
        ids = [f"sim-{i:05d}" for i in range(n)]
        states = []
        for bid in ids:
            s = td / "boards" / bid
            sh.copytree(tmpl, s, symlinks=True)
            states.append((bid, s))
        random.Random(0).shuffle(states)
        res["state_dir_bytes"] = sum(f.stat().st_size for f in tmpl.rglob("*") if f.is_file())
        publish(rel.r2, be, keys, percent=0)  # full + delta, nobody admitted yet
        res["bundle_bytes"] = {k.split(".", 1)[1]: len(be.get(k)) for k in be.list("targets/")}

        # ------------------------------------------------------------ rollout set 100
        srv0 = proc_cpu(weed.proc.pid) + proc_cpu(cdn.proc.pid)
        self0 = time.process_time()
        nlog = len(cdn.log())
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "edgepack.cli", "rollout", "set", "2", "--repo",
                            f"s3://fleet/prod?endpoint={weed.endpoint}", "--keys", str(keys), "--percent", "100"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
        t_set = time.perf_counter() - t0
        runs = run_pulls(states, url, concurrency, t0)
        wall = time.perf_counter() - t0
        lines = cdn.log()[nlog:]
        srv = proc_cpu(weed.proc.pid) + proc_cpu(cdn.proc.pid) - srv0
        ok = [x for x in runs if x["action"] == "installed" and x["release_after"] == 2]
        k99 = max(1, -(-99 * n // 100))
        boards_cpu = sum(x["cpu_s"] for x in runs)
        gets = [x for x in lines if x[0] == "GET"]
        res["rollout"] = {
            "rollout_set_s": round(t_set, 2), "committed": len(ok), "wall_s": round(wall, 1),
            "to_99pct_committed_s": round(sorted(x["done_s"] for x in ok)[k99 - 1], 1) if len(ok) >= k99 else None,
            "kinds": {k: sum(x["kind"] == k for x in ok) for k in ("delta", "full")},
            "payload_bytes_per_board": round(sum(x["bytes"] for x in ok) / max(len(ok), 1)),
            "metadata_bytes_per_board": round(sum(x["metadata_bytes"] for x in ok) / max(len(ok), 1)),
            "requests_per_board": round(sum(x["requests"] or 0 for x in ok) / max(len(ok), 1), 2),
            "cdn_bytes_sent_per_board": round(sum(int(x[3]) for x in gets) / n),
            "cdn_requests": len(lines), "cdn_cache": {s: sum(x[5] == s for x in lines) for s in {x[5] for x in lines}},
            "cpu_s": {"boards_total": round(boards_cpu, 1), "board_median": round(sorted(x["cpu_s"] for x in runs)[n // 2], 2),
                      "servers (nginx + weed)": round(srv, 1), "host_bench_process": round(time.process_time() - self0, 1),
                      "host_total": round(boards_cpu + srv + time.process_time() - self0, 1)},
            "peak_rss_mb_one_pulling_board": {"median": round(sorted(x["maxrss_kb"] for x in ok)[len(ok) // 2] / 1024, 1),
                                               "max": round(max(x["maxrss_kb"] for x in ok) / 1024, 1)},
            "failures": [x for x in runs if x not in ok][:5]}
        print(json.dumps(res["rollout"]), file=sys.stderr)

        # ------------------------------------------------------------ a poll with nothing new
        bid, st = states[0]
        nlog = len(cdn.log())
        q = run_pulls([(bid, st)], url, 1, time.perf_counter())[0]
        ql = cdn.log()[nlog:]
        res["quiet_poll"] = {"action": q["action"], "requests_on_the_wire": len(ql),
                             "bytes_sent_by_server": sum(int(x[3]) for x in ql),
                             "bytes_received_by_server": sum(int(x[4]) for x in ql), "requests": [x[:4] for x in ql],
                             "cpu_s": round(q["cpu_s"], 2), "maxrss_mb": round(q["maxrss_kb"] / 1024, 1)}

        # ------------------------------------------------------------ a bad release at 5 %
        publish(rel.bad, be, keys, percent=5)
        cohort = {bid for bid, _ in states if cohort_bucket(bid, "mlp") < 500}
        t1 = time.perf_counter()
        bad_runs = run_pulls(states, url, concurrency, t1)
        with Store(td / "fleet.db") as store:
            w = watch(be, keys, store, 3)
        touched_outside, tried_in_cohort = [], []
        for bid, st in states:
            a = Agent(st).sd.load()
            tried = any(h.get("event") == "install-start" and h.get("release") == 3 for h in a.history)
            if bid not in cohort and (tried or a.counter != 2 or list((st / "pull" / "downloads").glob("*"))):
                touched_outside.append(bid)
            if bid in cohort and tried:
                tried_in_cohort.append(bid)
        res["bad_release_5pct"] = {
            "cohort": len(cohort), "boards": n, "wall_s": round(time.perf_counter() - t1, 1),
            "cohort_tried_and_rolled_back": len(tried_in_cohort), "exit_codes": {str(c): sum(x["rc"] == c for x in bad_runs)
                                                                               for c in {x["rc"] for x in bad_runs}},
            "not_admitted": sum(x["action"] == "not-admitted" for x in bad_runs),
            "halted": w.halted, "failures_seen_by_watch": len(w.failures),
            "boards_outside_cohort_touched": len(touched_outside),
            "all_boards_on_release_2": all(Agent(st).sd.load().counter == 2 for _, st in states),
            "not_admitted_poll_cpu_s_median": _median([x["cpu_s"] for x in bad_runs if x["action"] == "not-admitted"])}
        print(json.dumps(res["bad_release_5pct"]), file=sys.stderr)

        # ------------------------------------------------------------ the same release by SSH push
        if ssh_sample:
            res["ssh_push"] = ssh_push(td, rel, tmpl, ssh_sample, concurrency)
            print(json.dumps(res["ssh_push"]), file=sys.stderr)
    finally:
        for s in (cdn, weed):
            if s is not None:
                s.stop()
        shutil.rmtree(td, ignore_errors=True)
    return res


def ssh_push(td: Path, rel, tmpl: Path, n: int, concurrency: int) -> dict:
    """The same release (r2, delta chosen per board) to ``n`` boards on release 1, each behind its
    own sshd on loopback, by `edgepack push` (paramiko), one wave; the same agent install."""
    import shutil as sh

    from device_agent.install import Agent
    from edgepack.fleet import Policy, Store, load_fleet, push
    from fleet_helpers import fleet_toml, keygen, make_boards, write_known_hosts
    key = keygen(td / "client_key")
    boards = make_boards(td / "ssh", n, key.with_suffix(".pub"))
    try:
        for b in boards:
            b.sshd.start()
            sh.copytree(tmpl, b.state, symlinks=True)
        kh = write_known_hosts(td / "known_hosts", boards)
        fl = load_fleet(fleet_toml(td / "fleet.toml", boards, key=key, known_hosts=kh, store=td / "push.db"))
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        s0 = time.process_time()
        t0 = time.perf_counter()
        with Store(fl.store) as st:
            rep = push(rel.r2, fl, policy=Policy(canary=0, wave_size="100%", concurrency=20), store=st)
        wall = time.perf_counter() - t0
        own = time.process_time() - s0
        ok = sum(b.result == "committed" for b in rep.boards)
    finally:
        for b in boards:
            b.sshd.kill()
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the sshds, reaped: their sessions and agents included
    kids = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    return {"boards": n, "committed": ok, "wall_s": round(wall, 1), "per_board_s": round(wall / n, 3),
            "payload_bytes_per_board": round(rep.bytes_sent / max(ok, 1)),
            "kinds": sorted({b.kind for b in rep.boards if b.kind}), "concurrency": 20,
            "cpu_s": {"push_process": round(own, 1), "sshd_sessions_and_agents": round(kids, 1),
                      "host_total": round(own + kids, 1)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boards", type=int, default=200, help="simulated pull boards (0: skip the fleet part)")
    ap.add_argument("--concurrency", type=int, default=3, help="pull processes at a time")
    ap.add_argument("--ssh-sample", type=int, default=30, help="boards for the SSH push comparison (0: skip)")
    ap.add_argument("--reports", type=int, default=500_000, help="report objects to ingest (0: skip)")
    ap.add_argument("--ingest-boards", type=int, default=100_000)
    ap.add_argument("-o", "--output", default="bench_pull.json")
    a = ap.parse_args()
    out: dict = {}
    if Path(a.output).exists():
        try:
            out = json.loads(Path(a.output).read_text())  # keep the other part's figures
        except ValueError:
            out = {}
        if "fleet" not in out and "ingest" not in out:
            out = {}
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "note": "2 cores shared with other jobs; AVX2, no AVX-512 VNNI"}
    if a.boards:
        out["fleet"] = {**bench_fleet(a.boards, a.concurrency, a.ssh_sample), "machine": machine,
                        "command": f"python scripts/bench_pull.py --boards {a.boards} --concurrency {a.concurrency} "
                                   f"--ssh-sample {a.ssh_sample} --reports 0"}
        Path(a.output).write_text(json.dumps(out, indent=2) + "\n")
    if a.reports:
        out["ingest"] = {**bench_ingest(a.reports, a.ingest_boards), "machine": machine,
                         "command": f"python scripts/bench_pull.py --boards 0 --reports {a.reports} "
                                    f"--ingest-boards {a.ingest_boards}"}
    Path(a.output).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
