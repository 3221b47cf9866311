#!/usr/bin/env python3
"""Where the W8 weight-only model loses its perplexity: one group of MatMulNBits at a time is
switched to FP32 compute (``accuracy_level`` 0; the rest keep accuracy level 4, int8
activations) in a copy of ``bench_llm.py``'s ``w8-rtn-b32-shared`` file, then measured by
bench_llm's own worker on the same protocol. Diagnosis only: accuracy level 0 decodes 20-40x
slower with 8-bit blocks on x86 (docs/BENCHMARKS.md, issue 15).

    EDGEPACK_BENCH_TOKENS=16384 nice -n 10 python scripts/bench_llm_acc_groups.py -o out/llm/acc-groups.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_llm as B  # noqa: E402

GROUPS = {"down_proj": ("down_proj",), "lm_head": ("lm_head",), "attn": ("qkv_proj", "o_proj"),
          "gate_up": ("gate_proj", "up_proj")}


def main() -> int:
    import onnx

    from edgepack.llm.weightonly import save_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--model", default="out/llm/w8-rtn-b32-shared/model.onnx")
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    src = ROOT / a.model
    ids = B.protocol_ids().tolist()
    rows = {}
    for name in a.groups.split(","):
        m = onnx.load(str(src))
        nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits" and any(s in n.name for s in GROUPS[name])]
        for n in nodes:
            for at in n.attribute:
                if at.name == "accuracy_level":
                    at.i = 0
        dst = B.OUT / f"w8-acc0-{name}" / "model.onnx"
        save_model(m, dst, src.parent)
        r = B.run_worker({"model": str(dst), "ids": ids, "prompt": 64, "new": 16, "threads": a.threads, "repeats": 1})
        rows[f"W8 RTN block 32, {name} at accuracy_level 0 ({len(nodes)} MatMulNBits)"] = r
        B.log(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'first_tokens'})}")
    Path(a.output).write_text(json.dumps(B._envelope(a, {"source": a.model, "variants": rows}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
