#!/usr/bin/env python3
"""OpenVINO vs ONNX Runtime on the board adapter (issue 17) -> bench-results/openvino.json.

    .venv/bin/python scripts/bench_openvino.py [--rounds 9] [--per-round 20] [--quick]

EfficientNet-Lite0 FP32 and INT8 (plain ORT ``quantize_static``: QDQ, per-channel int8 weights,
uint8 activations, MinMax, 100 calibration images of ``images/natural-calib``; the same file runs
in both runtimes), through the agent's own adapters (``device_agent.runtime.load_model``: what
``edgepack-agent bench`` and the trial run), measured side by side in one process:

  * latency at 1 and 2 threads: the four sessions (ORT FP32, OpenVINO FP32, ORT INT8, OpenVINO
    INT8) timed in interleaved rounds (each round: ``per_round`` batch-1 runs of each session in
    turn, after warm-up), so load on the shared machine hits all of them alike; medians, p90 and
    the ratios OpenVINO / ORT and INT8 / FP32;
  * top-1 agreement of the INT8 model with FP32 on the 176 held-out ``images/natural-eval`` in each
    runtime, next to the same QDQ model run *unfused* by ORT (graph optimisations off: every
    DequantizeLinear in float, i.e. exact int8 x int8 -> int32 arithmetic up to float rounding),
    which separates quantization error from the kernels' own arithmetic;
  * one ``edgepack-agent bench`` process per (model, runtime) for load time and RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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

SPEC = "size=224,resize=256,mean=127,std=128,layout=nchw,color=rgb"  # as scripts/bench_quantize.py


def log(m: str) -> None:
    print(f"[bench-ov] {m}", file=sys.stderr, flush=True)


def cpu_info() -> dict:
    from edgepack.quantize.numerics import cpu_info as read_cpu
    name, flags = read_cpu()
    isa = {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")}
    return {"cpu": name, "cores": os.cpu_count(), "isa": isa}


def quantize_int8(fp32: Path, calib, out: Path, reduce_range: bool = False) -> float:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = (f for _, f in calib.feeds(1, ["input"]))

        def get_next(self):
            return next(self.it, None)

    t = time.perf_counter()
    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range)
    return time.perf_counter() - t


def unfused_ort(model: Path):
    """ORT with graph optimisations off: QDQ stays Dequantize -> float op (exact integer arithmetic)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return lambda feeds: s.run(None, feeds)


def ov_kernel_precisions(model: Path) -> dict[str, int]:
    """Layer type x runtime precision of OpenVINO's compiled CPU graph: shows the INT8 kernels ran."""
    import openvino as ov
    core = ov.Core()
    rm = core.compile_model(core.read_model(str(model)), "CPU", {"INFERENCE_NUM_THREADS": 1}).get_runtime_model()
    out: dict[str, int] = {}
    for op in rm.get_ordered_ops():
        ri = op.get_rt_info()
        if "layerType" in ri and ri["layerType"].astype(str) in ("Convolution", "FullyConnected", "MatMul"):
            k = f"{ri['layerType'].astype(str)} {ri['runtimePrecision'].astype(str) if 'runtimePrecision' in ri else '?'}"
            out[k] = out.get(k, 0) + 1
    return out


def logits(run, ds) -> np.ndarray:
    return np.concatenate([run(f)[0].reshape(1, -1) for _, f in ds.feeds(1, ["input"])])


def interleaved(sessions: dict, feed: dict, rounds: int, per_round: int, warmup: int = 10) -> dict:
    for s in sessions.values():
        for _ in range(warmup):
            s.run(feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            run = s.run
            for _ in range(per_round):
                t = time.perf_counter()
                run(feed)
                times[k].append(time.perf_counter() - t)
    out = {}
    for k, v in times.items():
        a = np.asarray(v) * 1e3
        per = [float(np.median(a[i * per_round:(i + 1) * per_round])) for i in range(rounds)]
        out[k] = {"median_ms": round(float(np.median(a)), 4), "p90_ms": round(float(np.percentile(a, 90)), 4),
                  "runs": len(a), "round_medians_ms": [round(x, 4) for x in per]}
    return out


def agent_bench(model: Path, runtime: str, threads: int, runs: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "device_agent", "bench", "--model", str(model), "--runtime", runtime,
                        "--threads", str(threads), "--runs", str(runs), "--warmup", "10"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise SystemExit(f"edgepack-agent bench {model.name} {runtime} failed: {r.stderr.strip()[-500:]}")
    j = json.loads(r.stdout)
    return {k: j[k] for k in ("runtime", "runtime_version", "provider", "threads", "load_ms", "first_inference_ms",
                              "rss_runtime_mb", "rss_model_mb", "peak_rss_mb")} | {"p50_ms": round(j["latency"]["p50_ms"], 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="3 rounds x 5 runs, 40 eval images (smoke run)")
    ap.add_argument("-o", "--output", default=str(ROOT / "bench-results" / "openvino.json"))
    a = ap.parse_args()
    rounds, per_round = (3, 5) if a.quick else (a.rounds, a.per_round)
    import onnxruntime
    import openvino

    from device_agent.runtime import load_model

    res: dict = {"command": "python scripts/bench_openvino.py" + (" --quick" if a.quick else
                                                                  f" --rounds {rounds} --per-round {per_round}"),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "machine": {**cpu_info(), "python": platform.python_version(),
                             "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
                             "openvino_cpu": openvino.Core().get_property("CPU", "FULL_DEVICE_NAME"),
                             "note": "shared 2-core VM; other jobs ran on the same cores"}}
    pp = ImagePreprocess.parse(SPEC)
    fp32 = asset("models/efficientnet-lite0.onnx")
    calib = load_dataset(asset("images/natural-calib"), pp, limit=100)
    evals = load_dataset(asset("images/natural-eval"), pp)
    if a.quick:
        evals = evals.subset(np.arange(40))
    with tempfile.TemporaryDirectory() as td:
        int8 = Path(td) / "efficientnet-lite0-int8.onnx"
        log("quantize_static (per-channel, u8 activations, 100 calibration images)")
        qs = quantize_int8(fp32, calib, int8)
        res["int8_model"] = {"how": "onnxruntime.quantization.quantize_static: QDQ, per_channel=True, "
                                    "activations QUInt8, weights QInt8, MinMax, 100 images of images/natural-calib",
                             "bytes": int8.stat().st_size, "fp32_bytes": fp32.stat().st_size, "quantize_s": round(qs, 1),
                             "openvino_cpu_kernels": ov_kernel_precisions(int8),
                             "openvino_cpu_kernels_fp32_model": ov_kernel_precisions(fp32)}
        log(json.dumps(res["int8_model"]))

        # accuracy: 176 held-out images ------------------------------------------------------------
        log(f"agreement on {len(evals)} images")
        runs = {}
        for prec, path in (("fp32", fp32), ("int8", int8)):
            for rt in ("onnxruntime", "openvino"):
                s = load_model(path, rt, threads=2)
                runs[f"{rt} {prec}"] = logits(s.run, evals)
        runs["onnxruntime int8 unfused (exact)"] = logits(unfused_ort(int8), evals)
        # 7-bit weights (reduce_range): u8 x s7 pairs cannot overflow int16, so a saturating kernel
        # computes them exactly; if OpenVINO's gap closes here, the gap above is saturation.
        int8_rr = Path(td) / "efficientnet-lite0-int8-rr.onnx"
        log("quantize_static again with reduce_range=True (7-bit weights)")
        quantize_int8(fp32, calib, int8_rr, reduce_range=True)
        for rt in ("onnxruntime", "openvino"):
            runs[f"{rt} int8 reduce_range"] = logits(load_model(int8_rr, rt, threads=2).run, evals)
        runs["onnxruntime int8 reduce_range unfused (exact)"] = logits(unfused_ort(int8_rr), evals)
        top = {k: v.argmax(1) for k, v in runs.items()}
        ref = top["onnxruntime fp32"]
        res["agreement"] = {
            "images": len(evals),
            "fp32_openvino_vs_onnxruntime_top1": float(np.mean(top["openvino fp32"] == ref)),
            "fp32_openvino_vs_onnxruntime_max_abs_logit_diff": float(np.abs(runs["openvino fp32"] - runs["onnxruntime fp32"]).max()),
            "int8_vs_fp32_top1": {
                "onnxruntime (this host's kernels)": float(np.mean(top["onnxruntime int8"] == ref)),
                "openvino (this host's kernels)": float(np.mean(top["openvino int8"] == top["openvino fp32"])),
                "onnxruntime unfused (exact int8 arithmetic)": float(np.mean(top["onnxruntime int8 unfused (exact)"] == ref)),
            },
            "int8_reduce_range_vs_fp32_top1": {
                "onnxruntime": float(np.mean(top["onnxruntime int8 reduce_range"] == ref)),
                "openvino": float(np.mean(top["openvino int8 reduce_range"] == top["openvino fp32"])),
                "onnxruntime unfused (exact)": float(np.mean(top["onnxruntime int8 reduce_range unfused (exact)"] == ref)),
            },
            "int8_openvino_vs_unfused_exact_top1": float(np.mean(top["openvino int8"] == top["onnxruntime int8 unfused (exact)"])),
            "int8_onnxruntime_vs_unfused_exact_top1": float(np.mean(top["onnxruntime int8"] == top["onnxruntime int8 unfused (exact)"])),
            "int8_openvino_vs_onnxruntime_top1": float(np.mean(top["openvino int8"] == top["onnxruntime int8"])),
        }

        def cos(x: np.ndarray, y: np.ndarray) -> float:
            return float(np.mean(np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))))

        res["agreement"]["int8_logit_cosine_vs_fp32"] = {
            "onnxruntime": cos(runs["onnxruntime int8"], runs["onnxruntime fp32"]),
            "openvino": cos(runs["openvino int8"], runs["openvino fp32"]),
            "unfused (exact)": cos(runs["onnxruntime int8 unfused (exact)"], runs["onnxruntime fp32"])}
        log(json.dumps(res["agreement"]))

        # latency: interleaved, 1 and 2 threads ------------------------------------------------------
        feed = next(evals.feeds(1, ["input"]))[1]
        res["latency"] = []
        for threads in (1, 2):
            sess = {f"{rt} {prec}": load_model(p, rt, threads=threads)
                    for prec, p in (("fp32", fp32), ("int8", int8)) for rt in ("onnxruntime", "openvino")}
            assert all(s.threads == threads for s in sess.values()), {k: s.threads for k, s in sess.items()}
            assert sess["openvino fp32"].provider == "CPU"
            log(f"latency, {threads} thread(s): {rounds} rounds x {per_round} runs")
            st = interleaved(sess, feed, rounds, per_round)
            m = {k: v["median_ms"] for k, v in st.items()}
            row = {"threads": threads, "stats": st,
                   "openvino_over_onnxruntime": {p: round(m[f"openvino {p}"] / m[f"onnxruntime {p}"], 3) for p in ("fp32", "int8")},
                   "int8_over_fp32": {rt: round(m[f"{rt} int8"] / m[f"{rt} fp32"], 3) for rt in ("onnxruntime", "openvino")}}
            res["latency"].append(row)
            log(json.dumps({k: v for k, v in row.items() if k != "stats"} | {"medians": m}))
            del sess

        # one real agent process per (model, runtime): load time and memory ------------------------
        res["agent_bench"] = []
        for prec, p in (("fp32", fp32), ("int8", int8)):
            for rt in ("onnxruntime", "openvino"):
                res["agent_bench"].append({"model": f"efficientnet-lite0 {prec}",
                                           **agent_bench(p, rt, 1, 20 if a.quick else 50)})
                log(json.dumps(res["agent_bench"][-1]))
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
