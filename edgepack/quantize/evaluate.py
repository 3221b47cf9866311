"""Run a model over a data set; compare predictions with labels and with the FP32 model.

Accuracy needs labels; agreement (the share of samples whose top-1 class matches FP32) needs
none, which is what makes label-free natural images usable. Disagreements are tested with an
exact binomial (McNemar) test so a drop on a small set is not mistaken for noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from ..data import Dataset


def session(model: str | Path | bytes, threads: int = 0, optimize: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, so,
                                providers=["CPUExecutionProvider"])


def predict(sess: ort.InferenceSession, data: Dataset, *, batch_size: int = 32,
            progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Logits (N, classes) for every sample of ``data``, in order."""
    names = [i.name for i in sess.get_inputs()]
    outs = []
    for idx, feed in data.feeds(batch_size, names):
        y = sess.run(None, feed)[0]
        outs.append(y.reshape(len(idx), -1))
        if progress:
            progress(len(idx))
    return np.concatenate(outs)


@dataclass
class Comparison:
    """INT8 against FP32 on one split."""

    n: int
    fp32_top1: float | None      # percent, None without labels
    int8_top1: float | None
    agreement: float             # percent of samples with the same top-1 as FP32
    drop: float                  # accuracy drop (labels) or 100 - agreement (no labels), points
    output_sqnr_db: float
    mcnemar_p: float | None      # exact two-sided p of "INT8 and FP32 are equally accurate"
    drop_se: float = 0.0         # standard error of ``drop`` from this split's sample size, points

    @property
    def metric(self) -> str:
        return "top-1 accuracy" if self.fp32_top1 is not None else "top-1 agreement"


def compare(ref_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray | None) -> Comparison:
    ref_top, top = ref_logits.argmax(1), logits.argmax(1)
    agree = float((ref_top == top).mean() * 100)
    err = float(((ref_logits - logits) ** 2).sum())
    sqnr = 10 * math.log10(float((ref_logits ** 2).sum()) / err) if err > 0 else float("inf")
    n = len(top)
    if labels is None:
        p = agree / 100
        return Comparison(n, None, None, agree, 100 - agree, sqnr, None, 100 * math.sqrt(p * (1 - p) / n))
    a_fp, a_q = ref_top == labels, top == labels
    fp, q = float(a_fp.mean() * 100), float(a_q.mean() * 100)
    b, c = int((a_fp & ~a_q).sum()), int((~a_fp & a_q).sum())
    se = 100 * math.sqrt(max((b + c) / n - ((b - c) / n) ** 2, 0.0) / n)   # paired difference of two rates
    return Comparison(n, fp, q, agree, fp - q, sqnr, mcnemar_exact(b, c), se)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)
