"""Latency statistics shared by the health check, ``bench`` and the LLM token metrics.

Percentiles are nearest-rank (MLPerf style): every reported figure is a latency that was observed.
"""
from __future__ import annotations

import math


def percentile(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile (as MLPerf reports latency): a value that was actually observed."""
    if not sorted_vals:
        return float("nan")
    k = max(1, math.ceil(p / 100.0 * len(sorted_vals)))
    return sorted_vals[min(k, len(sorted_vals)) - 1]


def latency_stats(seconds: list[float]) -> dict[str, float]:
    s = sorted(seconds)
    ms = [x * 1e3 for x in s]
    return {"runs": len(s), "mean_ms": sum(ms) / len(ms) if ms else float("nan"), "p50_ms": percentile(ms, 50),
            "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99), "min_ms": ms[0] if ms else float("nan"),
            "max_ms": ms[-1] if ms else float("nan")}


__all__ = ["latency_stats", "percentile"]
