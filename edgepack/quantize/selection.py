"""How a search reads a candidate's figures on its selection split: the one rule that both the
ONNX search (:class:`.remedies.Search`) and the LiteRT search (:func:`edgepack.tflite.quantize_tflite`)
use, so a model quantized for ONNX Runtime and the same model quantized for LiteRT are chosen
the same way.

A candidate is anything with ``search_drop`` (points: a top-1 drop with labels, 100 - agreement
without), ``search_se`` (that figure's standard error on the split, points) and
``output_sqnr_db`` (FP32 logits against the candidate's, every logit of every sample).
"""
from __future__ import annotations

from typing import Protocol


class Judged(Protocol):
    search_drop: float
    search_se: float
    output_sqnr_db: float
    size_bytes: int


def fitting(cands: list, target) -> list:
    """The candidates within ``target``'s OTA budget, or all of them when none is: a model the
    board cannot download is chosen only when nothing smaller was made."""
    return [c for c in cands if c.size_bytes <= target.ota_budget_mb * 1e6] or list(cands)


def meeting_within_ota(cands: list, target, meets) -> tuple[list, list, str | None]:
    """``(fits, meeting, warning)``: the candidates :func:`fitting` the OTA budget, those of them
    that ``meets`` accepts, and a warning when only oversize candidates meet the accuracy budget."""
    fits = fitting(cands, target)
    meeting = [c for c in fits if meets(c)]
    warning = None
    if not meeting and any(meets(c) for c in cands):
        warning = (f"the only candidates within the accuracy budget are larger than {target.name}'s "
                   f"OTA budget ({target.ota_budget_mb:g} MB); the best one that fits was kept")
    return fits, meeting, warning


def meets(c: Judged, budget: float, *, labelled: bool, margin: float) -> bool:
    """Does ``c`` meet the accuracy budget on the selection split, by a margin?

    Why the margin: a search stops at the first candidate that crosses the budget, so on a small
    split it picks the one that crossed it by luck (the winner's curse). Measured on
    EfficientNet-Lite0 (136 label-free search images, 1 image = 0.74 points): a candidate at
    97.06 % on the search split read 96.02 % held out, and weights-only INT8 95.6 % / 98.3 %.
    On a label-free agreement floor the candidate must clear it by ``margin`` standard errors of
    its own search figure. Labelled budgets (a paired top-1 drop on larger splits: Fashion 5,000,
    MiniLM 500) keep no margin: measured there without one."""
    return c.search_drop + (0.0 if labelled else margin * c.search_se) <= budget


def accuracy_rank(c: Judged, *, labelled: bool) -> tuple[float, float]:
    """Sort key, most accurate first, for when no candidate is known to meet the budget.

    Why output SQNR first on a label-free floor: top-1 agreement on a small split moves with a
    handful of near-tie images, the output SQNR with every logit of every image. Measured on
    EfficientNet-Lite0 (six variants of one model, 136 search / 176 held-out images, fused exact
    judge): the search split's SQNR orders the held-out agreement exactly (29.5 dB -> 98.3 %,
    ..., 22.7 dB -> 94.3 %); its agreement does not (its best, 97.79 %, read 94.89 % held out,
    next to last). A labelled budget keeps the drop first: that is what the budget counts."""
    return (c.search_drop, -c.output_sqnr_db) if labelled else (-c.output_sqnr_db, c.search_drop)


__all__ = ["Judged", "fitting", "meeting_within_ota", "meets", "accuracy_rank"]
