"""Golden-input health check: does the model, as loaded on *this* board, still compute what it should?

The bundle may carry ``golden.npz`` (role ``golden``) with

* ``inputs`` (single-input model) or ``inputs_<name>`` / ``input_<name>`` per model input,
* ``outputs`` or ``outputs_<name>``: reference outputs (normally the FP32 model's),
* ``labels`` (optional): ground-truth class ids, for top-1 accuracy in ``eval``.

Axis 0 enumerates samples. A sample is ``a[i]`` when the array has one more axis than the model
input, else ``a[i:i+1]`` (a batch of one). Each sample is run on its own, as the board will.

Thresholds (defaults are deliberately tolerant of INT8 vs FP32 reference drift, strict about a
wrong model): top-1 agreement >= 0.95, mean cosine >= 0.98 and every sample's cosine >= 0.90;
max abs error is reported and enforced only if set. The bundle's ``settings.json`` may override
them under ``"health": {"min_top1_agreement", "min_cosine", "min_cosine_sample", "max_abs_error"}``;
the latency budget (p90 of the trial runs) comes from board.json ``latency_budget_ms``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .agent_errors import UsageError
from .runtime import Session
from .timing import latency_stats, percentile


@dataclass(frozen=True)
class Thresholds:
    min_top1_agreement: float = 0.95
    min_cosine: float = 0.98
    min_cosine_sample: float = 0.90
    max_abs_error: float | None = None
    latency_budget_ms: float | None = None
    min_token_agreement: float = 0.9    # LLM golden prompts: next-token argmax agreement
    max_ppl_ratio: float = 1.1          # LLM golden prompts: perplexity / reference perplexity

    @classmethod
    def from_settings(cls, settings: dict[str, Any], latency_budget_ms: float | None,
                      floors: dict[str, float] | None = None) -> "Thresholds":
        """The bundle's thresholds, bounded by the board's floors: a bundle can only tighten them.

        ``floors`` (board.json ``health_floors``) are the loosest values the board accepts; without
        one, the default threshold is the floor. A threshold that is not a finite number (NaN
        compares false with everything, so it would pass every check) is refused."""
        h = settings.get("health", {})
        if not isinstance(h, dict):
            raise UsageError("settings 'health' must be an object of thresholds")
        base = cls()
        fl = {k: float(v) for k, v in (floors or {}).items() if k in _MIN_KEYS or k in _MAX_KEYS}
        kw: dict[str, float | None] = {}
        for k, v in h.items():
            if k not in _MIN_KEYS and k not in _MAX_KEYS:
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise UsageError(f"health threshold {k} = {str(v)[:40]} is not a finite number")
            kw[k] = float(v)
        for k in _MIN_KEYS:
            floor = fl.get(k, getattr(base, k))
            kw[k] = max(floor, kw.get(k, floor))  # the bundle may demand more, never less
        for k in _MAX_KEYS:   # a ceiling: the bundle may demand less, never more (None: no ceiling)
            cap, v = fl.get(k, getattr(base, k)), kw.get(k)
            kw[k] = cap if v is None else (v if cap is None else min(v, cap))
        return cls(latency_budget_ms=latency_budget_ms, **kw)


_MIN_KEYS = ("min_top1_agreement", "min_cosine", "min_cosine_sample", "min_token_agreement")
_MAX_KEYS = ("max_abs_error", "max_ppl_ratio")


@dataclass
class Golden:
    """Per-sample feeds, references and labels extracted from a golden .npz."""

    feeds: list[dict[str, Any]]
    refs: list[list[Any]] | None
    labels: list[int] | None


def _pick(npz: Any, prefixes: tuple[str, ...], names: list[str]) -> list[Any] | None:
    keys = list(npz.keys())
    out = []
    for i, n in enumerate(names):
        k = next((p + "_" + n for p in prefixes if p + "_" + n in keys), None)
        if k is None and i == 0:
            k = next((p for p in prefixes if p in keys), None)
        if k is None and len(names) == 1:
            cands = [x for x in keys if x.startswith(prefixes)]
            k = cands[0] if len(cands) == 1 else None
        if k is None:
            return None
        out.append(npz[k])
    return out


def load_golden(path: Path, sess: Session) -> Golden:
    import numpy as np
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"golden data {path.name} is not a readable .npz ({e})") from None
    with npz:
        ins = _pick(npz, ("inputs", "input"), [t.name for t in sess.inputs])
        if ins is None:
            raise UsageError(f"golden data {path.name} has no inputs for model inputs "
                             f"{[t.name for t in sess.inputs]} (keys: {list(npz.keys())})")
        refs = _pick(npz, ("outputs", "output"), [t.name for t in sess.outputs])
        if refs is None:
            refs = _pick(npz, ("outputs", "output"), [sess.outputs[0].name])
        labels = npz["labels"] if "labels" in npz.keys() else None
        n = len(ins[0])
        per_sample = [a.ndim == len(t.shape) + 1 for a, t in zip(ins, sess.inputs)]

        def sl(a: Any, i: int, ps: bool) -> Any:
            return a[i] if ps else a[i:i + 1]

        feeds = []
        for i in range(n):
            feeds.append({t.name: np.ascontiguousarray(sl(a, i, ps)).astype(t.dtype if t.dtype in
                          ("float32", "float16", "int8", "uint8", "int32", "int64") else a.dtype, copy=False)
                          for a, t, ps in zip(ins, sess.inputs, per_sample)})
        ps0 = per_sample[0]
        ref_s = [[sl(r, i, ps0) for r in refs] for i in range(n)] if refs is not None else None
        lab = [int(x) for x in np.asarray(labels).reshape(-1)[:n]] if labels is not None else None
    return Golden(feeds=feeds, refs=ref_s, labels=lab)


@dataclass
class Comparison:
    samples: int
    top1_agreement: float | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    accuracy: float | None = None
    reference_accuracy: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compare(outputs: list[list[Any]], golden: Golden) -> Comparison:
    """Top-1 agreement, cosine and abs error of ``outputs`` against the golden references."""
    import numpy as np
    n = len(outputs)
    c = Comparison(samples=n)
    top = [int(np.asarray(o[0], np.float64).reshape(-1).argmax()) for o in outputs]
    if golden.refs is not None:
        agree, coss, maxe, meane = 0, [], 0.0, []
        rtop = []
        for o, r in zip(outputs, golden.refs):
            a = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in o[:len(r)]])
            b = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in r])
            if a.shape != b.shape:
                raise UsageError(f"model output has {a.size} values, golden reference {b.size}: wrong golden data")
            t_o = int(np.asarray(o[0], np.float64).reshape(-1).argmax())
            t_r = int(np.asarray(r[0], np.float64).reshape(-1).argmax())
            rtop.append(t_r)
            agree += t_o == t_r
            na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
            coss.append(float(a @ b / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0))
            if not np.all(np.isfinite(a)):
                coss[-1] = -1.0
                maxe = float("inf")
            else:
                maxe = max(maxe, float(np.max(np.abs(a - b))) if a.size else 0.0)
            meane.append(float(np.mean(np.abs(a - b))) if a.size else 0.0)
        c.top1_agreement = agree / n if n else None
        c.cosine_mean = sum(coss) / n if n else None
        c.cosine_min = min(coss) if coss else None
        c.max_abs_error = maxe
        c.mean_abs_error = sum(meane) / n if n else None
        if golden.labels is not None:
            c.reference_accuracy = sum(int(a == b) for a, b in zip(rtop, golden.labels)) / n if n else None
    if golden.labels is not None and n:
        c.accuracy = sum(int(a == b) for a, b in zip(top, golden.labels)) / n
    return c


@dataclass
class HealthReport:
    passed: bool
    reason: str
    comparison: Comparison | None
    latency: dict[str, float] = field(default_factory=dict)
    thresholds: Thresholds | None = None
    llm: dict[str, Any] | None = None   # a decoder's golden-prompt verdict (device_agent.llm.Verdict)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason,
                "comparison": self.comparison.to_json() if self.comparison else None,
                "latency": self.latency, "thresholds": asdict(self.thresholds) if self.thresholds else None,
                **({"llm": self.llm} if self.llm is not None else {})}


def smoke_feed(sess: Session) -> dict[str, Any]:
    """A deterministic input for a model without golden data (dynamic dims become 1)."""
    import numpy as np
    rng = np.random.default_rng(0)
    feeds = {}
    for t in sess.inputs:
        shape = tuple(d or 1 for d in t.shape)
        dt = np.dtype(t.dtype) if t.dtype in ("float32", "float16", "int8", "uint8", "int32", "int64") else np.float32
        feeds[t.name] = (rng.standard_normal(shape).astype(dt) if dt.kind == "f"
                         else np.zeros(shape, dt))
    return feeds


def check(sess: Session, golden_path: Path | None, th: Thresholds, runs: int = 10) -> HealthReport:
    """Run the goldens (or a smoke input), compare, time ``runs`` inferences; never raises on a bad model."""
    import numpy as np
    from .llm import is_decoder
    if is_decoder(sess):
        return check_decoder(sess, golden_path, th, runs)
    try:
        if golden_path is not None:
            g = load_golden(golden_path, sess)
            feeds = g.feeds
        else:
            g, feeds = None, [smoke_feed(sess)]
        outs = [sess.run(f) for f in feeds]
        times = []
        for i in range(max(runs, 1)):
            t0 = time.perf_counter()
            sess.run(feeds[i % len(feeds)])
            times.append(time.perf_counter() - t0)
    except UsageError:
        raise
    except Exception as e:  # a runtime error on inference is a failed trial, with its reason
        return HealthReport(False, f"inference failed: {type(e).__name__}: {str(e)[:200]}", None, thresholds=th)
    lat = latency_stats(times)
    if g is None:
        ok = all(np.all(np.isfinite(np.asarray(o, np.float64))) for o in outs[0])
        return HealthReport(ok, "no golden data in bundle: load + smoke inference only" if ok
                            else "smoke inference produced non-finite outputs", None, lat, th)
    c = compare(outs, g)
    reasons = []
    if c.top1_agreement is not None and c.top1_agreement < th.min_top1_agreement:
        reasons.append(f"top-1 agreement {c.top1_agreement:.3f} < {th.min_top1_agreement}")
    if c.cosine_mean is not None and c.cosine_mean < th.min_cosine:
        reasons.append(f"mean cosine {c.cosine_mean:.4f} < {th.min_cosine}")
    if c.cosine_min is not None and c.cosine_min < th.min_cosine_sample:
        reasons.append(f"worst-sample cosine {c.cosine_min:.4f} < {th.min_cosine_sample}")
    if th.max_abs_error is not None and c.max_abs_error is not None and c.max_abs_error > th.max_abs_error:
        reasons.append(f"max abs error {c.max_abs_error:.4g} > {th.max_abs_error}")
    if th.latency_budget_ms is not None and lat["p90_ms"] > th.latency_budget_ms:
        reasons.append(f"p90 latency {lat['p90_ms']:.2f} ms > budget {th.latency_budget_ms} ms")
    if g.refs is None:
        reasons.append("golden data has inputs but no reference outputs")
    return HealthReport(not reasons, "; ".join(reasons) or "golden outputs and latency within thresholds", c, lat, th)


def check_decoder(sess: Session, golden_path: Path | None, th: Thresholds, runs: int = 10) -> HealthReport:
    """An LLM's health check: the golden prompts judged by next-token agreement and perplexity
    ratio (device_agent.llm.judge), then ``runs`` single-token decode steps through the KV cache
    timed (the latency budget is per generated token). Malformed golden data raises
    GoldenDataError (the trial reports it); a model that fails to run fails the check."""
    import numpy as np
    from .llm import Decoder, generate, judge, load_llm_golden
    dec = Decoder(sess, getattr(sess, "path", None))
    golden = None
    if golden_path is not None:
        golden = load_llm_golden(golden_path)
    try:
        vocab = dec.vocab()
        v = judge(dec.logits, golden, min_token_agreement=th.min_token_agreement, max_ppl_ratio=th.max_ppl_ratio,
                  vocab=vocab) if golden is not None else None
        prompt = golden.prompts()[0] if golden is not None else np.zeros(8, np.int64)
        toks, _, steps = generate(dec, prompt, max(runs, 1) + 1)
    except UsageError:
        raise
    except Exception as e:  # a runtime error on inference is a failed trial, with its reason
        return HealthReport(False, f"inference failed: {type(e).__name__}: {str(e)[:200]}", None, thresholds=th)
    lat = latency_stats(steps)
    reasons = [] if v is None or v.passed else [v.reason]
    if th.latency_budget_ms is not None and lat["p90_ms"] > th.latency_budget_ms:
        reasons.append(f"p90 decode latency {lat['p90_ms']:.2f} ms/token > budget {th.latency_budget_ms} ms")
    if v is None:
        ok = not reasons
        return HealthReport(ok, "no golden prompts in bundle: load + decode smoke run only" if ok else reasons[0],
                            None, lat, th)
    c = Comparison(samples=v.tokens, top1_agreement=v.agreement)
    return HealthReport(not reasons, "; ".join(reasons) or "golden prompts and decode latency within thresholds",
                        c, lat, th, llm=v.to_json())


__all__ = ["Thresholds", "HealthReport", "Comparison", "Golden", "load_golden", "compare", "check", "check_decoder",
           "latency_stats", "percentile", "smoke_feed"]
