#!/usr/bin/env python3
"""llama.cpp, the peer of scripts/bench_llm.py: runs in its own venv (scripts/setup-llama.sh),
one process per measurement, and prints one JSON object. Never imported by edgepack or CI.

    /work/venvs/llama/bin/python scripts/llama_peer.py quantize SRC.gguf DST.gguf Q8_0
    /work/venvs/llama/bin/python scripts/llama_peer.py measure '{"model": ..., "ids": [...], ...}'

``quantize`` is llama.cpp's own quantizer (``llama_model_quantize``, what the ``llama-quantize``
tool calls) with ``allow_requantize``: the stored Q4_1 blocks are de-quantized and quantized
again to the named type, the same starting weights every ONNX row starts from.

``measure`` uses the token ids the benchmark gives it (the HF tokenizer's, the same ids as every
ONNX row): a greedy decode (prefill and decode tokens/s, peak RSS as VmHWM), then the perplexity
under edgepack.llm.perplexity's protocol (numpy only, importable here) with all logits kept.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FTYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
          "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
          "F16": "LLAMA_FTYPE_MOSTLY_F16"}


def hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def quantize(src: str, dst: str, kind: str, threads: int = 2) -> dict:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, FTYPES[kind])
    p.allow_requantize = True
    p.nthread = threads
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {kind} failed ({rc})")
    return {"type": kind, "seconds": round(time.perf_counter() - t, 1), "size_bytes": Path(dst).stat().st_size}


def _greedy(llm, prompt: list[int], n_new: int) -> tuple[list[int], float, float]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    toks = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
    for _ in range(n_new - 1):
        llm.eval([toks[-1]])
        toks.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    return toks, t1 - t0, time.perf_counter() - t1


def measure(spec: dict) -> dict:
    import llama_cpp

    from edgepack.llm.perplexity import PerplexityProtocol, perplexity

    base = hwm()
    threads = spec.get("threads", 2)
    ids = spec["ids"]
    prompt = ids[:spec["prompt"]]
    proto = PerplexityProtocol(**spec["protocol"]) if spec.get("protocol") else None
    ctx = proto.context if proto else 512
    llm = llama_cpp.Llama(spec["model"], n_ctx=ctx, n_batch=ctx, n_threads=threads, n_threads_batch=threads,
                          logits_all=False, verbose=False)
    runs = [_greedy(llm, prompt, spec["new"]) for _ in range(spec.get("repeats", 1))]
    decode_rss = hwm()
    del llm
    out = {"size_bytes": Path(spec["model"]).stat().st_size, "runtime_rss_bytes": base,
           "decode_peak_rss_bytes": decode_rss, "first_tokens": runs[0][0][:8],
           "prefill_tok_s": spec["prompt"] / float(np.median([r[1] for r in runs])),
           "decode_tok_s": (spec["new"] - 1) / float(np.median([r[2] for r in runs])),
           "llama_cpp_python": llama_cpp.__version__}
    if proto is not None and not spec.get("skip_ppl"):
        llm = llama_cpp.Llama(spec["model"], n_ctx=ctx, n_batch=ctx, n_threads=threads, n_threads_batch=threads,
                              logits_all=True, verbose=False)

        def logits(x):
            llm.reset()
            llm.eval([int(t) for t in x[0]])
            return np.asarray(llm.scores[:x.shape[1]], np.float32)[None]

        t = time.perf_counter()
        r = perplexity(logits, np.asarray(ids, np.int64), proto)
        out.update(ppl=r.ppl, scored_tokens=r.scored_tokens, ppl_seconds=round(time.perf_counter() - t, 1))
    out["peak_rss_bytes"] = hwm()
    return out


def main() -> int:
    if len(sys.argv) >= 5 and sys.argv[1] == "quantize":
        print(json.dumps(quantize(sys.argv[2], sys.argv[3], sys.argv[4])))
    elif len(sys.argv) == 3 and sys.argv[1] == "measure":
        spec = json.loads(Path(sys.argv[2][1:]).read_text()) if sys.argv[2].startswith("@") else json.loads(sys.argv[2])
        print(json.dumps(measure(spec)))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
