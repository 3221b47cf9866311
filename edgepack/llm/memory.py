"""Memory model of a decoder on a board: weights + KV cache + activations + runtime.

- weights: the bytes of the model file (what is mapped or loaded; MatMulNBits keeps its packed
  blocks, so the file size is the resident weight size);
- KV cache: ``2 (K and V) x layers x kv_heads x head_dim x context x bytes per element``;
- activations of a prefill of ``prefill`` tokens: the residual stream and its normed copy, the
  q/k/v and attention output, the MLP's gate, up and product, the attention scores of one layer
  (heads x prefill x context, float32) and the logits (prefill x vocab, float32); one layer's
  buffers are live at a time;
- runtime: the process before the model (interpreter, ONNX Runtime), measured, not modelled.

:func:`fits` says which context lengths fit a board's model RAM budget.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    activations: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def kv_cache_bytes(config, context: int, kv_bytes: int = 2, batch: int = 1) -> int:
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * hd * context * kv_bytes * batch


def activation_bytes(config, prefill: int, context: int, act_bytes: int = 4) -> int:
    h, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    hd = getattr(config, "head_dim", None) or h // heads
    kv = config.num_key_value_heads * hd
    per_tok = (3 * h + h + 2 * kv + 3 * inter) * act_bytes
    scores = heads * prefill * context * 4
    logits = prefill * config.vocab_size * 4
    return prefill * per_tok + scores + logits


def estimate(config, weight_bytes: int, context: int, prefill: int | None = None, kv_bytes: int = 2,
             runtime_bytes: int = 0) -> MemoryEstimate:
    prefill = context if prefill is None else prefill
    return MemoryEstimate(weights=int(weight_bytes), kv_cache=kv_cache_bytes(config, context, kv_bytes),
                          activations=activation_bytes(config, prefill, context), runtime=int(runtime_bytes))


def fits(config, weight_bytes: int, budget_bytes: int, contexts=(512, 2048, 8192, 32768), kv_bytes: int = 2,
         runtime_bytes: int = 0, prefill_chunk: int = 512) -> dict:
    """context -> (estimated bytes, fits the budget), prefilling in chunks of ``prefill_chunk``."""
    out = {}
    for c in contexts:
        e = estimate(config, weight_bytes, c, prefill=min(c, prefill_chunk), kv_bytes=kv_bytes,
                     runtime_bytes=runtime_bytes)
        out[c] = {"bytes": e.total, "fits": e.total <= budget_bytes, **e.to_dict()}
    return out
