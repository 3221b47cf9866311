"""Golden prompts for a board's health check of an LLM bundle.

The host records, for a few fixed prompts, the reference model's next-token distribution at
every position (top-k ids and probabilities, float32) and its perplexity on the prompts. The
board judges an installed model by next-token agreement with the reference argmax and by the
perplexity ratio, in its own code (``device_agent.llm.judge``): :func:`judge` and
:func:`judge_on_board_code` here call it, so the host's verdict is the board's. Both thresholds hold on small sets: agreement is a fraction over all
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
    """The board's own judge (device_agent.llm.judge) on ``golden``: the host verifies a model
    with the code the board's health check runs, so the two cannot drift apart."""
    from device_agent.agent_errors import UsageError
    from device_agent.llm import golden_from_arrays
    from device_agent.llm import judge as board_judge
    try:
        v = board_judge(logits_fn, golden_from_arrays(golden), min_token_agreement=min_agreement,
                        max_ppl_ratio=max_ppl_ratio)
    except UsageError as e:
        raise DataError(str(e)) from None
    return GoldenVerdict(agreement=v.agreement, ppl=v.ppl, ppl_ratio=v.ppl_ratio, ok=v.passed)


def judge_on_board_code(onnx_path, golden: dict, *, threads: int = 1, min_agreement: float = 0.9,
                        max_ppl_ratio: float = 1.1) -> GoldenVerdict:
    """``onnx_path`` loaded and run exactly as the board's health check runs it (the agent's
    runtime adapter and KV-cache decoder), judged by the board's judge."""
    from device_agent.llm import Decoder
    from device_agent.runtime import load_model
    dec = Decoder(load_model(onnx_path, "onnxruntime", threads=threads), onnx_path)
    return judge(dec.logits, golden, min_agreement, max_ppl_ratio)
