#!/usr/bin/env python
"""Benchmark edgepack's OTA deltas and bundle streaming against bsdiff4, zstd --patch-from, xdelta3, hdiffpatch.

Everything is measured in one run on this machine:

* model pairs from the real assets (``python scripts/assets.py``): EfficientNet-Lite0 INT8 calibrated
  on two image subsets; Fashion-MNIST CNN after epoch 3 and 4, FP32 and INT8; a fine-tuned MiniLM
  (epoch 1 -> 2) if ``models/minilm-sst-e1.onnx`` and ``minilm-sst.onnx`` (epoch 2) exist. Per tool: patch size, median time to
  make and to apply, and peak RSS of the process doing it (each op runs in its own child process;
  RSS comes from wait4, so it includes the interpreter for Python tools: see ``python_baseline_rss_mib``).
  Every applied output is compared byte for byte with the new model.
* a 200 MB synthetic ONNX model: build, verify and extract throughput and peak RSS.

Writes bench-results/bundle.json and prints markdown tables.
Peer tools: pip install bsdiff4 hdiffpatch; apt-get install zstd xdelta3.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PY = sys.executable
TOOLS = ["edgepack", "bsdiff4", "zstd-patch-from", "xdelta3", "hdiffpatch"]


# =========================================================================== worker (child process)
def worker(argv: list[str]) -> None:
    """One operation in a fresh process so its peak RSS can be measured alone."""
    tool, action, a, b, c = argv
    t0 = time.perf_counter()
    if tool == "edgepack" and action == "make":
        from edgepack.ota.delta import make_file_delta
        fd = make_file_delta(a, b, c)
        Path(c + ".enc").write_text(json.dumps({"encoding": fd.encoding, "stats": fd.stats,
                                                "base": os.path.getsize(a), "target": os.path.getsize(b)}))
    elif tool == "edgepack" and action == "apply":  # the board's code path, streaming into a file
        from device_agent.wire.streams import FrameReader
        from device_agent.delta_apply import iter_patch_from, iter_tensor_delta
        meta = json.loads(Path(b + ".enc").read_text())
        n = os.path.getsize(b)
        with open(a, "rb") as base, open(b, "rb") as pf, open(c, "wb") as out:
            fr = FrameReader(pf, n, "patch")
            if meta["encoding"] == "tensor-delta":
                it = iter_tensor_delta(fr, base, meta["base"], meta["target"], "patch")
            else:
                it = iter_patch_from(fr, base, meta["base"], meta["target"], n, "patch")
            for chunk in it:
                out.write(chunk)
    elif tool == "bsdiff4":
        import bsdiff4
        (bsdiff4.file_diff if action == "make" else bsdiff4.file_patch)(a, b if action == "make" else c,
                                                                        c if action == "make" else b)
    elif tool == "hdiffpatch":
        import hdiffpatch
        if action == "make":
            cfg = hdiffpatch.ZStdConfig(level=19, window=27)
            Path(c).write_bytes(hdiffpatch.diff(Path(a).read_bytes(), Path(b).read_bytes(), cfg, validate=False))
        else:
            Path(c).write_bytes(hdiffpatch.apply(Path(a).read_bytes(), Path(b).read_bytes()))
    elif tool == "bundle-build":
        from edgepack.ota.bundle import build_bundle
        from edgepack.ota.keys import load_signing_key, read_doc
        pki = Path(b)
        build_bundle(c, models=[a], name="big", release=1, version="1.0", targets=["bench"],
                     signer=load_signing_key(pki / "rel.key"), release_keys_doc=read_doc(pki / "rk.json"),
                     roots=[read_doc(pki / "root" / "root.json")], settings={"runtime": "onnxruntime"},
                     verify=False)
    elif tool in ("bundle-verify", "bundle-extract"):
        from device_agent.bundle import extract, open_bundle, verify_payloads
        from device_agent.trust import TrustRoot
        trust = TrustRoot.from_files(Path(b) / "root" / "root.json")
        vm = open_bundle(a, trust, target="bench")
        if tool == "bundle-verify":
            verify_payloads(vm)
        else:
            extract(vm, c)
    elif tool == "baseline":
        import device_agent.bundle  # noqa: F401  the reader's imports alone
    else:
        raise SystemExit(f"unknown worker op {tool} {action}")
    print(json.dumps({"seconds": time.perf_counter() - t0}))


# =========================================================================== measuring
TIME = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)


def measure(cmd: list[str], *, python_worker: bool) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one child process. Python workers time their own operation.

    Peak RSS comes from GNU time (%M) wrapping the command: measuring with wait4 straight from
    this process would report *this* process's RSS at fork time (Linux carries the high-water
    mark across exec), which is large once onnxruntime is loaded.
    """
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".rss") as tf:
        full = [TIME, "-f", "%M", "-o", tf.name, *cmd] if TIME else cmd
        t0 = time.perf_counter()
        p = subprocess.run(full, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip()[-500:]}")
        rss_kb = float(Path(tf.name).read_text().strip().splitlines()[-1]) if TIME else float("nan")
    secs = json.loads(p.stdout.strip().splitlines()[-1])["seconds"] if python_worker else wall
    return secs, rss_kb / 1024.0


def tool_cmds(tool: str, old: Path, new: Path, patch: Path, out: Path) -> tuple[list[str], list[str], bool]:
    me = [PY, str(Path(__file__).resolve()), "_worker", tool]
    if tool in ("edgepack", "bsdiff4", "hdiffpatch"):
        return ([*me, "make", str(old), str(new), str(patch)], [*me, "apply", str(old), str(patch), str(out)], True)
    if tool == "zstd-patch-from":
        return (["zstd", "-q", "-f", "-19", f"--patch-from={old}", str(new), "-o", str(patch)],
                ["zstd", "-q", "-f", "-d", "--long=31", f"--patch-from={old}", str(patch), "-o", str(out)], False)
    if tool == "xdelta3":
        return (["xdelta3", "-e", "-9", "-f", "-s", str(old), str(new), str(patch)],
                ["xdelta3", "-d", "-f", "-s", str(old), str(patch), str(out)], False)
    raise ValueError(tool)


def bench_pair(name: str, old: Path, new: Path, work: Path, repeats: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    full = subprocess.run(["zstd", "-19", "-q", "-c", str(new)], capture_output=True, check=True).stdout
    row = {"pair": name, "old": str(old), "new": str(new), "old_bytes": old.stat().st_size,
           "new_bytes": new.stat().st_size, "full_zstd19_bytes": len(full), "tools": {}}
    target = new.read_bytes()
    for tool in TOOLS:
        if tool in ("zstd-patch-from", "xdelta3") and not shutil.which(tool.split("-")[0]):
            row["tools"][tool] = {"skipped": f"{tool} CLI not installed"}
            continue
        patch, out = work / f"{tool}.patch", work / f"{tool}.out"
        mk, ap, pyw = tool_cmds(tool, old, new, patch, out)
        try:
            makes = [measure(mk, python_worker=pyw) for _ in range(repeats)]
            size = patch.stat().st_size
            applies = [measure(ap, python_worker=pyw) for _ in range(repeats)]
        except (RuntimeError, ModuleNotFoundError) as e:
            row["tools"][tool] = {"skipped": str(e)[:300]}
            continue
        ok = out.read_bytes() == target
        r = {"bytes": size, "make_s": statistics.median(m[0] for m in makes),
             "make_rss_mib": max(m[1] for m in makes), "apply_s": statistics.median(a[0] for a in applies),
             "apply_rss_mib": max(a[1] for a in applies), "roundtrip_ok": ok}
        if tool == "edgepack":
            meta = json.loads(Path(str(patch) + ".enc").read_text())
            r["encoding"], r["stats"] = meta["encoding"], meta["stats"]
        row["tools"][tool] = r
        print(f"  {tool:16s} {size:>11,} B  make {r['make_s']:.2f}s  apply {r['apply_s']:.2f}s  ok={ok}", flush=True)
    peers = {t: v["bytes"] for t, v in row["tools"].items() if t != "edgepack" and "bytes" in v}
    ours = row["tools"]["edgepack"]["bytes"]
    best = min(peers, key=peers.get) if peers else None
    row["best_peer"] = best
    row["ratio_vs_best_peer"] = ours / peers[best] if best else None
    row["ratio_vs_full_zstd19"] = ours / len(full)
    row["ratio_vs_new_model"] = ours / row["new_bytes"]
    return row


# =========================================================================== model pairs
def _effnet_batch(files: list[Path]):
    import numpy as np
    from PIL import Image
    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        s = 256 / min(w, h)
        im = im.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BILINEAR)
        w, h = im.size
        l, t = (w - 224) // 2, (h - 224) // 2
        a = np.asarray(im.crop((l, t, l + 224, t + 224)), dtype=np.float32)
        out.append(((a - 127.0) / 128.0).transpose(2, 0, 1))
    return np.stack(out)


class _Reader:
    def __init__(self, name: str, data):
        self.it = iter([{name: data[i:i + 1]} for i in range(len(data))])

    def get_next(self):
        return next(self.it, None)

    def rewind(self):  # not needed: one pass
        pass


def quantize(src: Path, dst: Path, data, input_name: str = "input") -> Path:
    if dst.exists():
        return dst
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static  # noqa: F401
    tmp = dst.with_suffix(".tmp.onnx")
    quantize_static(str(src), str(tmp), _Reader(input_name, data), quant_format=QuantFormat.QDQ, per_channel=True)
    os.replace(tmp, dst)
    return dst


def model_pairs(work: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    import numpy as np
    from edgepack.assets import assets_dir
    A = assets_dir()
    pairs, notes = [], []
    qdir = work / "models"
    qdir.mkdir(parents=True, exist_ok=True)
    eff = A / "models" / "efficientnet-lite0.onnx"
    calib = sorted((A / "images" / "natural-calib").glob("*.png"))
    if eff.exists() and len(calib) >= 64:
        half = len(calib) // 2
        a = quantize(eff, qdir / "effnet-int8-calibA.onnx", _effnet_batch(calib[:min(half, 64)]))
        b = quantize(eff, qdir / "effnet-int8-calibB.onnx", _effnet_batch(calib[half:half + 64]))
        pairs.append(("EfficientNet-Lite0 INT8, calib A -> calib B", a, b))
    else:
        notes.append("EfficientNet-Lite0 pair skipped: run `python scripts/assets.py`")
    e3, e4 = A / "models" / "fashion-cnn-e3.onnx", A / "models" / "fashion-cnn.onnx"
    fm = A / "fashion-mnist" / "train.npz"
    if e3.exists() and e4.exists():
        pairs.append(("Fashion CNN FP32, epoch 3 -> 4", e3, e4))
        if fm.exists():
            with np.load(fm) as z:
                imgs = z["images"][:256].astype(np.float32)[:, None] / 255.0
            a = quantize(e3, qdir / "fashion-e3-int8.onnx", imgs)
            b = quantize(e4, qdir / "fashion-e4-int8.onnx", imgs)
            pairs.append(("Fashion CNN INT8, epoch 3 -> 4", a, b))
    else:
        notes.append("Fashion CNN pairs skipped: run `python scripts/assets.py`")
    m1, m2 = A / "models" / "minilm-sst-e1.onnx", A / "models" / "minilm-sst.onnx"  # epoch 1, epoch 2 (final)
    if m1.exists() and m2.exists():
        pairs.append(("MiniLM fine-tuned, epoch 1 -> 2", m1, m2))
    else:
        notes.append("MiniLM pair skipped: no fine-tuned MiniLM (models/minilm-sst-e1.onnx, minilm-sst.onnx; python scripts/assets.py minilm) in the assets")
    return pairs, notes


# =========================================================================== 200 MB bundle
def big_model(path: Path, mb: int) -> Path:
    """Synthetic ONNX with ``mb`` MB of float32 weights (N(0, 0.05): compresses like real weights, ~7%)."""
    if path.exists() and abs(path.stat().st_size - mb * 1e6) < 2e6:
        return path
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    per = 4_000_000  # 4 MB tensors
    n = max(1, int(mb * 1e6 // per))
    inits, nodes, prev = [], [], "x"
    for i in range(n):
        w = (rng.standard_normal(per // 4, dtype=np.float32) * 0.05).reshape(1000, 1000)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"]))
        prev = f"h{i}"
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1000])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 1000])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(path))
    return path


def bench_big(work: Path, mb: int, repeats: int) -> dict:
    from edgepack.ota import keys as K
    pki = work / "pki"
    if not (pki / "rk.json").exists():
        shutil.rmtree(pki, ignore_errors=True)
        root, rks = K.init_root(pki / "root")
        rel = K.generate_key(pki / "rel.key")
        K.write_doc(pki / "rk.json", K.make_release_keys(K.read_doc(root), rks[:2], [rel.public_raw], version=1))
    model = big_model(work / f"big-{mb}mb.onnx", mb)
    bundle = work / "big.bundle"
    me = [PY, str(Path(__file__).resolve()), "_worker"]
    size_mb = model.stat().st_size / 1e6
    res: dict = {"model_bytes": model.stat().st_size}
    runs = {"build": [], "verify": [], "extract": []}
    for _ in range(repeats):
        runs["build"].append(measure([*me, "bundle-build", "x", str(model), str(pki), str(bundle)], python_worker=True))
        runs["verify"].append(measure([*me, "bundle-verify", "x", str(bundle), str(pki), "-"], python_worker=True))
        dest = work / "big-extract"
        shutil.rmtree(dest, ignore_errors=True)
        runs["extract"].append(measure([*me, "bundle-extract", "x", str(bundle), str(pki), str(dest)],
                                       python_worker=True))
        shutil.rmtree(dest, ignore_errors=True)
    res["bundle_bytes"] = bundle.stat().st_size
    for k, v in runs.items():
        s = statistics.median(x[0] for x in v)
        res[k] = {"seconds": s, "mb_per_s": size_mb / s, "peak_rss_mib": max(x[1] for x in v)}
        print(f"  {k:8s} {s:.2f}s  {size_mb / s:.1f} MB/s  peak RSS {res[k]['peak_rss_mib']:.1f} MiB", flush=True)
    bundle.unlink()
    return res


# =========================================================================== report
def markdown(result: dict) -> str:
    lines = ["| pair | new model | zstd -19 full | edgepack | bsdiff4 | zstd --patch-from -19 | xdelta3 -9 | hdiffpatch (zstd 19) | edgepack / best peer | edgepack / full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["pairs"]:
        cells = []
        for t in TOOLS:
            v = r["tools"].get(t, {})
            cells.append(f"{v['bytes']:,}" if "bytes" in v else "n/a")
        lines.append(f"| {r['pair']} | {r['new_bytes']:,} | {r['full_zstd19_bytes']:,} | " + " | ".join(cells)
                     + f" | **{r['ratio_vs_best_peer']:.3f}** ({r['best_peer']}) | {r['ratio_vs_full_zstd19']:.3f} |")
    lines += ["", "| pair | tool | make s | make peak RSS MiB | apply s | apply peak RSS MiB | roundtrip |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in result["pairs"]:
        for t in TOOLS:
            v = r["tools"].get(t, {})
            if "bytes" in v:
                lines.append(f"| {r['pair']} | {t} | {v['make_s']:.2f} | {v['make_rss_mib']:.0f} | {v['apply_s']:.3f} | "
                             f"{v['apply_rss_mib']:.0f} | {'ok' if v['roundtrip_ok'] else 'MISMATCH'} |")
    b = result.get("big")
    if b:
        lines += ["", f"200 MB bundle (model {b['model_bytes'] / 1e6:.0f} MB, bundle {b['bundle_bytes'] / 1e6:.0f} MB):", "",
                  "| operation | median s | MB/s (model bytes) | peak RSS MiB |", "|---|---:|---:|---:|"]
        for k in ("build", "verify", "extract"):
            lines.append(f"| {k} | {b[k]['seconds']:.2f} | {b[k]['mb_per_s']:.1f} | {b[k]['peak_rss_mib']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        return worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bundle.json")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgepack" / "bench-bundle")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big-mb", type=int, default=200)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-pairs", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    vers = {}
    for t, cmd in (("zstd", ["zstd", "--version"]), ("xdelta3", ["xdelta3", "-V"])):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            vers[t] = (r.stdout + r.stderr).strip().splitlines()[0]
        except OSError:
            vers[t] = None
    for mod in ("bsdiff4", "hdiffpatch", "backports.zstd", "onnxruntime"):
        try:
            from importlib.metadata import version
            vers[mod] = version(mod.replace(".", "-") if mod == "backports.zstd" else mod)
        except Exception:
            vers[mod] = None
    base = measure([PY, str(Path(__file__).resolve()), "_worker", "baseline", "-", "-", "-", "-"], python_worker=True)
    result: dict = {"meta": {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
                             "python": platform.python_version(), "machine": platform.machine(), "versions": vers,
                             "repeats": args.repeats, "python_baseline_rss_mib": base[1]},
                    "pairs": [], "notes": []}
    if not args.skip_pairs:
        pairs, notes = model_pairs(args.work)
        result["notes"] += notes
        for name, old, new in pairs:
            print(f"{name}: {old.name} -> {new.name}", flush=True)
            slug = "".join(ch if ch.isalnum() else "_" for ch in name)
            result["pairs"].append(bench_pair(name, old, new, args.work / "pairs" / slug, args.repeats))
    if not args.skip_big:
        print(f"{args.big_mb} MB bundle:", flush=True)
        result["big"] = bench_big(args.work, args.big_mb, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(markdown(result))
    for n in result["notes"]:
        print(f"note: {n}")


if __name__ == "__main__":
    main()
