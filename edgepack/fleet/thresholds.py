"""One regression judgement for push, ``fleet check`` and the report: what counts as a regression.

Why one place: the push's canary gate and the later ``fleet check`` must never disagree about
whether the same figures regressed, and a threshold changed in one must change in both.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_DRIFT = 0.02


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    max_drift: float = DEFAULT_MAX_DRIFT  # top-1 drift: 1 - agreement with the host's reference outputs
    latency_margin: float = 0.20          # p90 may grow this much over the previous release ...
    latency_floor_ms: float = 0.5         # ... and by at least this many ms before it counts (timer noise)


@dataclass(frozen=True)
class Finding:
    kind: str  # drift | latency_budget | latency_regression | ram
    value: float
    threshold: float
    message: str


def judge(th: Thresholds, *, drift: float | None = None, p90_ms: float | None = None,
          baseline_p90_ms: float | None = None, latency_budget_ms: float | None = None,
          peak_rss_mb: float | None = None, ram_budget_mb: float | None = None) -> list[Finding]:
    """Every threshold the figures cross. Missing figures (None) are never a regression."""
    out = []
    if drift is not None and drift > th.max_drift:
        out.append(Finding("drift", drift, th.max_drift, f"top-1 drift {drift:.3f} > {th.max_drift}"))
    if p90_ms is not None and latency_budget_ms is not None and p90_ms > latency_budget_ms:
        out.append(Finding("latency_budget", p90_ms, latency_budget_ms,
                           f"p90 {p90_ms:.2f} ms > budget {latency_budget_ms} ms"))
    if (p90_ms is not None and baseline_p90_ms is not None and p90_ms > baseline_p90_ms * (1 + th.latency_margin)
            and p90_ms - baseline_p90_ms > th.latency_floor_ms):
        out.append(Finding("latency_regression", p90_ms, baseline_p90_ms * (1 + th.latency_margin),
                           f"p90 {p90_ms:.2f} ms > previous release {baseline_p90_ms:.2f} ms + {th.latency_margin:.0%}"))
    if peak_rss_mb is not None and ram_budget_mb is not None and peak_rss_mb > ram_budget_mb:
        out.append(Finding("ram", peak_rss_mb, ram_budget_mb,
                           f"peak RSS {peak_rss_mb:.1f} MiB > budget {ram_budget_mb} MiB"))
    return out


__all__ = ["Thresholds", "Finding", "judge", "DEFAULT_MAX_DRIFT"]
