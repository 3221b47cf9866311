#!/usr/bin/env python3
"""Where an INT8 model's agreement goes: which quantizers, kept float, buy it back -> JSON.

    .venv/bin/python scripts/bench_ceiling.py --model out/efficientnet-lite0-int8.onnx \
        [-o bench-results/ceiling.json] [--rounds 5]

From one QDQ model written by ``edgepack quantize`` (EfficientNet-Lite0, the main job's data),
variants that keep groups of activations float, weights staying INT8 but for the small convolutions
that then compute in float (actprec.without_quantizers + fold_float_conv_weights, as the search builds them):
every activation ("weights only": the ceiling that weight quantization alone leaves), the
outputs of pointwise convolutions and residual adds, only the adds, only the depthwise
convolutions. Each is judged as the board computes (numerics.exact_session: fused kernels,
exact sums) on the search split (natural-calib, 136 images) and the held-out split
(natural-eval, 176), and timed against FP32 at 1 thread in interleaved rounds (medians, ratio).

Why: a 97 % agreement budget on 176 label-free images is 5 images; this says whether a budget
is missed because of activations (float activations can fix it, at a latency price) or of the
weights themselves (nothing short of float weights or QAT can).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from edgepack.assets import asset  # noqa: E402
from edgepack.data import load_dataset  # noqa: E402
from edgepack.quantize.actprec import activation_quantizers, fold_float_conv_weights, without_quantizers  # noqa: E402
from edgepack.quantize.graph import is_depthwise, producers  # noqa: E402
from edgepack.quantize.evaluate import compare, predict, session  # noqa: E402
from edgepack.quantize.latency import compare_latency  # noqa: E402
from edgepack.quantize.numerics import exact_session, host_int8  # noqa: E402
from edgepack.quantize.workflows import resolve_preprocessing  # noqa: E402


def _kind(node: onnx.NodeProto | None) -> str:
    if node is None:
        return "input"
    if node.op_type == "Conv":
        return "depthwise" if is_depthwise(node) else "conv"
    return node.op_type.lower()


def groups(m: onnx.ModelProto) -> dict[str, list[str]]:
    """Quantized activations by the kind of op that writes them."""
    producer = producers(m)
    q = list(activation_quantizers(m))
    kind = {t: _kind(producer.get(t)) for t in q}
    return {"as given": [], "weights only (every activation float)": q,
            "pointwise conv + add outputs float": [t for t in q if kind[t] in ("conv", "add")],
            "add outputs float": [t for t in q if kind[t] == "add"],
            "depthwise outputs float": [t for t in q if kind[t] == "depthwise"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a QDQ model from edgepack quantize (EfficientNet-Lite0)")
    ap.add_argument("-o", "--output", default="bench-results/ceiling.json")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    fp32 = asset("models/efficientnet-lite0.onnx")
    pp = resolve_preprocessing(fp32, None, None)
    splits = {"search": load_dataset(asset("images/natural-calib"), pp),
              "held_out": load_dataset(asset("images/natural-eval"), pp)}
    ref = {k: predict(session(fp32), d) for k, d in splits.items()}
    m = onnx.load(a.model)
    work = Path(a.output).with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, tensors in groups(m).items():
        path = work / f"variant-{len(rows)}.onnx"
        onnx.save(fold_float_conv_weights(without_quantizers(m, tensors)) if tensors else m, str(path))
        judge = exact_session(path)
        row = {"variant": label, "float_activations": len(tensors), "size_bytes": path.stat().st_size}
        for k, d in splits.items():
            c = compare(ref[k], predict(judge, d), None)
            row[f"{k}_agreement_pct"] = round(c.agreement, 2)
            row[f"{k}_n"] = c.n
        f, q = compare_latency(fp32, path, splits["held_out"].loader(0), threads=1, rounds=a.rounds,
                               per_round=10, warmup=3)
        row["latency_ratio_1t"] = round(q.median_ms / f.median_ms, 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    res = {"model": a.model, "judge": "numerics.exact_session (ORT fused kernels, exact int32 sums)",
           "machine": {"cpu": host_int8().cpu, "cores": os.cpu_count(), "int8": host_int8().label,
                       "python": platform.python_version()},
           "rows": rows, "command": "python scripts/bench_ceiling.py " + " ".join(sys.argv[1:])}
    out = Path(a.output)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
