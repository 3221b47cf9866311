#!/usr/bin/env python3
"""Issue 11, EfficientNet-Lite0 at 97 %: which PTQ technique moves exact-arithmetic agreement.

Each variant of the float model (plain, cross-layer equalization in its two ReLU6 modes, with
and without bias absorption) is calibrated on the main job's 100 calibration images, its weights
rounded (GPTQ + bias correction, or round-to-nearest), built as QDQ with one calibration method,
and judged in the board's exact arithmetic (QDQ unfused) on the search split (the 136-image
``natural-calib`` pool), on the 176 held-out ``natural-eval`` images and on the 20 labelled
ImageNet samples. Agreement is always with the *original* FP32 model. Writes JSON.

    nice -n 5 .venv/bin/python scripts/bench_effnet97.py -o bench-results/effnet97.json \
        [--variants base,cle-relu,...] [--methods percentile,mse] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepack.assets import asset  # noqa: E402
from edgepack.data import load_dataset  # noqa: E402
from edgepack.modelinfo import load_model  # noqa: E402
from edgepack.quantize.calibrate import collect  # noqa: E402
from edgepack.quantize.equalize import equalize  # noqa: E402
from edgepack.quantize.evaluate import compare, predict, session  # noqa: E402
from edgepack.quantize.qdq import QDQBuilder, preprocess_model  # noqa: E402
from edgepack.quantize.rounding import optimize_weight_rounding  # noqa: E402
from edgepack.quantize.workflows import resolve_preprocessing  # noqa: E402
from edgepack.targets import load_target  # noqa: E402

VARIANTS = {   # name: (equalization mode or None, absorb, rounding)
    "base": (None, False, "gptq"),
    "base-rtn": (None, False, "rtn"),
    "cle-relu": ("relu", True, "gptq"),
    "cle-relu-noabsorb": ("relu", False, "gptq"),
    "cle-relu6": ("relu6", True, "gptq"),
    "range-eq": ("range", False, "gptq"),
}


def log(m: str) -> None:
    print(f"[effnet97 {time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--output", default="bench-results/effnet97.json")
    ap.add_argument("--variants", default="base,cle-relu,cle-relu6")
    ap.add_argument("--methods", default="percentile,mse")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", default="", help="folder to keep the QDQ models in")
    ap.add_argument("--compensation", default="local", choices=("local", "network"))
    ap.add_argument("--compensate", type=int, default=0, help="input-compensation passes after the first "
                    "method's model (rounding.optimize_weight_rounding(quantized=...))")
    a = ap.parse_args()
    model = asset("models/efficientnet-lite0.onnx")
    pp = resolve_preprocessing(model)
    calib = load_dataset(asset("images/natural-calib"), pp)
    search = calib
    calib = calib.subset(np.arange(100), calib.name)
    hold = load_dataset(asset("images/natural-eval"), pp)
    imnet = load_dataset(asset("images/imagenet"), pp)
    info = load_model(model)
    target = load_target("rpi4-2gb")
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="effnet97-"))
    work.mkdir(parents=True, exist_ok=True)
    pre = preprocess_model(info, work)
    fp = session(info.path, a.threads)
    refs = {k: predict(fp, d, batch_size=16) for k, d in (("search", search), ("hold", hold), ("imnet", imnet))}
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"machine": open("/proc/cpuinfo").read().count("processor"), "rows": [],
           "fp32_imagenet_top1": float((refs["imnet"].argmax(1) == imnet.labels).mean() * 100)}
    for vname in a.variants.split(","):
        mode, absorb, rounding = VARIANTS[vname]
        t0 = time.perf_counter()
        m, note = pre, {}
        if mode:
            m, rep = equalize(pre, mode, absorb=absorb, calib=calib, input_names=info.input_names)
            note = {"pairs": rep.pairs, "absorbed_channels": rep.absorbed_channels,
                    "relu6_replaced": rep.relu6_replaced, "range_ratio": [rep.max_range_ratio_before,
                                                                          rep.max_range_ratio_after]}
        vdir = work / vname
        vdir.mkdir(exist_ok=True)
        fpath = vdir / "float.onnx"
        onnx.save(m, str(fpath))
        fs = session(fpath, a.threads)
        f_hold = compare(refs["hold"], predict(fs, hold, batch_size=16), None).agreement
        cal = collect(m, calib, info.input_names, batch_size=8, threads=a.threads)
        batches = lambda: (f for _, f in calib.feeds(8, info.input_names))  # noqa: E731
        rounded, overrides, rrep = optimize_weight_rounding(m, batches, bits=target.weight_bits, method=rounding)
        rpath = vdir / "rounded.onnx"
        onnx.save(rounded, str(rpath))
        b = QDQBuilder(rpath, cal, target, vdir, overrides)
        prep_s = time.perf_counter() - t0
        log(f"{vname}: prepared in {prep_s:.0f}s (float variant agreement {f_hold:.2f} %) {note}")
        jobs = [(mth, 0) for mth in a.methods.split(",")] + [(a.methods.split(",")[0], k + 1) for k in range(a.compensate)]
        prev = None
        for method, comp in jobs:
            t1 = time.perf_counter()
            if comp:
                rounded, overrides, rrep = optimize_weight_rounding(m, batches, bits=target.weight_bits, method=rounding,
                                                                    quantized=onnx.load(str(prev)), compensation=a.compensation)
                rpath = vdir / f"rounded-comp{comp}.onnx"
                onnx.save(rounded, str(rpath))
                b = QDQBuilder(rpath, cal, target, vdir, overrides)
            q = b.build(method, [])
            if not comp and prev is None:
                prev = q
            elif comp:
                prev = q
            js = session(q, a.threads, optimize=False)
            row = {"variant": vname + (f"+{a.compensation}-comp{comp}" if comp else ""), "method": method, "rounding": rounding,
                   "equalize": note, "compensation_passes": comp,
                   "float_variant_hold_agreement": f_hold, "size_bytes": q.stat().st_size,
                   "prepare_s": round(prep_s, 1)}
            for k, d in (("search", search), ("hold", hold), ("imnet", imnet)):
                y = predict(js, d, batch_size=16)
                c = compare(refs[k], y, d.labels if k == "imnet" else None)
                row[k] = {"agreement": round(c.agreement, 3), "sqnr_db": round(c.output_sqnr_db, 2),
                          "agree_n": int((refs[k].argmax(1) == y.argmax(1)).sum()), "n": c.n}
                if k == "imnet":
                    row[k]["top1"] = c.int8_top1
            row["eval_s"] = round(time.perf_counter() - t1, 1)
            row["model"] = str(q)
            res["rows"].append(row)
            log(f"{row['variant']}/{method}: search {row['search']['agreement']:.2f} hold {row['hold']['agreement']:.2f} "
                f"({row['hold']['agree_n']}/176, {row['hold']['sqnr_db']} dB) imnet top1 {row['imnet']['top1']}")
            out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
