#!/usr/bin/env python3
"""Real quantization peers and edgepack side by side, on identical data, in the same run, judged
the way a board computes. Writes bench-results/peers.json (EfficientNet-Lite0) or
bench-results/peers-fashion.json (``--suite fashion``).

    bash scripts/peers/setup-peers.sh          # once: .venv-nncf, .venv-aimet (PyPI only)
    .venv/bin/python scripts/bench_peers.py    # from the main venv
    .venv/bin/python scripts/bench_peers.py --edgepack-from /work/wt-x/bench-results/x.json
    .venv/bin/python scripts/bench_peers.py --edgepack-cmd 'edgepack quantize $A/models/... -o out/m.onnx'

Data is loaded once here with edgepack's own loader and handed to every peer as .npy, so every
peer sees the same tensors. EfficientNet-Lite0 (``size=224,resize=256,mean=127,std=128``, the
model's declared preprocessing): calibration = the first 100 images of natural-calib (sorted by
name, as ``edgepack quantize --calib-size 100`` takes them); accuracy-control validation = the
whole natural-calib pool, which is edgepack's search split in scripts/main.sh (``--search
natural-calib``); evaluation = all 176 images of natural-eval (label-free agreement with FP32)
plus the 20 labelled ImageNet samples. Fashion CNN: calibration = first 256 of calib-x, validation
= search-x (5,000, labelled), evaluation = the 10,000 labelled test images.

Each peer runs in its own venv (scripts/peers/run_*.py); edgepack runs its own CLI command (by
default today's main-job command of scripts/main.sh; ``--edgepack-cmd``/``--edgepack-from`` give
another one, ``--edgepack-tree`` the source tree whose code runs it, ``--edgepack-model`` judges a
model edgepack already wrote). Every INT8 model is judged here, under (a) exact integer
arithmetic: ORT with ORT_DISABLE_ALL (QDQ unfused), and (b) this host's fused ORT kernels
(default optimization). Latency is host-kernel, interleaved medians.

Resumable per peer: the arrays, each peer's INT8 model and its judged result are kept in
``--work``; a rerun skips every peer whose result is there (``--redo`` forces one) and retries
the ones that failed; edgepack's result is kept per (command, tree, tree commit). The JSON is
rewritten after every peer, so one peer dying costs only that peer.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EFFNET_PREPROCESS = "size=224,resize=256,mean=127,std=128,layout=nchw,color=rgb"
# (name, venv dir, runner, variant)
PEERS = [
    ("ort-default", ".venv", "run_ort.py", "default"),
    ("ort-per-channel", ".venv", "run_ort.py", "per-channel"),
    ("nncf-default", ".venv-nncf", "run_nncf.py", "default"),
    ("nncf-mixed", ".venv-nncf", "run_nncf.py", "mixed"),
    ("nncf-bias-correction", ".venv-nncf", "run_nncf.py", "bias-correction"),
    ("nncf-accuracy-control", ".venv-nncf", "run_nncf.py", "accuracy-control"),
    ("aimet-ptq", ".venv-aimet", "run_aimet.py", "ptq"),
    ("aimet-per-channel", ".venv-aimet", "run_aimet.py", "per-channel"),
    ("aimet-cle", ".venv-aimet", "run_aimet.py", "cle"),
    ("aimet-adaround", ".venv-aimet", "run_aimet.py", "adaround"),
    ("aimet-recipe", ".venv-aimet", "run_aimet.py", "recipe"),
]
EDGEPACK = "edgepack"


@dataclass(frozen=True, kw_only=True)
class Suite:
    """One model and its splits, as edgepack's own benchmark of it uses them."""

    model: str                  # asset path
    preprocess: str | None      # image spec, None for array data
    calib: str
    calib_size: int
    pool: str                   # accuracy-control validation = edgepack's search split
    evals: dict = field(default_factory=dict)   # key -> (asset path, description)
    edgepack_cmd: str = ""      # $A = the assets folder
    output: str = "peers.json"
    work: str = "peers-work"


# the main job's quantize step (scripts/main.sh step 1; tests/test_bench_peers_args.py keeps them equal)
MAIN_JOB = ("edgepack quantize $A/models/efficientnet-lite0.onnx --target rpi4-2gb --calib $A/images/natural-calib "
            "--calib-size 100 --search $A/images/natural-calib --eval $A/images/natural-eval --top1-eval $A/images/imagenet "
            "-o out/efficientnet-lite0-int8.onnx")
SUITES = {
    "efficientnet": Suite(
        model="models/efficientnet-lite0.onnx", preprocess=EFFNET_PREPROCESS, calib="images/natural-calib",
        calib_size=100, pool="images/natural-calib",
        evals={"heldout": ("images/natural-eval", "natural-eval, label-free agreement with FP32"),
               "imagenet20": ("images/imagenet", "ImageNet samples, labelled")},
        edgepack_cmd=MAIN_JOB),
    "fashion": Suite(
        model="models/fashion-cnn.onnx", preprocess=None, calib="fashion-mnist/calib-x.npz", calib_size=256,
        pool="fashion-mnist/search-x.npz",
        evals={"test": ("fashion-mnist/test-x.npz", "Fashion-MNIST test, labelled")},
        edgepack_cmd=("edgepack quantize $A/models/fashion-cnn.onnx --target rpi4-2gb --calib $A/fashion-mnist/calib-x.npz "
                      "--calib-size 256 --search $A/fashion-mnist/search-x.npz --eval $A/fashion-mnist/test-x.npz "
                      "-o out/fashion-cnn-int8.onnx"),
        output="peers-fashion.json", work="peers-work-fashion"),
}
NAMES = [p[0] for p in PEERS] + [EDGEPACK]


def log(m: str) -> None:
    print(f"[peers] {m}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="efficientnet")
    ap.add_argument("--only", nargs="+", choices=NAMES, help="run only these (peers and/or edgepack)")
    ap.add_argument("--calib-size", type=int, default=None, help="first N calibration samples (suite's: 100 / 256)")
    ap.add_argument("--eval-limit", type=int, default=None, help="first N evaluation samples (all)")
    ap.add_argument("--pool-limit", type=int, default=None, help="accuracy-control pool size (all)")
    ap.add_argument("--adaround-iterations", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds (10 runs each)")
    ap.add_argument("--timeout", type=int, default=5400, help="seconds per peer run")
    ap.add_argument("--work", default=None, help="kept between runs: arrays, models, per-peer results "
                                                  "(default bench-results/peers-work[-fashion])")
    ap.add_argument("--redo", nargs="+", default=[], choices=NAMES,
                    help="run these again even if their result is kept")
    ap.add_argument("--edgepack-cmd", help="the `edgepack quantize ...` command line to run ($A = assets folder; "
                                           "its -o is replaced by a path in --work; default: the main job's)")
    ap.add_argument("--edgepack-from", metavar="JSON", help="take the edgepack command from this JSON's "
                                                            "\"command\" (tree: the folder above its bench-results/)")
    ap.add_argument("--edgepack-tree", help="source tree whose edgepack code runs the command (PYTHONPATH; default this one)")
    ap.add_argument("--edgepack-model", help="judge this model edgepack already wrote instead of quantizing")
    ap.add_argument("--no-latency", action="store_true", help="skip the interleaved latency rounds")
    ap.add_argument("--kept-only", action="store_true",
                    help="quantize nothing: report the results kept in --work (failures included)")
    ap.add_argument("--table", metavar="JSON", help="print the docs table of a peers JSON and exit")
    ap.add_argument("-o", "--output", default=None, help="default bench-results/peers[-fashion].json")
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


# ---------------------------------------------------------------------------------- edgepack

def edgepack_source(args) -> tuple[str, Path, str]:
    """(command, tree, where the command came from)."""
    tree = Path(args.edgepack_tree).resolve() if args.edgepack_tree else None
    if args.edgepack_from:
        src = Path(args.edgepack_from)
        cmd = json.loads(src.read_text()).get("command")
        if not cmd:
            raise SystemExit(f"{src}: no \"command\" in it; pass --edgepack-cmd instead")
        cmd = shlex.join(cmd) if isinstance(cmd, list) else str(cmd)
        if tree is None:
            up = src.resolve().parent
            tree = up.parent if up.name == "bench-results" and (up.parent / "edgepack").is_dir() else ROOT
        return cmd, tree, str(src)
    if args.edgepack_cmd:
        return args.edgepack_cmd, tree or ROOT, "--edgepack-cmd"
    return SUITES[args.suite].edgepack_cmd, tree or ROOT, "the suite's default (scripts/main.sh step 1)"


def quantize_argv(cmd: str, assets: Path, out: Path) -> list[str]:
    """The arguments after ``quantize`` of an edgepack command line, with $A expanded, -o pointed
    at ``out`` and --json added (its report comes back on stdout)."""
    for a in ("${A}", "$A"):
        cmd = cmd.replace(a, str(assets))
    toks = [t for t in shlex.split(cmd) if t != "$@"]
    if "quantize" not in toks:
        raise SystemExit(f"edgepack command has no 'quantize' subcommand: {cmd!r}")
    toks = toks[toks.index("quantize") + 1:]
    argv, skip = [], False
    for i, t in enumerate(toks):
        if skip:
            skip = False
            continue
        if t in ("-o", "--output"):
            skip = True
            continue
        if t.startswith("--output="):
            continue
        argv.append(t)
    argv += ["-o", str(out)]
    if "--json" not in argv:
        argv.append("--json")
    return argv


def tree_state(tree: Path) -> str:
    """The last commit that changed the tree's edgepack/ code plus a hash of its uncommitted diff
    there: a changed library is re-run, a commit elsewhere (scripts, docs) is not."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(tree), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    head = git("log", "-1", "--format=%H", "--", "edgepack") or "no-git"
    diff = git("diff", "HEAD", "--", "edgepack")
    return head + ("+" + hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else "")


def edgepack_key(args, assets: Path) -> tuple[dict, str]:
    """What makes an edgepack result reusable (its arguments, tree and the tree's commit) and the
    file stem it is kept under in --work, so results of several commands/trees live side by side."""
    cmd, tree, _ = edgepack_source(args)
    key = {"argv": quantize_argv(cmd, assets, Path("OUT.onnx")), "tree": str(tree), "commit": tree_state(tree)}
    return key, "edgepack-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def run_edgepack(args, work: Path, assets: Path, stem: str) -> dict:
    cmd, tree, source = edgepack_source(args)
    out = work / f"{stem}.onnx"
    argv = quantize_argv(cmd, assets, out)
    py = tree / ".venv" / "bin" / "python"
    py = py if py.exists() else ROOT / ".venv" / "bin" / "python"
    res = {"peer": EDGEPACK, "command": cmd, "command_source": source, "tree": str(tree),
           "tree_commit": tree_state(tree), "argv": argv}
    if out.exists():
        out.unlink()
    t = time.perf_counter()
    try:
        r = subprocess.run([str(py), "-m", "edgepack.cli", "quantize", *argv], capture_output=True, text=True,
                           timeout=args.timeout, cwd=str(tree), env={**os.environ, "PYTHONPATH": str(tree)})
    except subprocess.TimeoutExpired:
        res["error"] = f"timed out after {args.timeout} s"
        return res
    res["quantize_seconds"] = res["process_seconds"] = round(time.perf_counter() - t, 1)
    res["exit_code"] = r.returncode
    if r.returncode not in (0, 4) or not out.exists():   # 4: budget missed, the model was still written
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-12:]
        res["error"] = f"exit {r.returncode}: " + "\n".join(tail)
        return res
    try:
        rep = json.loads(r.stdout)
    except json.JSONDecodeError:
        rep = {}
    keep = ("target", "metric", "budget_points", "budget_met", "int8_size_bytes", "agreement", "drop_points",
            "fp32_top1", "int8_top1", "host_kernel_agreement", "numerics", "host_int8", "variant", "float_layers",
            "float_activations", "remedies_tried", "calibration_method", "per_channel", "weight_rounding",
            "evaluations", "seconds", "holdout_samples", "search_samples", "warnings")
    res["report"] = {k: rep[k] for k in keep if k in rep} or {"keys": sorted(rep)[:40]}
    res["path"] = out
    return res


def edgepack_or_resume(args, work: Path, assets: Path, fp32_ref: dict, evals: dict) -> dict:
    """edgepack's judged result: a model it already wrote (--edgepack-model), kept from an earlier
    run of the same command on the same tree state, or quantized and judged now."""
    if args.edgepack_model:
        r = {"peer": EDGEPACK, "command_source": "--edgepack-model (judged as written, not re-quantized)",
             "path": Path(args.edgepack_model).resolve(), "quantize_seconds": None}
        r["model"] = str(r["path"])
        evaluate(r, fp32_ref, evals)
        return r
    key, stem = edgepack_key(args, assets)
    kept = work / f"{stem}.result.json"
    if kept.exists() and EDGEPACK not in args.redo:
        r = json.loads(kept.read_text())
        if "error" not in r and (work / f"{stem}.onnx").exists():
            log(f"edgepack: kept from {r.get('date', 'an earlier run')} ({stem})")
            r["path"] = work / f"{stem}.onnx"
            return r
    if args.kept_only:
        return json.loads(kept.read_text()) if kept.exists() else {"peer": EDGEPACK, "error": "not run yet"}
    cmd, tree, _ = edgepack_source(args)
    log(f"edgepack: {cmd} (tree {tree}, kept as {stem})")
    r = run_edgepack(args, work, assets, stem)
    r["key"] = key
    if "error" in r:
        log(f"edgepack: FAILED: {r['error'].splitlines()[-1]}")
    else:
        evaluate(r, fp32_ref, evals)
        log(f"edgepack: exact {r['exact']} host {r['host']}")
    r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    kept.write_text(json.dumps({k: v for k, v in r.items() if k != "path"}, indent=2, default=str))
    return r


# ---------------------------------------------------------------------------------- peers

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
    if data.get("pool_labels"):
        cmd += ["--pool-labels", str(data["pool_labels"])]
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


def quantize_nodes(path: Path) -> int:
    """QuantizeLinear nodes in the model (0: not a QDQ model; fewer: some tensors left float)."""
    import onnx

    return sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path), load_external_data=False).graph.node)


def evaluate(res: dict, fp32_ref: dict, evals: dict) -> None:
    from edgepack.quantize.evaluate import compare, predict, session

    path = res["path"]
    res["bytes"] = path.stat().st_size
    res["size_mb"] = round(res["bytes"] / 1e6, 2)
    res["quantize_linear_nodes"] = quantize_nodes(path)
    res["qdq_onnx"] = res["quantize_linear_nodes"] > 0
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
                        "drop": round(c.drop, 2), "sqnr_db": round(c.output_sqnr_db, 2)}
        res[numerics] = row


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


# ---------------------------------------------------------------------------------- comparison

def primary(r: dict, numerics: str) -> float | None:
    """The headline figure of one result: agreement on the first split without labels, else
    minus the accuracy drop (higher is better either way)."""
    row = r.get(numerics, {})
    if not row or "error" in row:
        return None
    first = next(iter(row.values()))
    return first["agreement"] if first.get("top1") is None else -first["drop"]


def versus(results: list[dict], fp32_bytes: int) -> dict:
    """edgepack against each peer: accuracy difference (points) and size ratio, per numerics."""
    ep = next((r for r in results if r["peer"] == EDGEPACK and "bytes" in r), None)
    for r in results:
        if "bytes" in r:
            r["x_smaller_than_fp32"] = round(fp32_bytes / r["bytes"], 2)
    if ep is None:
        return {}
    out = {}
    for r in results:
        if r is ep or "bytes" not in r:
            continue
        row = {"peer_over_edgepack_size": round(r["bytes"] / ep["bytes"], 3)}
        for num in ("exact", "host"):
            a, b = primary(ep, num), primary(r, num)
            row[f"{num}_points_edgepack_minus_peer"] = None if a is None or b is None else round(a - b, 2)
        a, b = primary(ep, "exact"), primary(r, "exact")
        row["edgepack_as_accurate_exact_at_no_larger_size"] = (
            a is not None and b is not None and a >= b and ep["bytes"] <= r["bytes"])
        out[r["peer"]] = row
    return out


def table(doc: dict) -> str:
    """The docs/BENCHMARKS.md rows of a peers JSON."""
    rows = []
    vs = doc.get("edgepack_vs_peers", {})
    for r in doc["peers"]:
        if "error" in r:
            what = "not run" if r["error"] == "not run yet" else "failed: " + r["error"].splitlines()[-1][:120]
            rows.append(f"| {r['peer']} | {what} | | | | | | |")
            continue
        ex, ho = r.get("exact", {}), r.get("host", {})
        keys = list(ex) if ex and "error" not in ex else list(ho)
        g = lambda d, k, f: d.get(k, {}).get(f, "n/a") if "error" not in d else "load error"  # noqa: E731
        first = keys[0] if keys else "?"
        metric = "top1" if g(ex, first, "top1") not in (None, "n/a") else "agreement"
        def cell(d: dict) -> str:
            v = g(d, first, metric)
            if not isinstance(v, (int, float)):
                return str(v)
            return f"{v:.2f} %" + (f" (drop {g(d, first, 'drop'):.2f})" if metric == "top1" else "")
        cells = [cell(ex), cell(ho)]
        cells.append(" / ".join(f"{g(ex, k, 'top1')} / {g(ho, k, 'top1')} %" for k in keys[1:]) or "-")
        lat = {k: f"{v}x" for k, v in r.get("latency_vs_fp32", {}).items()}
        v = vs.get(r["peer"], {})
        ratio = (f"{v['exact_points_edgepack_minus_peer']:+.2f} pt, {v['peer_over_edgepack_size']}x"
                 if v.get("exact_points_edgepack_minus_peer") is not None else "-")
        rows.append(f"| {r['peer']} | {' | '.join(cells)} | {r['size_mb']} ({r.get('x_smaller_than_fp32', '?')}x) | "
                    f"{lat.get('threads_1', 'n/a')} / {lat.get('threads_2', 'n/a')} | {r.get('quantize_seconds')} | {ratio} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------- run

def prepare_data(args, suite: Suite, work: Path, pp) -> dict:
    """The identical arrays every peer gets, saved once in ``work`` (reused by a resumed run)."""
    from edgepack.assets import asset
    from edgepack.data import load_dataset

    data = {"model": asset(suite.model), "calib": work / "calib.npy", "pool": work / "pool.npy"}
    stamp = work / "data.json"
    calib_size = args.calib_size or suite.calib_size
    want = {"calib_size": calib_size, "eval_limit": args.eval_limit, "pool_limit": args.pool_limit,
            "preprocess": suite.preprocess, "model": suite.model}
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        log("loading data with edgepack.data (identical arrays for every peer)")
        calib_ds = load_dataset(asset(suite.calib), pp)
        np.save(data["calib"], stack(calib_ds, calib_size))
        pool_ds = load_dataset(asset(suite.pool), pp)
        np.save(data["pool"], stack(pool_ds, args.pool_limit))
        if pool_ds.labels is not None:
            np.save(work / "pool-labels.npy", np.asarray(pool_ds.labels[:len(np.load(data["pool"], mmap_mode="r"))]))
        for key, (path, _) in suite.evals.items():
            ds = load_dataset(asset(path), pp)
            x = stack(ds, args.eval_limit)
            np.savez(work / f"eval-{key}.npz", x=x, **({} if ds.labels is None else {"labels": ds.labels[:len(x)]}))
        for f in work.glob("*.result.json"):   # results on other data are not comparable
            f.unlink()
        stamp.write_text(json.dumps(want))
    if (work / "pool-labels.npy").exists():
        data["pool_labels"] = work / "pool-labels.npy"
    data["pool_images"] = int(np.load(data["pool"], mmap_mode="r").shape[0])
    data["calib_images"] = int(np.load(data["calib"], mmap_mode="r").shape[0])
    return data


def measure_latency(model: Path, results: list[dict], evals: dict, rounds: int) -> dict:
    from edgepack.quantize.latency import interleaved

    ok = {r["peer"]: r["path"] for r in results if "path" in r and "error" not in r.get("host", {})}
    sample = next(iter(evals.values())).loader(0)
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


def write_doc(out: Path, argv, args, suite: Suite, data: dict, evals: dict, fp32: dict, results: list[dict],
              latency: dict | None) -> None:
    model = data["model"]
    doc = {"command": "python scripts/bench_peers.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "suite": args.suite,
           "machine": {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
                       "note": "shared machine (other jobs running); latency = medians of interleaved runs"},
           "data": {"preprocess": suite.preprocess, "calibration": f"first {data['calib_images']} of {suite.calib}",
                    "accuracy_control_validation": f"{suite.pool} ({data['pool_images']} samples; edgepack's "
                                                   "search split), " + ("labelled top-1" if data.get("pool_labels")
                                                                         else "label-free agreement with FP32"),
                    **{k: f"{p} ({len(evals[k])}): {d}" for k, (p, d) in suite.evals.items()}},
           "numerics": {"exact": "ORT graph_optimization_level=ORT_DISABLE_ALL (QDQ unfused: exact int8 products)",
                        "host": "ORT default optimization (fused u8 x s8 kernels of this host)"},
           "fp32": {"bytes": model.stat().st_size, "size_mb": round(model.stat().st_size / 1e6, 2), **fp32,
                    "latency_ms": {f"threads_{t}": latency[t]["fp32"] for t in (1, 2)} if latency else None},
           "edgepack_vs_peers": versus(results, model.stat().st_size),
           "peers": [{k: v for k, v in r.items() if k != "path"} for r in results]}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    from edgepack.assets import assets_dir
    from edgepack.data import ImagePreprocess, load_dataset
    from edgepack.quantize.evaluate import predict, session

    suite = SUITES[args.suite]
    pp = ImagePreprocess.parse(suite.preprocess) if suite.preprocess else None
    names = args.only or NAMES
    out = Path(args.output or ROOT / "bench-results" / suite.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or ROOT / "bench-results" / suite.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, suite, work, pp)
    evals = {k: load_dataset(work / f"eval-{k}.npz") for k in suite.evals}
    fp = session(data["model"])
    fp32_ref = {k: predict(fp, ds) for k, ds in evals.items()}
    fp32 = {f"{k}_top1": round(float((fp32_ref[k].argmax(1) == ds.labels).mean() * 100), 2)
            for k, ds in evals.items() if ds.labels is not None}
    results: list[dict] = []
    for name in names:   # peers one after another, edgepack where it stands in the list (last by default)
        p = next((p for p in PEERS if p[0] == name), None)
        r = (run_or_resume(p, args, data, work, fp32_ref, evals) if p
             else edgepack_or_resume(args, work, Path(assets_dir()), fp32_ref, evals))
        results.append(r)
        write_doc(out, argv, args, suite, data, evals, fp32, results, None)   # partial results survive
    latency = None if args.no_latency else measure_latency(data["model"], results, evals, args.rounds)
    write_doc(out, argv, args, suite, data, evals, fp32, results, latency)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
