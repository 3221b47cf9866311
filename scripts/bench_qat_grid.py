"""Benchmark quantization-aware fine-tuning on a QDQ model's own grid (edgepack.quantize.qat_grid).

Takes an all-INT8 QDQ model (e.g. `edgepack quantize` for an INT8-only board) and its FP32 source,
fine-tunes the weights through the model's fixed activation and weight grids by distillation on
the calibration images (augmented), writes the integers back, and judges before/after on the
held-out images in the board's exact arithmetic (QDQ unfused) against the original FP32 model.
Writes JSON. Needs the torch extra.

    .venv/bin/python scripts/bench_qat_grid.py --qdq out/int8only.onnx -o docs/results/qat_grid_effnet.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    from edgepack.assets import assets_dir
    from edgepack.data import load_dataset
    from edgepack.quantize.evaluate import compare, predict, session
    from edgepack.quantize.numerics import host_int8
    from edgepack.quantize.qat_grid import GridQatOptions, finetune_on_grid, write_back
    from edgepack.quantize.workflows import resolve_preprocessing

    A = assets_dir()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=A / "models/efficientnet-lite0.onnx")
    p.add_argument("--qdq", type=Path, required=True, help="the all-INT8 QDQ model of --model")
    p.add_argument("--calib", type=Path, default=A / "images/natural-calib")
    p.add_argument("--calib-size", type=int, default=100)
    p.add_argument("--eval", type=Path, default=A / "images/natural-eval")
    d = GridQatOptions()   # the measured recipe: every flag defaults to it
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--loss", choices=("kl", "mse"), default=d.loss)
    p.add_argument("--fixed-ranges", action="store_true", help="keep the activation grids' scales (no LSQ)")
    p.add_argument("--range-lr", type=float, default=d.range_lr)
    p.add_argument("--mixup", type=float, default=d.mixup, help="Beta(a, a) blend of image pairs (0: off)")
    p.add_argument("--crop-min", type=float, default=d.crop_scale[0], help="smallest random-crop area (1: no crops)")
    p.add_argument("--no-weights", action="store_true", help="leave the weight integers as they are")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--output", type=Path, required=True)
    a = p.parse_args()
    pp = resolve_preprocessing(a.model)
    cal = load_dataset(a.calib, pp).subset(np.arange(a.calib_size))
    pool = load_dataset(a.calib, pp)
    ev = load_dataset(a.eval, pp)
    ref_e, ref_p = predict(session(a.model), ev), predict(session(a.model), pool)

    def judge(q: Path) -> dict:
        c = compare(ref_e, predict(session(q, optimize=False), ev), ev.labels)
        cp = compare(ref_p, predict(session(q, optimize=False), pool), pool.labels)
        return {"held_out_agreement": round(c.agreement, 2), "pool_agreement": round(cp.agreement, 2),
                "held_out_sqnr_db": round(c.output_sqnr_db, 2), "pool_sqnr_db": round(cp.output_sqnr_db, 2),
                "held_out_n": len(ev), "pool_n": len(pool)}

    before = judge(a.qdq)
    print("before", before, file=sys.stderr)
    o = GridQatOptions(steps=a.steps, batch_size=a.batch, lr=a.lr, threads=a.threads, loss=a.loss,
                       learn_ranges=not a.fixed_ranges, range_lr=a.range_lr, weights=not a.no_weights, mixup=a.mixup, crop_scale=(a.crop_min, 1.0))
    t = time.perf_counter()
    mod, rep = finetune_on_grid(a.qdq, a.model, cal, options=o, progress=lambda m: print(m, file=sys.stderr))
    out = write_back(mod, a.output.with_suffix(".onnx"))
    after = judge(out)
    print("after", after, file=sys.stderr)
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "int8": str(host_int8())},
           "command": " ".join(sys.argv), "fp32": str(a.model), "qdq": str(a.qdq), "options": o.__dict__,
           "before": before, "after": after, "seconds": round(time.perf_counter() - t, 1),
           "qdq_bytes": a.qdq.stat().st_size, "finetuned_bytes": out.stat().st_size,
           "report": {k: v for k, v in rep.__dict__.items()}}
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
