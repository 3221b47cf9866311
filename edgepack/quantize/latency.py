"""Latency on this machine, measured fairly between two models.

Shared machines are noisy, so the two models are timed in alternating rounds (A, B, A, B, ...)
after a warm-up, and the figures are medians and p90 over many single-sample runs; the ratio of
medians is what the speed gate looks at.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..data import as_feed
from .evaluate import session


@dataclass
class LatencyStats:
    threads: int
    runs: int
    median_ms: float
    p90_ms: float

    @classmethod
    def of(cls, threads: int, times_s: list[float]) -> "LatencyStats":
        a = np.asarray(times_s) * 1e3
        return cls(threads, len(a), float(np.median(a)), float(np.percentile(a, 90)))


def interleaved(models: dict, sample, *, threads: int, rounds: int = 10, per_round: int = 10,
                warmup: int = 5) -> dict[str, LatencyStats]:
    """Batch-1 latency of several models (paths or bytes) on the same input and thread count,
    timed in alternating rounds so that load on a shared machine hits them all alike."""
    sess = {k: session(m, threads) for k, m in models.items()}
    batch = {k: v[None] for k, v in sample.items()} if isinstance(sample, dict) else sample[None]
    feeds = {k: as_feed(batch, [i.name for i in s.get_inputs()]) for k, s in sess.items()}
    for k, s in sess.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sess}
    for _ in range(rounds):
        for k, s in sess.items():
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t)
    return {k: LatencyStats.of(threads, v) for k, v in times.items()}


def compare_latency(model_a, model_b, sample, *, threads: int, rounds: int = 10,
                    per_round: int = 10, warmup: int = 5) -> tuple[LatencyStats, LatencyStats]:
    """Batch-1 latency of two models with the same input and thread count."""
    r = interleaved({"a": model_a, "b": model_b}, sample, threads=threads, rounds=rounds,
                    per_round=per_round, warmup=warmup)
    return r["a"], r["b"]
