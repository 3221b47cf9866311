#!/usr/bin/env python3
"""Which INT8 kernels make a model faster than FP32 on this x86 host? -> bench-results/x86.json

    nice -n 5 .venv/bin/python scripts/bench_x86.py [--models efficientnet,fashion] [--rounds 9]

Issue 11 asks an x86 host target for INT8 <= 0.55x FP32 latency at 1 and 2 threads with the
host kernels' accuracy within budget, "or the measured reason it cannot be reached with ORT's
kernels, and what does reach it". On a CPU with AVX2 but no VNNI, ONNX Runtime's u8 x s8 kernels
multiply-accumulate with three instructions (vpmaddubsw, vpmaddwd, vpaddd) and saturate pair sums
at 16 bits; VNNI does it in one, exactly. So this script builds, from one calibration (edgepack's
streaming MinMax ranges, 100 images / 256 Fashion images) and plain round-to-nearest weights,
every INT8 encoding ONNX Runtime and OpenVINO offer on x86, and measures side by side in one run:

  * latency, batch 1, at 1 and 2 threads, every model of one model family timed in interleaved
    rounds (edgepack.quantize.latency.interleaved), medians and ratios to ORT FP32;
  * accuracy on the held-out data on this host's own kernels (ORT fused, OpenVINO CPU) and in
    exact int8 arithmetic (the same QDQ run unfused): agreement with FP32, and top-1 with labels.

Variants: QDQ u8 activations x s8 weights per-channel (ORT's per-channel recipe), the same with
7-bit weights (reduce_range: cannot saturate), per-tensor u8 x s8, per-tensor s8 x s8 (ORT's
defaults), u8 x u8 weights (MLAS's non-saturating u8u8 kernel), QOperator per-channel, and the
per-channel QDQ file run by OpenVINO's CPU plugin. The machine's CPU flags are recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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
from edgepack.quantize.numerics import cpu_info, host_int8  # noqa: E402

SPEC = "size=224,resize=256,mean=127,std=128,layout=nchw,color=rgb"

# name -> (format, activation type, weight type, per_channel, reduce_range)
VARIANTS = {
    "qdq-u8s8-per-channel": ("QDQ", "QUInt8", "QInt8", True, False),
    "qdq-u8s8-per-channel-7bit": ("QDQ", "QUInt8", "QInt8", True, True),
    "qdq-u8s8-per-tensor": ("QDQ", "QUInt8", "QInt8", False, False),
    "qdq-s8s8-per-tensor (ORT defaults)": ("QDQ", "QInt8", "QInt8", False, False),
    "qdq-u8u8-per-channel": ("QDQ", "QUInt8", "QUInt8", True, False),
    "qoperator-u8s8-per-channel": ("QOperator", "QUInt8", "QInt8", True, False),
}


def log(m: str) -> None:
    print(f"[bench-x86] {m}", file=sys.stderr, flush=True)


def cpu_flags() -> dict:
    name, flags = cpu_info()
    isa = {f: f in flags for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")}
    return {"model": name, "cores": os.cpu_count(), "isa": isa, "host_int8": host_int8().label,
            "load_average_at_start": os.getloadavg()}


def build(model: Path, cache: Path, out: Path, fmt: str, act: str, wt: str, per_channel: bool, reduce: bool) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from edgepack.quantize.qdq import quiet_ort

    with quiet_ort():
        quantize_static(str(model), str(out), calibration_data_reader=None,
                        quant_format=getattr(QuantFormat, fmt), per_channel=per_channel, reduce_range=reduce,
                        activation_type=getattr(QuantType, act), weight_type=getattr(QuantType, wt),
                        calibration_cache_path=str(cache))
    return out


class OpenVINOSession:
    """OpenVINO's CPU plugin behind ORT's ``run``/``get_inputs`` interface (f32 inference precision)."""

    def __init__(self, path: Path, threads: int = 0):
        import openvino as ov

        core = ov.Core()
        cfg = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", cfg)
        self.req = self.compiled.create_infer_request()
        self.names = [i.get_any_name() for i in self.compiled.inputs]

    def get_inputs(self):
        class _I:
            def __init__(self, n):
                self.name = n
        return [_I(n) for n in self.names]

    def run(self, _outputs, feed):
        r = self.req.infer(feed)
        return [next(iter(r.values()))]


def timed(models: dict, sample: np.ndarray, threads: int, rounds: int, per_round: int) -> dict:
    """Interleaved rounds over ORT sessions and OpenVINO compiled models alike."""
    sess = {}
    for k, (kind, p) in models.items():
        sess[k] = OpenVINOSession(p, threads) if kind == "openvino" else session(p, threads)
    batch = sample[None].astype(np.float32)
    feeds = {k: {s.get_inputs()[0].name: batch} for k, s in sess.items()}
    for k, s in sess.items():
        for _ in range(5):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sess}
    per_round_medians: dict[str, list[float]] = {k: [] for k in sess}
    for _ in range(rounds):
        for k, s in sess.items():
            t_round = []
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, feeds[k])
                t_round.append(time.perf_counter() - t)
            times[k] += t_round
            per_round_medians[k].append(float(np.median(t_round) * 1e3))
    res = {k: {"median_ms": round(float(np.median(v) * 1e3), 4), "p90_ms": round(float(np.percentile(v, 90) * 1e3), 4),
               "round_medians_ms": [round(x, 4) for x in per_round_medians[k]]} for k, v in times.items()}
    for k in res:
        res[k]["ratio_vs_ort_fp32"] = round(res[k]["median_ms"] / res["ort-fp32"]["median_ms"], 3)
    return res


def accuracy(models: dict, ds, ref: np.ndarray) -> dict:
    out = {}
    for k, (kind, p) in models.items():
        if k == "ort-fp32":
            continue
        row = {}
        if kind == "openvino":
            row["host_kernels"] = _cmp(OpenVINOSession(p), ds, ref)
        else:
            row["host_kernels"] = _cmp(session(p), ds, ref)
            if k != "ort-fp32":
                row["exact"] = _cmp(session(p, optimize=False), ds, ref)
        out[k] = row
        log(f"  {k}: {row}")
    return out


def _cmp(sess, ds, ref) -> dict:
    c = compare(ref, predict(sess, ds, batch_size=16), ds.labels)
    return {"agreement": round(c.agreement, 2), "top1": None if c.int8_top1 is None else round(c.int8_top1, 2),
            "drop": round(c.drop, 3)}


def family(name: str, model: Path, calib, held, rounds: int, per_round: int, work: Path,
           extra: dict[str, Path] | None = None) -> dict:
    import onnx

    from edgepack.modelinfo import load_model
    from edgepack.quantize.calibrate import collect
    from edgepack.quantize.qdq import preprocess_model

    log(f"{name}: pre-processing and calibrating on {len(calib)} samples (MinMax ranges)")
    info = load_model(model)
    d = work / name
    d.mkdir()
    pre = preprocess_model(info, d)
    cal = collect(pre, calib, info.input_names, batch_size=8)
    cache = cal.write_ort_cache("minmax", d / "ranges.json")
    models: dict[str, tuple[str, Path]] = {"ort-fp32": ("ort", model), "openvino-fp32": ("openvino", model)}
    for v, spec in VARIANTS.items():
        log(f"{name}: building {v}")
        models[v] = ("ort", build(d / "pre.onnx", cache, d / f"{len(models)}.onnx", *spec))
    models["openvino qdq-u8s8-per-channel"] = ("openvino", models["qdq-u8s8-per-channel"][1])
    models["openvino qdq-u8s8-per-channel-7bit"] = ("openvino", models["qdq-u8s8-per-channel-7bit"][1])
    for k, p in (extra or {}).items():     # models edgepack wrote (e.g. the main job's), same rounds
        models[k] = ("ort", p)
    res = {"model": name, "fp32_bytes": model.stat().st_size, "calibration_samples": len(calib),
           "held_out_samples": len(held), "sizes": {k: p.stat().st_size for k, (_, p) in models.items()}}
    log(f"{name}: accuracy on {len(held)} held-out samples")
    ref = predict(session(model), held, batch_size=16)
    res["fp32_top1"] = None if held.labels is None else round(float((ref.argmax(1) == held.labels).mean() * 100), 2)
    res["accuracy"] = accuracy(models, held, ref)
    for th in (1, 2):
        log(f"{name}: latency, {th} thread(s), {rounds} interleaved rounds x {per_round}")
        res[f"latency_threads_{th}"] = timed(models, held.loader(0), th, rounds, per_round)
        log("  " + ", ".join(f"{k} {v['ratio_vs_ort_fp32']}" for k, v in res[f"latency_threads_{th}"].items()))
    del onnx
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="efficientnet,fashion")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("-o", "--output", default=str(ROOT / "bench-results" / "x86.json"))
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=MODEL.onnx",
                    help="an EfficientNet-Lite0 INT8 model to measure beside the encodings (repeatable)")
    a = ap.parse_args()
    extra = {}
    for e in a.extra:
        k, sep, p = e.partition("=")
        if not sep or not Path(p).is_file():
            raise SystemExit(f"--extra {e!r}: give NAME=PATH to an existing .onnx file")
        extra[k] = Path(p)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    import onnxruntime
    import openvino

    results = {"machine": cpu_flags(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
               "openvino": openvino.__version__, "command": "python scripts/bench_x86.py " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M"), "models": []}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        for m in a.models.split(","):
            if m == "efficientnet":
                pp = ImagePreprocess.parse(SPEC)
                calib = load_dataset(asset("images/natural-calib"), pp, limit=100)
                held = load_dataset(asset("images/natural-eval"), pp)
                results["models"].append(family("efficientnet-lite0", asset("models/efficientnet-lite0.onnx"),
                                                calib, held, a.rounds, a.per_round, work, extra))
            elif m == "fashion":
                calib = load_dataset(asset("fashion-mnist/calib-x.npz"), limit=256)
                held = load_dataset(asset("fashion-mnist/test-x.npz"))
                results["models"].append(family("fashion-cnn", asset("models/fashion-cnn.onnx"), calib, held,
                                                a.rounds, a.per_round, work))
            elif m == "digits":
                calib = load_dataset(asset("digits/calib-x.npz"))
                held = load_dataset(asset("digits/test-x.npz"))
                results["models"].append(family("digits-cnn", asset("models/digits-cnn.onnx"), calib, held,
                                                a.rounds, a.per_round, work))
            else:
                raise SystemExit(f"unknown model {m!r} (efficientnet, fashion, digits)")
            out.write_text(json.dumps(results, indent=2, default=float))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
