#!/usr/bin/env python3
"""W4 with ONNX Runtime's HQQ against RTN in one run (issue 15): perplexity, size, decode tok/s,
each file in its own worker process (``bench_llm.run_worker``: the same protocol, prompt and decode
as ``bench_llm.py all``). ORT's HQQ writes MatMulNBits without ``accuracy_level`` (0: FP32
compute) and with FP32 zero points; ``w4-hqq-b32-acc4-shared`` is the same file with
``accuracy_level=4`` set on every MatMulNBits, to see whether the int8-activation kernels take it.

    EDGEPACK_BENCH_TOKENS=2048 nice -n 10 python scripts/bench_llm_w4_hqq.py -o docs/bench_llm_w4_hqq.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
import bench_llm as B  # noqa: E402

ROWS = "fp32,w4-rtn-b32-shared,w4-rtn-asym-b32-shared,w4-hqq-b32-shared,w4-hqq-b32-acc4-shared"


def make(name: str) -> Path:
    import onnx

    from edgepack.llm.weightonly import quantize_weight_only

    d = B.OUT / name
    if (d / "model.onnx").is_file():
        return d / "model.onnx"
    if name.endswith("-acc4-shared"):
        src = make(name.replace("-acc4-shared", "-shared")).parent
        d.mkdir(parents=True, exist_ok=True)
        m = onnx.load(str(src / "model.onnx"))
        for n in m.graph.node:
            if n.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in n.attribute):
                n.attribute.append(onnx.helper.make_attribute("accuracy_level", 4))
        onnx.save(m, str(d / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
        for f in src.iterdir():
            if not (d / f.name).exists():
                shutil.copy(f, d / f.name)
        return d / "model.onnx"
    t = time.perf_counter()
    info = quantize_weight_only(B.OUT / "fp32" / "model.onnx", d / "model.onnx", B.weight_only_variants()[name][1])
    info["seconds"] = round(time.perf_counter() - t, 1)
    (d / "edgepack-weightonly.json").write_text(json.dumps(info, indent=1))
    return d / "model.onnx"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--rows", default=ROWS)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    ids = B.protocol_ids().tolist()
    out = {"protocol": B.PROTOCOL.to_dict(), "threads": a.threads, "prompt": 64, "new": 16, "repeats": 2, "rows": {}}
    for name in a.rows.split(","):
        path = make(name)
        r = B.run_worker({"model": str(path), "ids": ids, "prompt": 64, "new": 16, "threads": a.threads, "repeats": 2})
        out["rows"][name] = r
        B.log(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'first_tokens'})}")
        Path(a.output).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
