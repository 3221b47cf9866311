#!/usr/bin/env python3
"""Where a decode token's time goes: ONNX Runtime's profiler (``SessionOptions.enable_profiling``)
on a greedy decode of edgepack's weight-only files, the node times summed per class
(body MatMulNBits, lm_head MatMulNBits, the dequantizing embedding Gather, GroupQueryAttention,
norms, the rest), per decode token, plus the time outside the nodes (ORT's run overhead) and
outside ``InferenceSession.run`` (the Python loop: feeds, KV dict, logits copy, argmax).

    nice -n 10 python scripts/bench_llm_profile.py -o docs/bench_llm_decode_profile.json --threads 1

The decode is ``OnnxLM.greedy``'s (``bench_llm.py``/``bench_llm_speed.py``'s runtime: plain ONNX
Runtime, numpy KV cache), same 64-token protocol prompt. Per file: an unprofiled session first
(decode tok/s without the profiler's cost, median of ``--repeats``), then a profiled one whose
first greedy is a warm-up; only the last greedy's decode runs are counted. Files run in
interleaved rounds (A B C A B C) so a shared machine's load swings hit each alike; medians.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
import bench_llm as B  # noqa: E402

FILES = "out/llm/w8-rtn-b16-shared/model.onnx,out/llm/w8-rtn-b32-shared/model.onnx,out/llm/w4-rtn-b32-shared/model.onnx"
CLASSES = ("matmul body (MatMulNBits; FP32 MatMul)", "matmul lm_head", "embedding Gather (dequantizing)", "GroupQueryAttention",
           "norms (Skip)SimplifiedLayerNormalization", "SiLU (Sigmoid, Mul)", "other nodes")


def node_class(name: str, op: str) -> str:
    if op in ("MatMulNBits", "MatMul"):
        return CLASSES[1] if "lm_head" in name else CLASSES[0]
    if "embed_tokens" in name:
        return CLASSES[2]
    if op == "GroupQueryAttention":
        return CLASSES[3]
    if "LayerNormalization" in op:
        return CLASSES[4]
    if op in ("Sigmoid", "Mul") and "/mlp/" in name:
        return CLASSES[5]
    return CLASSES[6]


def weight_bytes(path: str) -> dict:
    """Bytes of the initializers each matmul class reads per token (quantized blocks, scales,
    zero points; FP32 weights), from the graph, without loading the weights."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    size = {i.name: int(np.prod(i.dims)) * onnx.helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
            for i in m.graph.initializer}
    out = {"body": 0, "lm_head": 0}
    for n in m.graph.node:
        if n.op_type in ("MatMulNBits", "MatMul"):
            out["lm_head" if "lm_head" in n.name else "body"] += sum(size.get(x, 0) for x in n.input[1:])
    return out


def decode_timed(lm, prompt: np.ndarray, n_new: int) -> tuple[float, float]:
    """OnnxLM.greedy's loop with the time inside ``sess.run`` split out: (decode s, run s)."""
    lg, cache = lm.step(prompt, lm.empty_cache(), 0)
    toks, past, t_run = [int(lg[0, -1].argmax())], prompt.shape[1], 0.0
    run = lm.sess.run

    def timed(*a, **k):
        nonlocal t_run
        t = time.perf_counter()
        r = run(*a, **k)
        t_run += time.perf_counter() - t
        return r

    lm.sess.run = timed
    t0 = time.perf_counter()
    for _ in range(n_new - 1):
        lg, cache = lm.step(np.array([[toks[-1]]], np.int64), cache, past)
        past += 1
        toks.append(int(lg[0, -1].argmax()))
    dt = time.perf_counter() - t0
    lm.sess.run = run
    return dt, t_run


def profile_once(path: str, ids: np.ndarray, a) -> dict:
    import onnxruntime as ort

    from edgepack.llm.export import OnnxLM

    prompt = ids[None, :a.prompt]
    lm = OnnxLM(path, threads=a.threads)
    plain = [lm.greedy(prompt, a.new)[2] for _ in range(a.repeats)]
    del lm
    lm = OnnxLM(path, threads=a.threads)          # same session options, profiler on
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = f"/tmp/edgepack-prof-{os.getpid()}"
    lm.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    lm.greedy(prompt, a.new)                      # warm-up
    dec_s, run_s = decode_timed(lm, prompt, a.new)
    prof = lm.sess.end_profiling()
    ev = json.loads(Path(prof).read_text())
    Path(prof).unlink()
    runs = [e for e in ev if e.get("cat") == "Session" and e.get("name") == "model_run"]
    steps = runs[-(a.new - 1):]                   # the last greedy's decode runs
    lo, hi = steps[0]["ts"], steps[-1]["ts"] + steps[-1]["dur"]
    nodes = [e for e in ev if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and lo <= e["ts"] <= hi]
    n = len(steps)
    per = {c: 0.0 for c in CLASSES}
    ops: dict[str, float] = {}
    proj: dict[str, list] = {}                    # body MatMulNBits by projection: [us, calls]
    for e in nodes:
        name = e["name"][:-len("_kernel_time")]
        op = e["args"].get("op_name", "?")
        per[node_class(name, op)] += e["dur"]
        ops[op] = ops.get(op, 0.0) + e["dur"]
        if op in ("MatMulNBits", "MatMul"):
            k = "lm_head" if "lm_head" in name else "/".join(name.split("/")[-3:-1])
            proj.setdefault(k, [0.0, 0])
            proj[k][0] += e["dur"]
            proj[k][1] += 1
    run_us = sum(e["dur"] for e in steps)
    node_us = sum(per.values())
    ms = {c: v / n / 1000 for c, v in per.items()}
    ms["ORT run overhead (model_run minus nodes)"] = (run_us - node_us) / n / 1000
    ms["Python loop (outside sess.run)"] = (dec_s - run_s) / n * 1000
    return {"decode_tok_s_unprofiled": (a.new - 1) / float(np.median(plain)),
            "decode_tok_s_profiled": n / dec_s, "ms_per_token_profiled": dec_s / n * 1000,
            "ms_per_token": ms, "op_type_ms_per_token": {k: v / n / 1000 for k, v in sorted(ops.items(), key=lambda x: -x[1])},
            "matmul_us_per_call": {k: v[0] / v[1] for k, v in proj.items()},
            "decode_steps": n, "nodes_per_step": len(nodes) / n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--files", default=FILES, help="comma-separated ONNX files")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=33, help="new tokens per greedy decode (32 decode steps)")
    a = ap.parse_args()
    ids = B.protocol_ids()
    files = [f for f in a.files.split(",") if f]
    res: dict[str, list] = {f: [] for f in files}
    for r in range(a.rounds):
        for f in files:
            res[f].append(profile_once(str(ROOT / f), ids, a))
            B.log(f"round {r} {f}: {res[f][-1]['decode_tok_s_unprofiled']:.1f} tok/s, "
                  + ", ".join(f"{k} {v:.2f}" for k, v in res[f][-1]["ms_per_token"].items()))
    med = {}
    for f, v in res.items():
        keys = v[0]["ms_per_token"]
        m = {k: float(np.median([x["ms_per_token"][k] for x in v])) for k in keys}
        tot = sum(m.values())
        med[f] = {"decode_tok_s_unprofiled": float(np.median([x["decode_tok_s_unprofiled"] for x in v])),
                  "decode_tok_s_profiled": float(np.median([x["decode_tok_s_profiled"] for x in v])),
                  "matmul_us_per_call": {k: float(np.median([x["matmul_us_per_call"][k] for x in v]))
                                              for k in v[0]["matmul_us_per_call"]},
                  "matmul_weight_bytes": weight_bytes(str(ROOT / f)),
                  "ms_per_token": m, "share": {k: x / tot for k, x in m.items()}}
    out = {"files": files, "threads": a.threads, "prompt": a.prompt, "new": a.new, "rounds": a.rounds,
           "machine": {"cpu_flags": sorted({f for f in ("avx2", "avx512_vnni", "avx512f", "avxvnni")
                                            if f in Path("/proc/cpuinfo").read_text().split()}),
                       "python": platform.python_version(), "onnxruntime": __import__("onnxruntime").__version__,
                       "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
           "median": med, "rows": res}
    Path(a.output).write_text(json.dumps(out, indent=1))
    print(json.dumps(med, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
