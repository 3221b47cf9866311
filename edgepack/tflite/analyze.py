"""`edgepack analyze MODEL.tflite`: what a LiteRT board will run in INT8, and what it loses.

For any ``.tflite``: the ops and tensor dtypes, the full-integer gate's verdict for the target,
and placement (ops an INT8-only accelerator takes versus float ops left to the CPU, in islands).
For a float ``.tflite`` with calibration data: it is quantized to full integer once (LiteRT's
quantizer, min/max calibration), the INT8 agreement with the float model is measured in LiteRT
(XNNPACK: exact int8 arithmetic), and the ops that lose most signal are listed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Dataset
from ..quantize.evaluate import compare
from .gate import float_findings, requires_full_integer
from .inspect import read_tflite


def _islands(info) -> int:
    runs, prev = 0, False
    for o in info.ops:
        if o.is_float and not prev:
            runs += 1
        prev = o.is_float
    return runs


def analyze_tflite(path: str | Path, target, *, calib: Dataset | None = None, evaluation: Dataset | None = None,
                   max_eval: int = 256) -> dict[str, Any]:
    info = read_tflite(path)
    d: dict[str, Any] = {"model": info.to_dict(), "target": target.name, "findings": []}
    bad = float_findings(info)
    if not bad:
        d["gate"] = "passes: full integer (no float tensor or op)"
    elif requires_full_integer(target):
        d["gate"] = f"REFUSED: {target.name} runs INT8 only; float: {'; '.join(bad[:4])}" + (" ..." if len(bad) > 4 else "")
    else:
        d["gate"] = f"not required ({target.name} allows float): {len(bad)} float op(s)/tensor(s) run in float"
    npu = [u for u in target.compute if u.kind != "cpu" and not set(u.dtypes) & {"fp32", "fp16", "bf16"}]
    n_int = len(info.ops) - len(info.float_ops)
    d["placement"] = (f"{n_int} of {len(info.ops)} ops integer" + (f" (eligible for {npu[0].name})" if npu else "")
                      + f"; {len(info.float_ops)} float op(s) in {_islands(info)} island(s)"
                      + (" on the CPU" if npu else ""))
    if info.inputs and info.inputs[0].dtype.startswith("float"):
        d["findings"].append("the model takes float input: a full-integer model takes int8 (quantize with "
                             "edgepack quantize --format tflite)")
    if info.full_integer:
        per_t = [t.name for o in info.ops if o.op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
                 for t in [info.tensors[o.inputs[1]]] if len(o.inputs) > 1 and not t.per_channel]
        if per_t:
            d["findings"].append(f"{len(per_t)} conv/FC layer(s) have per-tensor weights (per-channel is more accurate "
                                 f"in LiteRT): {', '.join(per_t[:3])}")
    if info.float_tensors and calib is not None and evaluation is not None and len(info.float_ops) == len(info.ops):
        from .convert import quantize_float_tflite
        from .pipeline import _op_sensitivity
        from .run import calibration_array, predict_tflite

        ev = evaluation.subset(np.arange(min(max_eval, len(evaluation))), evaluation.name)
        with tempfile.TemporaryDirectory(prefix="edgepack-ta-") as td:
            q = Path(td) / "int8.tflite"
            run = quantize_float_tflite(path, calibration_array(calib, tuple(info.inputs[0].shape[1:])), q)
            c = compare(predict_tflite(path, ev), predict_tflite(q, ev), ev.labels)
            d["int8_agreement"], d["eval_samples"], d["int8_sqnr_db"] = round(c.agreement, 2), len(ev), round(c.output_sqnr_db, 2)
            d["bias_fixes"] = run.bias_fixes
            d["op_loss"] = [{"tensor": n, "loss_db": round(v, 2)} for n, v in _op_sensitivity(Path(path), q, ev, 4)[:20]]
            if run.bias_fixes:
                d["findings"].append(f"{run.bias_fixes} layer(s) had int32 biases out of range (near-zero weight channels); "
                                     "edgepack widened those channels' weight scales")
    return d


__all__ = ["analyze_tflite"]
