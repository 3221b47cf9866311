"""Pull-fleet benchmark (issue 16), the part that fits a shared 2-core machine: ingest of report
objects into the SQLite store (rows/s, store size) and `fleet check-reports` over them.

    PYTHONPATH=. python scripts/bench_pull.py --reports 500000 --boards 100000 -o bench_pull.json

Each report object becomes 2 rows (install + status), so 500,000 objects = 10^6 rows. Reports
are generated in memory in the agent's format and fed to the same ingest path `fleet ingest`
uses after listing/fetching (edgepack.fleet.ingest.ingest_objects); network listing is not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgepack.fleet import Store  # noqa: E402
from edgepack.fleet.ingest import check_reports, ingest_objects  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reports", type=int, default=500_000)
    ap.add_argument("--boards", type=int, default=100_000)
    ap.add_argument("-o", "--output", default="bench_pull.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "fleet.db"
        with Store(db) as st:
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            rep = ingest_objects(st, objects(a.reports, a.boards), batch=5000)
            secs, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            again = ingest_objects(st, objects(2000, a.boards))
            t1 = time.perf_counter()
            chk = check_reports(st, save_flags=False)
            check_s = time.perf_counter() - t1
        size = sum(p.stat().st_size for p in Path(d).glob("fleet.db*"))
    out = {"reports": a.reports, "rows": rep.rows, "boards": a.boards, "ingest_seconds": round(secs, 2),
           "ingest_cpu_seconds": round(cpu, 2), "rows_per_s": round(rep.rows / secs), "store_bytes": size,
           "reingest_new": again.new, "check_reports_seconds": round(check_s, 2), "boards_judged": len(chk.boards),
           "flags": len(chk.flags), "machine": f"{os.cpu_count()} cores, shared with other jobs"}
    Path(a.output).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
