"""Decoder LLMs on the board: token metrics for ``bench`` and the golden-prompt health check.

A bundle's model is a decoder when it takes ``input_ids``, ``attention_mask`` and
``past_key_values.N.key/value`` and returns ``logits`` and ``present.N.key/value`` (the layout
edgepack.llm.export writes). The same graph runs prefill (empty past) and decode (one token
with the cache), so the board measures what a user waits for: time to first token (the prompt's
prefill and its argmax), prefill tokens/s, and greedy decode tokens/s through the KV cache. Only
numpy and the board's runtime session are used here (no torch, no tokenizer): prompts are ids.

Golden prompts (``golden.npz`` written by the host's ``edgepack.llm.golden.make_golden``):
``ids`` (all prompts concatenated), ``lengths``, ``top_ids`` [tokens, k] (the reference model's
top-k next tokens per position; column 0 is its argmax), optional ``top_probs`` and ``ppl`` (the
reference perplexity on the same tokens). The judge (:func:`judge`) passes a model when its
next-token argmax agrees with the reference on at least ``min_token_agreement`` of all positions
and its perplexity is at most ``max_ppl_ratio`` times the reference's. Both hold on small sets:
the agreement is a fraction over a few hundred positions, the ratio is of two perplexities over
the very same tokens. The host verifies with this function (the board's code), never a copy.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .agent_errors import ModelLoadError, UsageError

GOLDEN_KEYS = ("ids", "lengths", "top_ids", "ppl")
_KV_DTYPES = {"float32": "float32", "float16": "float16"}


class GoldenDataError(UsageError):
    """LLM golden data that cannot be judged against (missing arrays, wrong shapes, bad values)."""


def is_decoder(sess: Any) -> bool:
    names = {t.name for t in sess.inputs}
    return {"input_ids", "attention_mask"} <= names and any(n.startswith("past_key_values.") for n in names)


class Decoder:
    """A KV-cache decoder over a board :class:`~device_agent.runtime.Session` (numpy feeds only)."""

    def __init__(self, sess: Any, model_path: Path | None = None, head_dim: int | None = None):
        import numpy as np
        if not is_decoder(sess):
            raise ModelLoadError("model is not a KV-cache decoder (needs input_ids, attention_mask, past_key_values.*)")
        self.sess = sess
        ins = {t.name: t for t in sess.inputs}
        self.past = sorted((n for n in ins if n.startswith("past_key_values.")),
                           key=lambda n: (int(n.split(".")[1]) if n.split(".")[1].isdigit() else 0, n))
        first = ins[self.past[0]]
        if len(first.shape) != 4:
            raise ModelLoadError(f"{first.name} has rank {len(first.shape)}; a KV cache is [batch, heads, past, head_dim]")
        self.kv_heads = first.shape[1]
        self.head_dim = first.shape[3] or head_dim or _config_head_dim(model_path)
        if not isinstance(self.kv_heads, int) or not self.head_dim:
            raise ModelLoadError("the decoder's KV-cache shape is symbolic and no genai_config.json (decoder.head_size) "
                                 "lies beside the model: bundle it as an extra")
        self.kv_dtype = np.dtype(_KV_DTYPES.get(first.dtype, "float32"))
        self.position_ids = "position_ids" in ins
        self.out_names = [t.name for t in sess.outputs]
        if "logits" not in self.out_names:
            raise ModelLoadError("the decoder has no 'logits' output")

    def empty_cache(self) -> dict[str, Any]:
        import numpy as np
        z = np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        return {n: z for n in self.past}

    def step(self, ids: Any, cache: dict[str, Any], past_len: int) -> tuple[Any, dict[str, Any]]:
        """Run ``ids`` [1, T] after ``past_len`` cached tokens: (logits [1, T, V], the new cache)."""
        import numpy as np
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        feed = {"input_ids": ids, "attention_mask": np.ones((1, past_len + ids.shape[1]), np.int64), **cache}
        if self.position_ids:
            feed["position_ids"] = np.arange(past_len, past_len + ids.shape[1], dtype=np.int64)[None]
        named = dict(zip(self.out_names, self.sess.run(feed)))
        new = {p: named[p.replace("past_key_values.", "present.", 1)] for p in self.past}
        return named["logits"], new

    def logits(self, ids: Any) -> Any:
        """Prefill logits of a whole prompt [1, T, V] (what the golden judge scores)."""
        return self.step(ids, self.empty_cache(), 0)[0]

    def vocab(self) -> int:
        """The vocabulary size, from one token's logits (the output's last dim may be symbolic)."""
        import numpy as np
        return int(self.logits(np.zeros((1, 1), np.int64)).shape[-1])


def _config_head_dim(model_path: Path | None) -> int | None:
    """``decoder.head_size`` of the builder's genai_config.json beside the model, if there is one."""
    if model_path is None:
        return None
    cfg = Path(model_path).parent / "genai_config.json"
    try:
        v = json.loads(cfg.read_text())["model"]["decoder"]["head_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 else None


# --------------------------------------------------------------------------- token metrics
@dataclass(frozen=True)
class TokenBench:
    """Medians over ``generations`` greedy runs of ``prompt_tokens`` + ``new_tokens``."""

    prompt_tokens: int
    new_tokens: int
    generations: int
    ttft_ms: float              # prefill of the prompt and its argmax: the first new token
    prefill_tok_s: float
    decode_tok_s: float         # (new_tokens - 1) single-token steps through the KV cache
    decode_step: dict[str, float]   # per-token decode latency (ms percentiles), all generations
    vocab: int
    tokens: list[int]           # the greedy tokens of the last generation (same every run)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def generate(dec: Decoder, prompt: Any, new_tokens: int) -> tuple[list[int], float, list[float]]:
    """Greedy decode: (tokens, time to first token s, per-step decode seconds)."""
    import numpy as np
    t0 = time.perf_counter()
    lg, cache = dec.step(prompt, dec.empty_cache(), 0)
    toks = [int(np.argmax(lg[0, -1]))]
    ttft = time.perf_counter() - t0
    past, steps = int(np.asarray(prompt).size), []
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        lg, cache = dec.step(np.array([[toks[-1]]], np.int64), cache, past)
        toks.append(int(np.argmax(lg[0, -1])))
        steps.append(time.perf_counter() - t)
        past += 1
    return toks, ttft, steps


def bench_decoder(dec: Decoder, prompt: Any | None, *, prompt_tokens: int = 128, new_tokens: int = 32,
                  generations: int = 3, warmup: int = 1) -> TokenBench:
    """Token metrics of ``dec``. ``prompt``: ids (a golden prompt) cut or repeated to
    ``prompt_tokens``; None: deterministic ids over the model's vocabulary."""
    import numpy as np
    from .timing import latency_stats
    if prompt_tokens < 1 or new_tokens < 2 or generations < 1:
        raise UsageError("LLM bench needs --prompt-tokens >= 1, --new-tokens >= 2 and --generations >= 1")
    vocab = dec.vocab()  # also the first, untimed run
    if prompt is None:
        prompt = np.random.default_rng(0).integers(0, vocab, prompt_tokens)
    prompt = np.resize(np.asarray(prompt, np.int64).reshape(-1), prompt_tokens)[None]
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise GoldenDataError(f"prompt ids outside the model's vocabulary of {vocab}")
    for _ in range(warmup):
        generate(dec, prompt, 2)
    ttfts, rates, steps, toks = [], [], [], []
    for _ in range(generations):
        toks, ttft, st = generate(dec, prompt, new_tokens)
        ttfts.append(ttft)
        rates.append(len(st) / sum(st))
        steps += st
    ttft = float(np.median(ttfts))
    return TokenBench(prompt_tokens=prompt_tokens, new_tokens=new_tokens, generations=generations,
                      ttft_ms=round(ttft * 1e3, 3), prefill_tok_s=round(prompt_tokens / ttft, 2),
                      decode_tok_s=round(float(np.median(rates)), 2), decode_step=latency_stats(steps),
                      vocab=vocab, tokens=toks)


# --------------------------------------------------------------------------- golden prompts
@dataclass(frozen=True)
class LLMGolden:
    ids: Any            # int64 [N], every prompt concatenated
    lengths: Any        # int64 [P]
    top_ids: Any        # int [N, k]; column 0 is the reference argmax
    ppl: float          # reference perplexity over the same next-token targets

    def prompts(self) -> list[Any]:
        import numpy as np
        cuts = np.cumsum(self.lengths)[:-1]
        return np.split(self.ids, cuts)


def is_llm_golden(path: Path) -> bool:
    """Whether ``path`` holds LLM golden prompts (``ids`` + ``top_ids``) rather than tensor goldens."""
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as z:
            return "ids" in z.files and "top_ids" in z.files
    except Exception:  # unreadable: the loader that follows names the problem
        return False


def load_llm_golden(path: Path) -> LLMGolden:
    """Read and validate ``golden.npz``; a malformed file raises :class:`GoldenDataError` (one line)."""
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in GOLDEN_KEYS if k not in z.files]
            if missing:
                raise GoldenDataError(f"LLM golden data {path.name} lacks {', '.join(missing)} "
                                      f"(has {', '.join(z.files)[:200]}); write it with edgepack.llm.golden.make_golden")
            arrays = {k: z[k] for k in GOLDEN_KEYS}
    except GoldenDataError:
        raise
    except Exception as e:  # not a zip, truncated, pickled object arrays, bad headers...
        raise GoldenDataError(f"LLM golden data {path.name} is not a readable .npz "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return golden_from_arrays(arrays, path.name)


def golden_from_arrays(a: dict[str, Any], name: str = "golden data") -> LLMGolden:
    """Validate the arrays of :func:`make_golden` (shapes, integer ids, lengths that add up)."""
    import numpy as np
    ids, lens, top, ppl = (np.asarray(a.get(k)) for k in GOLDEN_KEYS)
    bad = None
    if ids.ndim != 1 or lens.ndim != 1 or top.ndim != 2 or ppl.size != 1:
        bad = "ids and lengths must be 1-D, top_ids 2-D [tokens, k], ppl one number"
    elif not all(x.dtype.kind in "iu" for x in (ids, lens, top)):
        bad = "ids, lengths and top_ids must be integer arrays"
    elif not len(lens) or (lens < 2).any() or int(lens.sum()) != len(ids) or len(top) != len(ids) or not top.shape[1]:
        bad = "lengths (each >= 2) must add up to the number of ids and of top_ids rows"
    elif ppl.dtype.kind not in "fiu" or not math.isfinite(float(ppl.reshape(-1)[0])) or float(ppl.reshape(-1)[0]) < 1:
        bad = "ppl must be a finite number >= 1"
    elif ids.min() < 0 or top.min() < 0:
        bad = "token ids must not be negative"
    if bad:
        raise GoldenDataError(f"LLM golden data {name} is malformed: {bad}")
    return LLMGolden(ids=ids.astype(np.int64), lengths=lens.astype(np.int64), top_ids=top,
                     ppl=float(ppl.reshape(-1)[0]))


@dataclass(frozen=True)
class Verdict:
    prompts: int
    tokens: int                 # positions judged (all of every prompt)
    agreement: float            # next-token argmax agreement with the reference
    ppl: float
    reference_ppl: float
    ppl_ratio: float
    min_token_agreement: float
    max_ppl_ratio: float
    passed: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def log_softmax_nll(logits: Any, targets: Any) -> Any:
    """Per-token negative log-likelihood (float64, 32 rows at a time: bounded temporaries)."""
    import numpy as np
    out = np.empty(len(targets), np.float64)
    for s in range(0, len(targets), 32):
        lg = np.asarray(logits[s:s + 32], np.float64)
        m = lg.max(-1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(lg - m).sum(-1))
        out[s:s + 32] = lse - lg[np.arange(len(lg)), targets[s:s + 32]]
    return out


def judge(logits_fn: Callable[[Any], Any], golden: LLMGolden, *, min_token_agreement: float = 0.9,
          max_ppl_ratio: float = 1.1, vocab: int | None = None) -> Verdict:
    """Next-token agreement and perplexity ratio of ``logits_fn`` (ids [1, T] -> logits [1, T, V]).
    ``vocab``: the model's vocabulary, to refuse another model's ids before running them."""
    import numpy as np
    if vocab is not None and max(int(golden.ids.max()), int(golden.top_ids.max())) >= vocab:
        raise GoldenDataError(f"golden token ids exceed the model's vocabulary of {vocab}: another model's data")
    agree, nll = [], []
    start = 0
    for p in golden.prompts():
        lg = np.asarray(logits_fn(p[None]))
        if lg.ndim != 3 or lg.shape[1] != len(p):
            raise GoldenDataError(f"model logits have shape {lg.shape} for a {len(p)}-token prompt")
        lg = lg[0]
        if p.max() >= lg.shape[-1] or golden.top_ids[start:start + len(p)].max() >= lg.shape[-1]:
            raise GoldenDataError(f"golden token ids exceed the model's vocabulary of {lg.shape[-1]}: another model's data")
        agree.append(lg.argmax(-1) == golden.top_ids[start:start + len(p), 0])
        nll.append(log_softmax_nll(lg[:-1], p[1:]))
        start += len(p)
    a = float(np.concatenate(agree).mean())
    mean_nll = float(np.concatenate(nll).mean())
    ppl = math.exp(mean_nll) if math.isfinite(mean_nll) and mean_nll < 700 else float("inf")
    ratio = ppl / golden.ppl
    reasons = []
    if not a >= min_token_agreement:
        reasons.append(f"next-token agreement {a:.3f} < {min_token_agreement}")
    if not ratio <= max_ppl_ratio:  # NaN fails too
        reasons.append(f"perplexity {ppl:.4g} is {ratio:.3f}x the reference {golden.ppl:.4g} > {max_ppl_ratio}")
    return Verdict(prompts=len(golden.lengths), tokens=int(len(golden.ids)), agreement=round(a, 6), ppl=ppl,
                   reference_ppl=golden.ppl, ppl_ratio=ratio, min_token_agreement=min_token_agreement,
                   max_ppl_ratio=max_ppl_ratio, passed=not reasons,
                   reason="; ".join(reasons) or "golden prompts within thresholds")


__all__ = ["Decoder", "TokenBench", "LLMGolden", "Verdict", "GoldenDataError", "is_decoder", "is_llm_golden",
           "load_llm_golden", "golden_from_arrays", "generate", "bench_decoder", "judge", "log_softmax_nll"]
