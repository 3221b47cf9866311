#!/usr/bin/env python3
"""An LLM release over the air (issue 15): SmolLM2-135M W8 weight-only bundled by ``edgepack
bundle`` (graph + external data + genai_config.json), peak RSS of the bundle build and of the
agent's install, and a delta between two fine-tunes against byte-delta peers.

    nice -n 5 .venv/bin/python scripts/bench_llm_delta.py -o docs/results/llm-delta.json

The "fine-tune": a rank-8 LoRA update merged (W += B @ A, |BA| ~ 1 % of |W|) into the qkv and
o projections of 4 of the 30 layers of the FP32 model, then both FP32 models are quantized the
same way (W8 RTN block 32; scripts/bench_llm.py's ``w8-rtn-b32-shared``). Peers work on the
weights file (model.onnx.data, 99.9 % of the bundle) with scripts/bench_bundle.py's commands:
zstd -19 --patch-from --long, xdelta3 -9 (bsdiff4 and hdiffpatch are left out: suffix sorting
157 MB takes minutes and GBs here). edgepack's figure is the whole delta bundle (every file,
manifest, signatures). Peak RSS: each operation in its own process (GNU time %M for peers; the
agent's own VmHWM before its trial for install).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
import bench_agent_llm as A  # noqa: E402
import bench_bundle as BB  # noqa: E402

from edgepack.quantize.numerics import cpu_info  # noqa: E402

LORA_LAYERS = (3, 11, 19, 27)
TARGET = "rpi4-2gb"


def finetuned_fp32(src: Path, dst: Path, seed: int = 7) -> Path:
    """FP32 model with a merged rank-8 LoRA on qkv/o projections of LORA_LAYERS."""
    import onnx
    from onnx import numpy_helper
    from edgepack.llm.weightonly import save_model
    if (dst / "model.onnx").is_file():
        return dst / "model.onnx"
    m = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    keys = [f"model.layers.{i}.attn.{p}.MatMul.weight" for i in LORA_LAYERS for p in ("qkv_proj", "o_proj")]
    for init in m.graph.initializer:
        if init.name in keys:
            w = numpy_helper.to_array(init)
            a, b = rng.standard_normal((w.shape[0], 8)), rng.standard_normal((8, w.shape[1]))
            d = a @ b
            d *= 0.01 * np.linalg.norm(w) / np.linalg.norm(d)
            init.CopyFrom(numpy_helper.from_array((w + d).astype(np.float32), init.name))
    save_model(m, dst / "model.onnx", src.parent)
    return dst / "model.onnx"


_BUILD = r"""
import json, sys
def hwm():
    for l in open("/proc/self/status"):
        if l.startswith("VmHWM:"): return int(l.split()[1]) / 1024
a = json.loads(sys.argv[1])
from device_agent import bundle, install, cli
if a["what"] == "baseline":
    print(json.dumps({"base": hwm()})); sys.exit()
import time
from ota_helpers import Pki
from edgepack.ota.bundle import build_bundle
from edgepack.ota import keys as K
pki = json.load(open(a["pki"]))
base = hwm()
t0 = time.perf_counter()
rep = build_bundle(a["out"], models=[a["model"]], name="smollm2", release=a["release"], version=str(a["release"]),
                   targets=[a["target"]], signer=K.load_signing_key(a["key"]), release_keys_doc=pki["rk"], roots=[pki["root"]],
                   settings={"runtime": "onnxruntime", "threads": 1})
print(json.dumps({"base": base, "peak": hwm(), "seconds": time.perf_counter() - t0, "bytes": rep.bundle_bytes,
                  "files": rep.files}))
"""


def child(**a) -> dict:
    import os
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    r = subprocess.run([sys.executable, "-c", _BUILD, json.dumps(a)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def agent(state: Path, *args: str) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, "-m", "device_agent", "--state", str(state), *args],
                       capture_output=True, text=True, cwd=ROOT)
    try:
        return r.returncode, json.loads(r.stdout)
    except ValueError:
        raise RuntimeError(r.stderr[-2000:]) from None


def peers(old: Path, new: Path, work: Path, repeats: int) -> dict:
    """scripts/bench_bundle.py's peer commands on the weights file: size, make/apply seconds and peak RSS."""
    import statistics
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for tool in ("zstd-patch-from", "xdelta3"):
        patch, rebuilt = work / f"{tool}.patch", work / f"{tool}.out"
        mk, apc, pyw = BB.tool_cmds(tool, old, new, patch, rebuilt)
        makes = [BB.measure(mk, python_worker=pyw) for _ in range(repeats)]
        applies = [BB.measure(apc, python_worker=pyw) for _ in range(repeats)]
        out[tool] = {"bytes": patch.stat().st_size, "make_s": statistics.median(m[0] for m in makes),
                     "make_rss_mib": max(m[1] for m in makes), "apply_s": statistics.median(x[0] for x in applies),
                     "apply_rss_mib": max(x[1] for x in applies),
                     "roundtrip_ok": BB.sha256_of(rebuilt) == BB.sha256_of(new) if hasattr(BB, "sha256_of")
                     else rebuilt.read_bytes() == new.read_bytes()}
        print(tool, out[tool], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--out", type=Path, default=ROOT / "out" / "llm" / "llm-delta.json")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    from agent_helpers import init_board
    from ota_helpers import make_pki
    from edgepack.ota.bundle import trust_for_check
    from edgepack.ota.delta import make_delta_bundle
    from edgepack.llm.weightonly import quantize_weight_only
    import bench_llm as B
    w8a = A.model_of("w8-rtn-b32-shared")
    fta = finetuned_fp32(B.OUT / "fp32" / "model.onnx", B.OUT / "fp32-lora")
    w8b = B.OUT / "w8-rtn-b32-lora" / "model.onnx"
    if not w8b.is_file():
        quantize_weight_only(fta, w8b, B.weight_only_variants()["w8-rtn-b32-shared"][1])
    work = Path(tempfile.mkdtemp(prefix="llm-delta-", dir=ROOT / "out" / "llm"))
    pki = make_pki(work / "pki")
    (work / "pki.json").write_text(json.dumps({"root": pki.root_doc, "rk": pki.rk_doc}))
    res = {"machine": {"cpu": cpu_info(), "python": platform.python_version()}, "model": "SmolLM2-135M W8 RTN b32",
           "lora_layers": LORA_LAYERS}
    common = dict(pki=str(work / "pki.json"), key=str(pki.dir / "release-0.key"), target=TARGET)
    res["baseline_agent_mib"] = child(what="baseline")["base"]
    for rel, m in ((1, w8a), (2, w8b)):
        res[f"build_r{rel}"] = child(what="build", out=str(work / f"r{rel}.bundle"), model=str(m), release=rel, **common)
        b = res[f"build_r{rel}"]
        print(f"r{rel}: {b['bytes']:,} B built in {b['seconds']:.1f}s, peak {b['peak']:.0f} MiB (base {b['base']:.0f})",
              flush=True)
    t0 = time.perf_counter()
    rep = make_delta_bundle(work / "r1.bundle", work / "r2.bundle", work / "d12.bundle",
                            trust=trust_for_check([pki.root_doc], pki.rk_doc), signer=[pki.release[0]])
    res["delta"] = {"bytes": (work / "d12.bundle").stat().st_size, "make_s": time.perf_counter() - t0,
                    "report": {k: v for k, v in vars(rep).items() if isinstance(v, (int, float, str, list, dict))}}
    print(f"delta {res['delta']['bytes']:,} B in {res['delta']['make_s']:.1f}s", flush=True)
    state = work / "board"
    init_board(state, pki, threads=1, trial_runs=2)
    for name, bundle in (("install_full_r1", "r1.bundle"), ("install_delta_r2", "d12.bundle")):
        t0 = time.perf_counter()
        code, out = agent(state, "install", str(work / bundle))
        res[name] = {"rc": code, "wall_s": time.perf_counter() - t0,
                     "seconds_verify_write": out.get("seconds_verify_write"),
                     "peak_rss_mb_before_trial": out.get("peak_rss_mb_before_trial"),
                     "trial_passed": (out.get("trial") or {}).get("passed"), "error": out.get("error")}
        print(name, res[name], flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1, default=str))
    res["peers_on_weights_file"] = peers(w8a.parent / "model.onnx.data", w8b.parent / "model.onnx.data",
                                         work / "peers", a.repeats)
    full = res["build_r2"]["bytes"]
    res["ratios"] = {"delta_vs_full_bundle": res["delta"]["bytes"] / full,
                     **{f"delta_vs_{t}": res["delta"]["bytes"] / v["bytes"]
                        for t, v in res["peers_on_weights_file"].items() if "bytes" in v}}
    print(json.dumps(res["ratios"], indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        BB.worker(sys.argv[2:])
    else:
        main()
