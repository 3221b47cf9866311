"""Golden prompts for a board's health check of an LLM bundle.

The host records, for a few fixed prompts, the reference model's next-token distribution at
every position (top-k ids and probabilities, float32) and its perplexity on the prompts. The
board judges an installed model by next-token agreement with the reference argmax and by the
perplexity ratio. Both thresholds hold on small sets: agreement is a fraction over all
positions of all prompts (a few hundred tokens), and the ratio is of two perplexities over the
same tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import DataError
from .perplexity import log_softmax_nll


def make_golden(logits_fn, prompts: list[np.ndarray], top_k: int = 16) -> dict:
    """Arrays to store beside the bundle (``np.savez``): ids, lengths, top-k ids/probs, ppl."""
    if not prompts:
        raise DataError("golden prompts: need at least one prompt")
    ids, lens, top_ids, top_p, nll = [], [], [], [], []
    for p in prompts:
        p = np.asarray(p, np.int64).reshape(-1)
        if len(p) < 2:
            raise DataError("golden prompts: each prompt needs at least 2 tokens")
        lg = np.asarray(logits_fn(p[None]))[0].astype(np.float64)
        prob = np.exp(lg - lg.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        k = np.argsort(-prob, -1)[:, :top_k]
        ids.append(p)
        lens.append(len(p))
        top_ids.append(k.astype(np.int32))
        top_p.append(np.take_along_axis(prob, k, -1).astype(np.float32))
        nll.append(log_softmax_nll(lg[:-1], p[1:]))
    return {"ids": np.concatenate(ids), "lengths": np.asarray(lens, np.int64),
            "top_ids": np.concatenate(top_ids), "top_probs": np.concatenate(top_p),
            "ppl": np.float64(np.exp(np.concatenate(nll).mean()))}


@dataclass(frozen=True)
class GoldenVerdict:
    agreement: float          # next-token argmax agreement with the reference, all positions
    ppl: float
    ppl_ratio: float          # ppl / reference ppl
    ok: bool

    def to_dict(self) -> dict:
        return asdict(self)


def judge(logits_fn, golden: dict, min_agreement: float = 0.9, max_ppl_ratio: float = 1.1) -> GoldenVerdict:
    ids, lens = np.asarray(golden["ids"]), np.asarray(golden["lengths"])
    if lens.sum() != len(ids) or len(golden["top_ids"]) != len(ids):
        raise DataError("golden data is inconsistent (lengths do not add up)")
    agree, nll, start = [], [], 0
    for n in lens:
        p = ids[start:start + n]
        lg = np.asarray(logits_fn(p[None]))[0]
        agree.append(lg.argmax(-1) == golden["top_ids"][start:start + n, 0])
        nll.append(log_softmax_nll(lg[:-1], p[1:]))
        start += n
    a = float(np.concatenate(agree).mean())
    ppl = float(np.exp(np.concatenate(nll).mean()))
    ratio = ppl / float(golden["ppl"])
    return GoldenVerdict(agreement=a, ppl=ppl, ppl_ratio=ratio, ok=a >= min_agreement and ratio <= max_ppl_ratio)
