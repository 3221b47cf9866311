#!/usr/bin/env python3
"""W8 weight-only with the body in blocks of 16 except ``down_proj`` in blocks of 32 (head 32,
the embeddings sharing its INT8 blocks), built from ``bench_llm.py``'s FP32 file with
edgepack.llm.weightonly's own steps and measured by bench_llm's worker on the same protocol.
Experiment only: it measured no faster than blocks of 16 throughout, so edgepack does not ship
it (docs/BENCHMARKS.md, issue 15, "W8: the block size sets the int8 activations' blocks").

    EDGEPACK_BENCH_TOKENS=16384 nice -n 10 python scripts/bench_llm_w8_mixed_blocks.py -o out/llm/w8-mixed-blocks.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_llm as B  # noqa: E402


def build(src: Path, dst: Path, body: int = 16, coarse: tuple = ("down_proj",), coarse_block: int = 32) -> dict:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as m

    from edgepack.llm import weightonly as W

    model = onnx.load(str(src))
    assert W.untie_embeddings(model)
    names = [n.name for n in model.graph.node if n.op_type == "MatMul" and any(c in n.name for c in coarse)]

    def cfg(b):
        return m.DefaultWeightOnlyQuantConfig(block_size=b, is_symmetric=True, accuracy_level=4, bits=8,
                                              op_types_to_quantize=("MatMul",))
    model = W._quantize(model, cfg(body), nodes_to_exclude=[W.LM_HEAD] + names)
    model = W._quantize(model, cfg(coarse_block), nodes_to_include=names)
    model = W._quantize(model, cfg(32), nodes_to_include=[W.LM_HEAD])
    embed = W.share_head_with_embedding(model)
    W.save_model(model, dst, src.parent)
    return {"body_block": body, "coarse": list(coarse), "coarse_block": coarse_block, "coarse_matmuls": len(names),
            "embedding": embed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    src, dst = B.OUT / "fp32" / "model.onnx", B.OUT / "w8-exp-b16-down32" / "model.onnx"
    info = build(src, dst) if not dst.is_file() else {"kept": str(dst)}
    r = B.run_worker({"model": str(dst), "ids": B.protocol_ids().tolist(), "prompt": 64, "new": 16,
                      "threads": a.threads, "repeats": 2})
    out = {"protocol": B.PROTOCOL.to_dict(), "source": str(src.relative_to(ROOT)), "build": info,
           "variants": {"W8 RTN body block 16, down_proj block 32, head 32 (shared)": r}}
    Path(a.output).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["variants"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
