"""Benchmark of the device agent (issue 4) -> bench-results/agent.json.

    .venv/bin/python scripts/bench_agent.py [--quick] [--out bench-results/agent.json]

Measures, each in real processes:
  1. the agent's own overhead: RSS of the agent process without a model, and the zipapp size;
  2. a ~100 MB full-bundle install through the zipapp: time, and the installer's peak RSS
     before the trial (verify + write) against the 64 MiB + largest-tensor bound; the trial's
     model RSS (it runs in a child process);
  3. `edgepack-agent bench` of the real models (fashion-cnn FP32 + INT8, efficientnet-lite0) in
     ONNX Runtime, and the FP32 ones in LiteRT (the same weights written as .tflite by
     tests/agent_helpers.py after ORT constant folding: no TF converter offline);
  4. agent `bench` vs the runtime's own benchmark tool on the same model and threads
     (onnxruntime.tools.onnxruntime_test, ai_edge_litert's litert-benchmark), interleaved runs,
     median of repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PY = sys.executable
MODELS = Path(os.environ.get("EDGEPACK_ASSETS", Path.home() / ".cache/edgepack/assets-v1")) / "models"


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kw)


def peak_of(cmd: list[str], env: dict | None = None) -> tuple[float, str, str, int]:
    """Run cmd; return (its peak RSS in MiB via wait4, stdout, stderr, rc)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ru.ru_maxrss / 1024.0, out.read(), err.read(), p.returncode


def agent_json(cmd: list[str]) -> dict:
    r = sh(cmd)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr[-500:]}")
    return json.loads(r.stdout)


def big_model(path: Path, mib: int = 100) -> tuple[Path, float]:
    """An MLP whose weights total ~``mib`` MiB in four equal tensors (random: incompressible)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    d, h = 1024, int(mib * (1 << 20) / 4 / 4 / 1024)
    shapes = [(d, h), (h, d), (d, h), (h, d)]
    inits, nodes, x = [], [], "x"
    for i, s in enumerate(shapes):
        w = (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        x = f"r{i}"
    inits.append(numpy_helper.from_array((rng.standard_normal((d, 10)) / 32).astype(np.float32), "WO"))
    nodes.append(helper.make_node("MatMul", [x, "WO"], ["y"]))
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path, shapes[0][0] * shapes[0][1] * 4 / (1 << 20)


def int8_fashion(src: Path, out: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    calib = MODELS.parent / "fashion-mnist" / "calib-x.npz"
    with np.load(calib) as z:
        x = z[z.files[0]][:64].astype(np.float32)
    x = x.reshape(-1, 1, 28, 28)

    class R(CalibrationDataReader):
        def __init__(self):
            self.it = iter(x[i:i + 1] for i in range(len(x)))

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"input": b}

    quantize_static(str(src), str(out), R(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "agent.json"))
    ap.add_argument("--quick", action="store_true", help="fewer runs/repeats, 30 MB install")
    args = ap.parse_args()
    runs, reps, mib = (50, 1, 30) if args.quick else (300, 5, 100)
    res: dict = {"machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                             "cores": os.cpu_count(), "note": "shared 2-core VM; other jobs may run concurrently"}}
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    from agent_helpers import fold_for_tflite, golden_for, make_pki, onnx_to_tflite, write_trust
    from edgepack.fleet.agent_zipapp import build_zipapp

    # 1. overhead ------------------------------------------------------------------------------
    pyz = build_zipapp(work / "edgepack-agent.pyz")
    pki = make_pki(work / "pki")
    root, _ = write_trust(pki)
    board = work / "board"
    sh([PY, str(pyz.path), "--state", str(board), "init", "--target", "rpi4", "--trust-root", str(root),
        "--threads", "1", "--ram-mb", "1024", "--storage-mb", "4096"])
    py_peak = float(sh([PY, "-c", "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"]
                       ).stdout) / 1024
    st_peak = agent_json([PY, str(pyz.path), "--state", str(board), "status"])["process"]["peak_rss_mb"]
    imp = json.loads(sh([PY, "-c", "import json, device_agent.cli, device_agent.install, device_agent.bundle, "
                             "device_agent.benchmark\nfrom device_agent.budgets import rss_mb\n"
                             "print(json.dumps({'rss_mb': rss_mb()}))"]).stdout)
    res["overhead"] = {"zipapp_bytes": pyz.bytes, "zipapp_files": pyz.files,
                       "python_bare_peak_rss_mb": round(py_peak, 1),
                       "agent_status_peak_rss_mb": round(st_peak, 1),
                       "agent_imported_rss_mb": round(imp["rss_mb"], 1)}
    print("overhead", res["overhead"], flush=True)

    # 2. ~100 MB install ---------------------------------------------------------------------------
    from device_agent.durable import utc_now
    from ota_helpers import build
    (work / "big").mkdir()
    m, largest = big_model(work / "big" / "model.onnx", mib)
    g = golden_for(m, work / "big-golden.npz", n=4)
    t0 = time.perf_counter()
    build(pki, work / "big.bundle", m, release=1, golden=g, now=utc_now(), settings={"runtime": "onnxruntime"})
    build_s = time.perf_counter() - t0
    peak, out, err, rc = peak_of([PY, str(pyz.path), "--state", str(board), "install", str(work / "big.bundle")])
    rep = json.loads(out)
    if rc != 0:
        raise SystemExit(f"install failed: {err}")
    bound = 64 + largest
    res["install_100mb"] = {
        "model_mib": round(m.stat().st_size / (1 << 20), 1), "bundle_mib": round(rep["bundle_bytes"] / (1 << 20), 1),
        "largest_tensor_mib": round(largest, 1), "bundle_build_s": round(build_s, 2),
        "install_total_s": round(rep["seconds"], 2), "verify_and_write_s": round(rep["seconds_verify_write"], 2),
        "installer_peak_rss_mb_before_trial": round(rep["peak_rss_mb_before_trial"], 1),
        "bound_mib_64_plus_largest_tensor": round(bound, 1),
        "within_bound": rep["peak_rss_mb_before_trial"] <= bound,
        "trial_child_peak_rss_mb": rep["trial"].get("peak_rss_mb"), "trial_model_rss_mb": rep["trial"].get("model_rss_mb"),
        "trial_load_s": round(rep["trial"].get("load_seconds", 0), 3), "trial_passed": rep["trial"]["passed"],
        "agent_process_peak_rss_mb": rep["process"]["peak_rss_mb"]}
    print("install", res["install_100mb"], flush=True)
    (work / "big.bundle").unlink()

    # 3. real models ------------------------------------------------------------------------------
    fashion, eff = MODELS / "fashion-cnn.onnx", MODELS / "efficientnet-lite0.onnx"
    fashion_tfl = onnx_to_tflite(fashion, work / "fashion-cnn.tflite")
    fashion_i8 = int8_fashion(fashion, work / "fashion-cnn-int8.onnx")
    eff_tfl = onnx_to_tflite(fold_for_tflite(eff, work / "efficientnet-lite0-folded.onnx"), work / "efficientnet-lite0.tflite")
    agent = [PY, str(pyz.path)]
    cases = [("fashion-cnn fp32", fashion, "onnxruntime", runs), ("fashion-cnn fp32", fashion_tfl, "litert", runs),
             ("fashion-cnn int8 (QDQ)", fashion_i8, "onnxruntime", runs),
             ("efficientnet-lite0 fp32", eff, "onnxruntime", max(runs // 3, 30)),
             ("efficientnet-lite0 fp32", eff_tfl, "litert", max(runs // 3, 30))]
    res["bench"] = []
    for name, path, rt, n in cases:
        for threads in (1, 2):
            b = agent_json(agent + ["bench", "--model", str(path), "--runtime", rt, "--threads", str(threads),
                                    "--runs", str(n), "--warmup", "10"])
            row = {"model": name, "file": path.name, **{k: b[k] for k in (
                "runtime", "runtime_version", "provider", "threads", "load_ms", "first_inference_ms",
                "rss_agent_mb", "rss_runtime_mb", "rss_model_mb", "peak_rss_mb")},
                   **{k: round(v, 4) for k, v in b["latency"].items() if k != "runs"}, "runs": n}
            res["bench"].append(row)
            print("bench", row, flush=True)
    res["bench_note"] = ("LiteRT models are the same FP32 weights written as .tflite by tests/agent_helpers.py "
                         "(onnx_to_tflite after ORT constant folding): no TF converter offline")

    # 4. agent bench vs the runtime's own tools -----------------------------------------------------
    cmp_rows = []

    def ort_tool(path: Path, n: int, threads: int) -> float:
        # onnxruntime's own test tool (its run loop and timer). It has no thread option, so the
        # session it creates is given intra_op_num_threads=threads, the same as the agent's; and
        # override_initializers=False, else it feeds every weight as an input on each run.
        code = ("import onnxruntime as ort\nfrom onnxruntime.tools import onnxruntime_test as t\n_IS = ort.InferenceSession\n"
                "def IS(p, sess_options=None, providers=None):\n    so = ort.SessionOptions()\n"
                f"    so.intra_op_num_threads = {threads}\n    so.inter_op_num_threads = 1\n"
                "    return _IS(p, so, providers=providers)\n"
                f"t.onnxrt.InferenceSession = IS\nt.run_model({str(path)!r}, {n}, override_initializers=False)\n")
        r = sh([PY, "-c", code])
        return float(re.search(r"avg latency: ([0-9.]+) ms", r.stdout).group(1))

    def litert_tool(path: Path, n: int, threads: int) -> float:
        j = work / "lb.json"
        sh([str(Path(PY).parent / "litert-benchmark"), "--model", str(path), "--num_runs", str(n), "--warmup_runs", "10",
            "--num_threads", str(threads), "--result_json", str(j)])
        return float(json.loads(j.read_text())["latency"]["avg_ms"])

    for name, path, rt, n, threads in (("fashion-cnn fp32", fashion, "onnxruntime", 3000, 1),
                                       ("fashion-cnn int8 (QDQ)", fashion_i8, "onnxruntime", 3000, 1),
                                       ("efficientnet-lite0 fp32", eff, "onnxruntime", 200, 1),
                                       ("efficientnet-lite0 fp32", eff, "onnxruntime", 200, 2),
                                       ("fashion-cnn fp32", fashion_tfl, "litert", 3000, 1),
                                       ("efficientnet-lite0 fp32", eff_tfl, "litert", 200, 1)):
        ours, theirs = [], []
        for _ in range(reps):
            b = agent_json(agent + ["bench", "--model", str(path), "--runtime", rt, "--runs", str(n), "--warmup", "10",
                                    "--threads", str(threads)])
            ours.append(b["latency"]["mean_ms"])
            theirs.append(ort_tool(path, n, threads) if rt == "onnxruntime" else litert_tool(path, n, threads))
        o, t = statistics.median(ours), statistics.median(theirs)
        row = {"model": name, "runtime": rt, "threads": threads, "runs": n, "repeats": reps,
               "agent_mean_ms": round(o, 4), "tool": "onnxruntime.tools.onnxruntime_test.run_model (threads set, override_initializers=False)" if rt == "onnxruntime"
               else "litert-benchmark (CompiledModel API; reports 2 decimals)", "tool_mean_ms": round(t, 4),
               "agent_means_ms": [round(x, 4) for x in ours], "tool_means_ms": [round(x, 4) for x in theirs],
               "ratio": round(o / t, 3) if t else None, "within_10pct": bool(t) and abs(o / t - 1) <= 0.10}
        cmp_rows.append(row)
        print("vs tool", row, flush=True)
    res["vs_runtime_tool"] = cmp_rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
