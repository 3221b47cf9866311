#!/usr/bin/env python3
"""Real quantization peers side by side on EfficientNet-Lite0, on identical data, judged the way
a board computes. Writes bench-results/peers.json.

    bash scripts/peers/setup-peers.sh          # once: .venv-nncf, .venv-aimet (PyPI only)
    .venv/bin/python scripts/bench_peers.py    # from the main venv

Data is loaded once here with edgepack's own loader (size=224,resize=256,mean=127,std=128) and
handed to every peer as .npy, so every peer sees the same tensors: calibration = the first 100
images of natural-calib (sorted by name), accuracy-control validation = the whole natural-calib
pool, evaluation = all 176 images of natural-eval plus the 20 labelled ImageNet samples.
Each peer runs in its own venv (scripts/peers/run_*.py); every INT8 model it writes is judged
here, under (a) exact integer arithmetic: ORT with ORT_DISABLE_ALL (QDQ unfused), and (b) this
host's fused ORT kernels (default optimization). Latency is host-kernel, interleaved medians.

Resumable per peer: the arrays, each peer's INT8 model and its judged result are kept in
``--work`` (default bench-results/peers-work/); a rerun skips every peer whose result is there
(``--redo`` forces one) and retries the ones that failed, so one peer dying (a timeout, a venv
replaced under it) costs only that peer. peers.json is rewritten after every peer.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREPROCESS = "size=224,resize=256,mean=127,std=128,layout=nchw,color=rgb"
# (name, venv dir, runner, variant)
PEERS = [
    ("ort-default", ".venv", "run_ort.py", "default"),
    ("ort-per-channel", ".venv", "run_ort.py", "per-channel"),
    ("nncf-default", ".venv-nncf", "run_nncf.py", "default"),
    ("nncf-mixed", ".venv-nncf", "run_nncf.py", "mixed"),
    ("nncf-accuracy-control", ".venv-nncf", "run_nncf.py", "accuracy-control"),
    ("aimet-ptq", ".venv-aimet", "run_aimet.py", "ptq"),
    ("aimet-cle", ".venv-aimet", "run_aimet.py", "cle"),
    ("aimet-adaround", ".venv-aimet", "run_aimet.py", "adaround"),
    ("aimet-recipe", ".venv-aimet", "run_aimet.py", "recipe"),
]


def log(m: str) -> None:
    print(f"[peers] {m}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=[p[0] for p in PEERS], help="run only these peers")
    ap.add_argument("--calib-size", type=int, default=100, help="first N natural-calib images (100)")
    ap.add_argument("--eval-limit", type=int, default=None, help="first N held-out images (all 176)")
    ap.add_argument("--pool-limit", type=int, default=None, help="accuracy-control pool size (all)")
    ap.add_argument("--adaround-iterations", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds (10 runs each)")
    ap.add_argument("--timeout", type=int, default=5400, help="seconds per peer run")
    ap.add_argument("--work", default=str(ROOT / "bench-results" / "peers-work"),
                    help="kept between runs: arrays, peer models, per-peer results (resume)")
    ap.add_argument("--redo", nargs="+", default=[], choices=[p[0] for p in PEERS],
                    help="run these peers again even if their result is kept")
    ap.add_argument("--no-latency", action="store_true", help="skip the interleaved latency rounds")
    ap.add_argument("--kept-only", action="store_true",
                    help="quantize nothing: report the results kept in --work (failures included)")
    ap.add_argument("--table", metavar="JSON", help="print the docs table of a peers.json and exit")
    ap.add_argument("-o", "--output", default=str(ROOT / "bench-results" / "peers.json"))
    return ap


def cpu_flags() -> list[str]:
    try:
        txt = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"\b(avx512_vnni|avx2|avx_vnni)\b", txt)))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def stack(ds, n: int | None = None) -> np.ndarray:
    idx = np.arange(len(ds) if n is None else min(n, len(ds)))
    return np.stack([np.asarray(ds.loader(int(i)), np.float32) for i in idx])


def run_peer(name: str, venv: str, runner: str, variant: str, args, data: dict, work: Path) -> dict:
    py = ROOT / venv / "bin" / "python"
    res: dict = {"peer": name, "venv": venv, "runner": f"scripts/peers/{runner}", "variant": variant}
    err_file = ROOT / f"{venv}.error"
    if not py.exists():
        res["error"] = (err_file.read_text().strip() if err_file.exists()
                        else f"{venv} missing: run bash scripts/peers/setup-peers.sh")
        return res
    out = work / f"{name}.onnx"
    cmd = [str(py), str(ROOT / "scripts" / "peers" / runner), "--model", str(data["model"]),
           "--calib", str(data["calib"]), "--pool", str(data["pool"]), "--variant", variant,
           "--out", str(out), "--iterations", str(args.adaround_iterations)]
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "scripts" / "peers")})
    except subprocess.TimeoutExpired:
        res["error"] = f"timed out after {args.timeout} s"
        return res
    res["process_seconds"] = round(time.perf_counter() - t, 1)
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines or not out.exists():
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-12:]
        res["error"] = f"exit {r.returncode}: " + "\n".join(tail)
        return res
    res.update(json.loads(lines[-1]))
    res["path"] = out
    return res


def is_qdq(path: Path) -> bool:
    import onnx

    return any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path), load_external_data=False).graph.node)


def evaluate(res: dict, fp32_ref: dict, evals: dict) -> None:
    from edgepack.quantize.evaluate import compare, predict, session

    path = res["path"]
    res["bytes"] = path.stat().st_size
    res["size_mb"] = round(res["bytes"] / 1e6, 2)
    res["qdq_onnx"] = is_qdq(path)
    for numerics, optimize in (("exact", False), ("host", True)):
        try:
            s = session(path, optimize=optimize)
        except Exception as e:  # a peer's model ORT cannot load is a result, not a crash
            res[numerics] = {"error": f"ORT cannot load it: {str(e).splitlines()[0][:300]}"}
            continue
        row = {}
        for key, ds in evals.items():
            c = compare(fp32_ref[key], predict(s, ds), ds.labels)
            row[key] = {"agreement": round(c.agreement, 2), "top1": c.int8_top1,
                        "sqnr_db": round(c.output_sqnr_db, 2)}
        res[numerics] = row


def table(doc: dict) -> str:
    """The docs/BENCHMARKS.md rows of a peers.json."""
    rows = []
    for r in doc["peers"]:
        if "error" in r:
            rows.append(f"| {r['peer']} | failed: {r['error'].splitlines()[-1][:120]} | | | | | |")
            continue
        ex, ho = r.get("exact", {}), r.get("host", {})
        g = lambda d, k, f: d.get(k, {}).get(f, "n/a")  # noqa: E731
        lat = r.get("latency_vs_fp32", {})
        rows.append(f"| {r['peer']} | {g(ex, 'heldout', 'agreement')} % | {g(ho, 'heldout', 'agreement')} % | "
                    f"{g(ex, 'imagenet20', 'top1')} / {g(ho, 'imagenet20', 'top1')} % | {r['size_mb']} | "
                    f"{lat.get('threads_1', 'n/a')}x / {lat.get('threads_2', 'n/a')}x | {r['quantize_seconds']} |")
    return "\n".join(rows)


def prepare_data(args, work: Path, pp) -> dict:
    """The identical arrays every peer gets, saved once in ``work`` (reused by a resumed run)."""
    from edgepack.assets import asset
    from edgepack.data import load_dataset

    data = {"model": asset("models/efficientnet-lite0.onnx"), "calib": work / "calib.npy",
            "pool": work / "pool.npy"}
    stamp = work / "data.json"
    want = {"calib_size": args.calib_size, "eval_limit": args.eval_limit, "pool_limit": args.pool_limit,
            "preprocess": PREPROCESS}
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        log("loading data with edgepack.data (identical arrays for every peer)")
        pool = stack(load_dataset(asset("images/natural-calib"), pp), args.pool_limit)
        np.save(data["calib"], pool[:args.calib_size])
        np.save(data["pool"], pool)
        np.save(work / "eval.npy", stack(load_dataset(asset("images/natural-eval"), pp), args.eval_limit))
        inet = load_dataset(asset("images/imagenet"), pp)
        np.savez(work / "imagenet.npz", x=stack(inet), labels=inet.labels)
        for f in work.glob("*.result.json"):   # results on other data are not comparable
            f.unlink()
        stamp.write_text(json.dumps(want))
    data["pool_images"] = int(np.load(data["pool"], mmap_mode="r").shape[0])
    return data


def run_or_resume(p: tuple, args, data: dict, work: Path, fp32_ref: dict, evals: dict) -> dict:
    """One peer's judged result: kept from an earlier run, or quantized and judged now."""
    kept = work / f"{p[0]}.result.json"
    if args.kept_only:
        r = json.loads(kept.read_text()) if kept.exists() else {"peer": p[0], "error": "not run yet"}
        if "error" not in r:
            r["path"] = work / f"{p[0]}.onnx"
        return r
    if kept.exists() and p[0] not in args.redo:
        r = json.loads(kept.read_text())
        if "error" not in r and (work / f"{p[0]}.onnx").exists():
            log(f"{p[0]}: kept from {r.get('date', 'an earlier run')}")
            r["path"] = work / f"{p[0]}.onnx"
            return r
    log(f"{p[0]}: quantizing in {p[1]}")
    r = run_peer(*p, args, data, work)
    if "error" in r:
        log(f"{p[0]}: FAILED: {r['error'].splitlines()[-1]}")
    else:
        log(f"{p[0]}: {r['quantize_seconds']} s; evaluating (exact, host kernels)")
        evaluate(r, fp32_ref, evals)
        log(f"{p[0]}: exact {r['exact']} host {r['host']}")
    r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    kept.write_text(json.dumps({k: v for k, v in r.items() if k != "path"}, indent=2, default=float))
    return r


def measure_latency(model: Path, results: list[dict], evals: dict, rounds: int) -> dict:
    from edgepack.quantize.latency import interleaved

    ok = {r["peer"]: r["path"] for r in results if "path" in r and "error" not in r.get("host", {})}
    sample = evals["heldout"].loader(0)
    latency = {}
    for th in (1, 2):
        log(f"latency, {th} thread(s), {len(ok) + 1} models interleaved")
        st = interleaved({"fp32": model, **ok}, sample, threads=th, rounds=rounds, per_round=10, warmup=5)
        latency[th] = {k: round(v.median_ms, 2) for k, v in st.items()}
    for r in results:
        if r["peer"] in ok:
            r["latency_ms"] = {f"threads_{th}": latency[th][r["peer"]] for th in (1, 2)}
            r["latency_vs_fp32"] = {f"threads_{th}": round(latency[th][r["peer"]] / latency[th]["fp32"], 3)
                                    for th in (1, 2)}
    return latency


def write_doc(out: Path, argv, args, data: dict, evals: dict, fp32_inet: float, results: list[dict],
              latency: dict | None) -> None:
    model = data["model"]
    doc = {"command": "python scripts/bench_peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
                       "note": "shared machine; latency = medians of interleaved runs"},
           "data": {"preprocess": PREPROCESS, "calibration": f"first {args.calib_size} of natural-calib (sorted)",
                    "accuracy_control_validation": f"natural-calib pool ({data['pool_images']} images), "
                                                   "label-free agreement",
                    "heldout": f"natural-eval ({len(evals['heldout'])} images)",
                    "imagenet20": "images/imagenet (20, labelled)"},
           "numerics": {"exact": "ORT graph_optimization_level=ORT_DISABLE_ALL (QDQ unfused: exact int8 products)",
                        "host": "ORT default optimization (fused u8 x s8 kernels of this host)"},
           "fp32": {"bytes": model.stat().st_size, "size_mb": round(model.stat().st_size / 1e6, 2),
                    "imagenet20_top1": fp32_inet,
                    "latency_ms": {f"threads_{t}": latency[t]["fp32"] for t in (1, 2)} if latency else None},
           "peers": [{k: v for k, v in r.items() if k != "path"} for r in results]}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=float))
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    from edgepack.data import ImagePreprocess, load_dataset
    from edgepack.quantize.evaluate import predict, session

    pp = ImagePreprocess.parse(PREPROCESS)
    peers = [p for p in PEERS if not args.only or p[0] in args.only]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, work, pp)
    evals = {"heldout": load_dataset(work / "eval.npy"), "imagenet20": load_dataset(work / "imagenet.npz")}
    fp = session(data["model"])
    fp32_ref = {k: predict(fp, ds) for k, ds in evals.items()}
    fp32_inet = float((fp32_ref["imagenet20"].argmax(1) == evals["imagenet20"].labels).mean() * 100)
    results: list[dict] = []
    for p in peers:
        results.append(run_or_resume(p, args, data, work, fp32_ref, evals))
        write_doc(out, argv, args, data, evals, fp32_inet, results, None)   # partial results survive
    latency = None if args.no_latency else measure_latency(data["model"], results, evals, args.rounds)
    write_doc(out, argv, args, data, evals, fp32_inet, results, latency)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
