"""The one perplexity protocol every variant and every peer is measured with.

Fixed here and nowhere else: the corpus, how it is tokenized, the window (context) length, the
stride between windows and the number of tokens. Each window is scored independently (no state
carried across windows, as a board with a bounded context would run it); with ``stride <
context`` only the last ``stride`` tokens of a window are scored, so every token is scored once
and with at least ``context - stride`` tokens of left context; with ``stride == context`` (the
default) the first token of each window has no context and is not scored. Changing any field changes the
protocol's ``id``, which every report carries, so figures from different protocols are never
put side by side.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import DataError


@dataclass(frozen=True, kw_only=True)
class PerplexityProtocol:
    corpus: str = "lee_background"   # edgepack.llm.assets.text name (gensim's ABC-news corpus)
    context: int = 512               # tokens per window
    stride: int = 512                # window start step; == context: non-overlapping windows
    tokens: int = 2048               # tokens taken from the start of the corpus (4 windows)
    join: str = "\n"                 # the corpus lines joined with this before tokenizing
    add_bos: bool = False            # SmolLM2's tokenizer adds no BOS; kept explicit

    def __post_init__(self):
        if not (0 < self.stride <= self.context):
            raise DataError(f"perplexity stride {self.stride} must be in 1..context ({self.context})")
        if self.tokens < self.context:
            raise DataError(f"perplexity token count {self.tokens} is below one window ({self.context})")

    @property
    def id(self) -> str:
        return f"{self.corpus}:ctx{self.context}:stride{self.stride}:tok{self.tokens}"

    def to_dict(self) -> dict:
        return {**asdict(self), "id": self.id}


# The protocol of every figure in docs/BENCHMARKS.md. The token count is modest on purpose: a
# 512-token window of the 135M model takes 10-30 s on the 2 shared cores this was measured on.
PROTOCOL = PerplexityProtocol()


def tokenize_corpus(tokenizer, text: str, protocol: PerplexityProtocol = PROTOCOL) -> np.ndarray:
    """The first ``protocol.tokens`` token ids of the corpus (refuses a corpus that is too short)."""
    joined = protocol.join.join(line.rstrip() for line in text.splitlines() if line.strip())
    ids = tokenizer(joined, add_special_tokens=protocol.add_bos)["input_ids"]
    ids = np.asarray(ids, np.int64).reshape(-1)
    if len(ids) < protocol.tokens:
        raise DataError(f"corpus {protocol.corpus!r} has {len(ids)} tokens, the protocol needs {protocol.tokens}")
    return ids[:protocol.tokens]


def windows(n_tokens: int, protocol: PerplexityProtocol = PROTOCOL) -> list[tuple[int, int, int]]:
    """(start, end, first scored position within the window) for each window."""
    out, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + protocol.context, n_tokens)
        first = max(1, prev_end - begin)   # skip tokens an earlier window already scored
        out.append((begin, end, first))
        prev_end = end
        if end >= n_tokens:
            return out
        begin += protocol.stride


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float
    scored_tokens: int
    windows: int
    protocol: str

    def to_dict(self) -> dict:
        return asdict(self)


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-token negative log-likelihood of ``targets`` under ``logits`` [T, V] (float64, in row
    chunks: a 512 x 49k window in float64 at once would be 600 MB of temporaries, which would
    dominate the peak memory the benchmark measures)."""
    out = np.empty(len(targets), np.float64)
    for s in range(0, len(targets), 32):
        lg = logits[s:s + 32].astype(np.float64)
        m = lg.max(-1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(lg - m).sum(-1))
        out[s:s + 32] = lse - lg[np.arange(len(lg)), targets[s:s + 32]]
    return out


def perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], ids: Sequence[int],
               protocol: PerplexityProtocol = PROTOCOL) -> PerplexityResult:
    """Perplexity of ``logits_fn`` (ids [1, T] int64 -> logits [1, T, V]) under the protocol.

    ``ids`` are the protocol's tokens (:func:`tokenize_corpus`); any model, ONNX session, fake
    quantized PyTorch module or peer runtime plugs in through ``logits_fn``.
    """
    ids = np.asarray(ids, np.int64)
    if len(ids) != protocol.tokens:
        raise DataError(f"expected {protocol.tokens} token ids for protocol {protocol.id}, got {len(ids)}")
    total, count, ws = 0.0, 0, windows(len(ids), protocol)
    for begin, end, first in ws:
        x = ids[begin:end][None]
        lg = np.asarray(logits_fn(x))
        if lg.ndim != 3 or lg.shape[:2] != x.shape:
            raise DataError(f"logits have shape {lg.shape}, expected (1, {x.shape[1]}, vocab)")
        nll = log_softmax_nll(lg[0, first - 1:-1], x[0, first:])
        if not np.all(np.isfinite(nll)):
            raise DataError("the model produced non-finite logits")
        total += float(nll.sum())
        count += len(nll)
    mean = total / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, scored_tokens=count, windows=len(ws),
                            protocol=protocol.id)
