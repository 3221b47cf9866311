#!/usr/bin/env python3
"""EfficientNet-Lite0 INT8 on the emulated Raspberry Pi 4 (ARM kernels under qemu) next to the
quantizer's judge (numerics.exact_session: ORT's fused kernels with exact int32 sums), the QDQ
graph run unfused, and this host's own fused int8 kernels.

    python scripts/bench_arm.py [-o bench-results/arm.json] [--limit N] [--model Q.onnx [--report Q.json]]

The INT8 model: the main job's out/efficientnet-lite0-int8.onnx if present, else ORT per-channel
quantize_static (QDQ, U8 activations, S8 weights) on 100 calibration images. All held-out natural
images (natural-eval, 176) are run on each; agreement is top-1 against FP32 on the host. With
``--model`` that model is run instead, and with ``--report`` (its quantize report) the figure
quantize reported is set beside the board's (issue 11: within 1 point). Time per
image on the board is the emulator's (wall clock of the board's eval / images), not a Pi's.
"""
from __future__ import annotations

import argparse
import os
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--output", default="bench-results/arm.json")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--model", default="", help="INT8 model to run (default: the main job's, else ORT per-channel)")
    ap.add_argument("--report", default="", help="the model's quantize report (JSON): its agreement is compared")
    a = ap.parse_args()
    from edgepack.assets import asset
    from edgepack.data import load_dataset
    from edgepack.quantize.evaluate import session
    from edgepack.fleet.confirm import evaluate_on_board
    from edgepack.fleet.emulated import emulator_kind
    from edgepack.quantize.numerics import exact_session, host_int8, unfused_session
    fp32 = asset("models/efficientnet-lite0.onnx")
    from edgepack.quantize.workflows import resolve_preprocessing as _preprocessing
    pp = _preprocessing(fp32, None, None)  # the model's declared image preprocessing
    ev = load_dataset(asset("images/natural-eval"), pp)
    name = session(fp32).get_inputs()[0].name
    x = np.concatenate([f[name] for _, f in ev.feeds(32, [name])])
    if a.limit:
        x = x[:a.limit]
    td = Path(tempfile.mkdtemp(prefix="bench-arm-"))
    main_job = ROOT / "out" / "efficientnet-lite0-int8.onnx"
    if a.model:
        q, how = Path(a.model), f"{a.model} (given)"
    elif main_job.is_file():
        q, how = main_job, "main job (edgepack quantize --target rpi4-2gb)"
    else:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        cal = load_dataset(asset("images/natural-calib"), pp, limit=100)
        feeds = [{name: f[name][i:i + 1]} for _, f in cal.feeds(32, [name]) for i in range(len(f[name]))]

        class R(CalibrationDataReader):
            def __init__(self):
                self.it = iter(feeds)

            def get_next(self):
                return next(self.it, None)

        q, how = td / "efficientnet-lite0-int8.onnx", f"ORT quantize_static per-channel QDQ, {len(feeds)} calibration images"
        quantize_static(str(fp32), str(q), R(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)

    def top1(sess) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        y = np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
        return y.argmax(1), (time.perf_counter() - t0) / len(x)

    ref, t_fp = top1(session(fp32, threads=1))
    exact, t_ex = top1(unfused_session(q, threads=1))
    judge, _ = top1(exact_session(q, threads=1))
    host, t_host = top1(session(q, threads=1))
    t0 = time.perf_counter()
    board = evaluate_on_board("rpi4-emu", q, x, threads=1)
    t_board = (time.perf_counter() - t0) / len(x)
    n = len(x)
    pct = lambda a, b: round(float((a == b).mean() * 100), 2)  # noqa: E731
    res = {"model": how, "images": n, "machine": {"host": platform.processor() or platform.machine(),
                                                 "note": f"{os.cpu_count()} cores, INT8: {host_int8().label}; board = qemu-aarch64 -cpu cortex-a72",
                                                 "board": emulator_kind("emulated-aarch64").info()},
           "agreement_with_fp32_pct": {"board_arm_kernels": pct(board, ref), "judge_fused_exact": pct(judge, ref),
                                       "unfused_qdq": pct(exact, ref), "host_kernels": pct(host, ref)},
           "board_vs_judge_same_top1": int((board == judge).sum()),
           "board_vs_unfused_same_top1": int((board == exact).sum()), "board_vs_host_same_top1": int((board == host).sum()),
           "seconds_per_image": {"board_emulated_incl_start": round(t_board, 3), "exact_host": round(t_ex, 4),
                                 "host_kernels": round(t_host, 4), "fp32_host": round(t_fp, 4)},
           "command": "python scripts/bench_arm.py " + " ".join(sys.argv[1:])}
    if a.report:
        rep = json.loads(Path(a.report).read_text())
        res["quantize_reported_agreement_pct"] = rep["agreement"]
        res["board_minus_reported_points"] = round(res["agreement_with_fp32_pct"]["board_arm_kernels"] - rep["agreement"], 3)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
