"""On-device benchmark (``bench``) and evaluation (``eval``) of the active model (or any model file).

Latency is measured the way runtimes' own benchmark tools do it: one session, a fixed input
already in memory, ``warmup`` untimed runs, then ``runs`` timed runs of ``session.run`` alone
(perf_counter around the call; no input conversion inside the timed region). Percentiles are
nearest-rank (MLPerf style); use >= 100 runs for a meaningful p99.

Memory: RSS is read from /proc before the runtime is imported, after the import, and after the
model is loaded; the model's share is the last step. Peak RSS is the process high-water mark.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .health import Comparison, compare, latency_stats, load_golden, smoke_feed
from .budgets import peak_rss_mb, rss_mb
from .runtime import choose_runtime, load_model


@dataclass
class BenchReport:
    model: str
    model_bytes: int
    runtime: str
    runtime_version: str
    provider: str
    providers: list[str]
    threads: int
    load_ms: float
    first_inference_ms: float
    warmup: int
    latency: dict[str, float]
    rss_agent_mb: float
    rss_runtime_mb: float
    rss_model_mb: float
    peak_rss_mb: float
    input: str
    llm: dict[str, Any] | None = None   # a decoder's token metrics (device_agent.llm.TokenBench)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["llm"] is None:
            del d["llm"]
        return d


@dataclass(frozen=True)
class TokenOptions:
    """What ``bench`` runs on a KV-cache decoder: ``generations`` greedy runs of ``new_tokens``
    after a ``prompt_tokens`` prompt (a golden prompt cut or repeated to that length)."""

    prompt_tokens: int = 128
    new_tokens: int = 32
    generations: int = 3


def bench_model(model: str | Path, runtime: str, *, threads: int = 0, accelerator: str | None = None,
                runs: int = 100, warmup: int = 10, golden: Path | None = None,
                tokens: TokenOptions = TokenOptions()) -> BenchReport:
    """Latency of ``runs`` inferences; for a KV-cache decoder, token metrics instead
    (:func:`bench_decoder`: ``latency`` is then the per-token decode step)."""
    model = Path(model)
    rss_agent = rss_mb()
    import importlib
    importlib.import_module({"onnxruntime": "onnxruntime", "litert": "ai_edge_litert.interpreter",
                             "openvino": "openvino"}.get(runtime, runtime))
    rss_rt = rss_mb()
    sess = load_model(model, runtime, threads=threads, accelerator=accelerator)
    rss_loaded = rss_mb()
    from .llm import is_decoder
    if is_decoder(sess):
        return bench_decoder(model, sess, golden, tokens, warmup=min(warmup, 1),
                             rss=(rss_agent, rss_rt, rss_loaded))
    feed, what = None, "synthetic (no golden data)"
    if golden is not None:
        g = load_golden(golden, sess)
        if g.feeds:
            feed, what = g.feeds[0], f"golden sample 0 of {golden.name}"
    if feed is None:
        feed = smoke_feed(sess)
    t0 = time.perf_counter()
    sess.run(feed)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        sess.run(feed)
    times = []
    run = sess.run
    for _ in range(runs):
        t = time.perf_counter()
        run(feed)
        times.append(time.perf_counter() - t)
    return BenchReport(model=model.name, model_bytes=model.stat().st_size, runtime=sess.runtime,
                       runtime_version=sess.runtime_version, provider=sess.provider, providers=sess.providers,
                       threads=sess.threads, load_ms=sess.load_seconds * 1e3, first_inference_ms=first * 1e3,
                       warmup=warmup, latency=latency_stats(times), rss_agent_mb=round(rss_agent, 2),
                       rss_runtime_mb=round(rss_rt - rss_agent, 2), rss_model_mb=round(rss_loaded - rss_rt, 2),
                       peak_rss_mb=round(peak_rss_mb(), 2), input=what)


def bench_decoder(model: Path, sess: Any, golden: Path | None, opts: TokenOptions, *, warmup: int,
                  rss: tuple[float, float, float]) -> BenchReport:
    """Token metrics of a decoder: TTFT, prefill and decode tokens/s, peak RSS (the process's
    high-water mark after the KV cache has grown to prompt + new tokens)."""
    from .llm import Decoder, bench_decoder as run, load_llm_golden
    dec = Decoder(sess, model)
    prompt, what = None, f"synthetic ids ({opts.prompt_tokens} tokens, no golden prompts)"
    if golden is not None:
        prompt = load_llm_golden(golden).prompts()[0]
        what = f"golden prompt 0 of {golden.name} ({len(prompt)} ids) to {opts.prompt_tokens} tokens"
    tb = run(dec, prompt, prompt_tokens=opts.prompt_tokens, new_tokens=opts.new_tokens,
             generations=opts.generations, warmup=warmup)
    a, r, loaded = rss
    return BenchReport(model=model.name, model_bytes=_model_bytes(model), runtime=sess.runtime,
                       runtime_version=sess.runtime_version, provider=sess.provider, providers=sess.providers,
                       threads=sess.threads, load_ms=sess.load_seconds * 1e3, first_inference_ms=tb.ttft_ms,
                       warmup=warmup, latency=tb.decode_step, rss_agent_mb=round(a, 2),
                       rss_runtime_mb=round(r - a, 2), rss_model_mb=round(loaded - r, 2),
                       peak_rss_mb=round(peak_rss_mb(), 2), input=what, llm=tb.to_json())


def _model_bytes(model: Path) -> int:
    """The model file and its external data (``model.onnx.data`` beside it)."""
    return sum(f.stat().st_size for f in model.parent.iterdir()
               if f.is_file() and (f.name == model.name or f.name.startswith(model.name + ".")))


@dataclass
class EvalReport:
    model: str
    release: int | None
    runtime: str
    provider: str
    data: str
    comparison: Comparison
    notes: list[str] = field(default_factory=list)
    top1: list[int] | None = None  # each sample's top-1 class (``eval --per-sample``)
    llm: dict[str, Any] | None = None  # a decoder's golden-prompt verdict (device_agent.llm.Verdict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["comparison"] = self.comparison.to_json()
        for k in ("top1", "llm"):
            if d[k] is None:
                del d[k]
        return d


def eval_model(model: str | Path, runtime: str, data: Path, *, threads: int = 0, accelerator: str | None = None,
               release: int | None = None, per_sample: bool = False) -> EvalReport:
    """Top-1 accuracy (if ``labels``), top-1 agreement and drift against the reference outputs;
    with ``per_sample`` also each sample's top-1 class (the board's own predictions, e.g. to
    confirm a quantized model's accuracy in the board's arithmetic)."""
    sess = load_model(model, runtime, threads=threads, accelerator=accelerator)
    from .llm import is_decoder
    if is_decoder(sess):
        return eval_decoder(model, sess, data, release)
    g = load_golden(data, sess)
    outs = [sess.run(f) for f in g.feeds]
    c = compare(outs, g)
    notes = []
    if g.labels is None:
        notes.append("no labels in the data: accuracy not computed")
    if g.refs is None:
        notes.append("no reference outputs in the data: agreement/drift not computed")
    top1 = None
    if per_sample:
        import numpy as np
        top1 = [int(np.asarray(o[0], np.float64).reshape(-1).argmax()) for o in outs]
    return EvalReport(model=Path(model).name, release=release, runtime=sess.runtime, provider=sess.provider,
                      data=data.name, comparison=c, notes=notes, top1=top1)


def eval_decoder(model: str | Path, sess: Any, data: Path, release: int | None) -> EvalReport:
    """A decoder's golden prompts judged at the board's floors (device_agent.llm.judge)."""
    from .llm import Decoder, judge, load_llm_golden
    golden = load_llm_golden(data)
    dec = Decoder(sess, Path(model))
    v = judge(dec.logits, golden, vocab=dec.vocab())
    return EvalReport(model=Path(model).name, release=release, runtime=sess.runtime, provider=sess.provider,
                      data=data.name, comparison=Comparison(samples=v.tokens, top1_agreement=v.agreement),
                      notes=["top1_agreement is next-token argmax agreement over every golden position"],
                      llm=v.to_json())


__all__ = ["TokenOptions", "bench_decoder", "eval_decoder", "BenchReport", "EvalReport", "bench_model", "eval_model", "choose_runtime"]
