#!/usr/bin/env python3
"""Decode speed and decode-phase peak RSS only, interleaved rounds (A B C D A B C D ...) of
edgepack's weight-only ONNX files and llama.cpp at the same bit width, so that a shared
machine's load swings hit every row alike; medians. Perplexity is not measured here (it comes
from ``bench_llm.py all``).

    EDGEPACK_BENCH_TOKENS=1024 nice -n 5 python scripts/bench_llm_speed.py -o out/llm/speed.json --rounds 2

``--onnx out/llm/A/model.onnx,out/llm/B/model.onnx`` replaces the rows by those ONNX files alone
(labelled by their folder), e.g. W8 files of different block sizes against each other; ``--gguf``
adds llama.cpp rows (labelled by file name) to them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_llm as B  # noqa: E402

ROWS = [("edgepack W4 (RTN sym block 32)", "onnx", "out/llm/w4-rtn-b32-shared/model.onnx"),
        ("llama.cpp Q4_K_M", "llama", "out/llm/llama/smollm2-135m.Q4_K_M.gguf"),
        ("genai builder INT4 k_quant_mixed", "onnx", "out/llm/genai-int4-kqm/model.onnx"),
        ("edgepack W8 (RTN block 16, the default)", "onnx", "out/llm/w8-rtn-b16-shared/model.onnx"),
        ("llama.cpp Q8_0", "llama", "out/llm/llama/smollm2-135m.Q8_0.gguf")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="decodes per worker (their median)")
    ap.add_argument("--new", type=int, default=16, help="new tokens per decode")
    ap.add_argument("--onnx", default="", help="comma-separated ONNX files: these rows instead of the default ones")
    ap.add_argument("--gguf", default="", help="comma-separated GGUF files (llama.cpp rows), with --onnx")
    a = ap.parse_args()
    rows = ([(Path(p).parent.name, "onnx", p) for p in a.onnx.split(",") if p]
            + [(Path(p).name, "llama", p) for p in a.gguf.split(",") if p]) or ROWS
    ids = B.protocol_ids().tolist()
    res = {label: [] for label, _, _ in rows}
    for _ in range(a.rounds):
        for label, kind, path in rows:
            spec = {"model": str(ROOT / path), "ids": ids, "prompt": 64, "new": a.new, "threads": a.threads, "repeats": a.repeats}
            if kind == "onnx":
                r = B.run_worker({**spec, "skip_ppl": True})
            else:
                p = subprocess.run([str(B.LLAMA_PY), str(ROOT / "scripts/llama_peer.py"), "measure", json.dumps(spec)],
                                   capture_output=True, text=True)
                r = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-300:]}
            res[label].append({k: r.get(k) for k in ("decode_tok_s", "prefill_tok_s", "decode_peak_rss_bytes", "error")})
            B.log(f"{label}: {res[label][-1]}")
            Path(a.output).write_text(json.dumps({"rows": res, "threads": a.threads, "new": a.new, "repeats": a.repeats}, indent=1))
    med = {k: {m: float(np.median([x[m] for x in v if x.get(m)])) for m in ("decode_tok_s", "prefill_tok_s", "decode_peak_rss_bytes")}
           for k, v in res.items()}
    Path(a.output).write_text(json.dumps({"rows": res, "median": med, "threads": a.threads, "new": a.new, "repeats": a.repeats}, indent=1))
    print(json.dumps(med, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
