"""``edgepack diff r1.bundle r2.bundle``: what changed between two releases.

Both bundles are verified exactly as a board does (signatures, policy, every payload hash) and
extracted to a temporary folder; then, per file, size and hash; per ONNX model, the initializers
(weights) added, removed and changed with their largest absolute difference; and, when the newer
bundle carries golden inputs, the two models' top-1 agreement on them and their median latency
on this host (a host figure, not a board's).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True, kw_only=True)
class FileChange:
    path: str
    role: str
    change: str              # same | changed | added | removed
    old_bytes: int | None
    new_bytes: int | None


@dataclass(frozen=True, kw_only=True)
class TensorChange:
    model: str
    tensor: str
    change: str              # changed | added | removed | reshaped
    shape: list[int]
    max_abs_diff: float | None


@dataclass
class BundleDiff:
    old: dict[str, Any]
    new: dict[str, Any]
    files: list[FileChange] = field(default_factory=list)
    tensors: list[TensorChange] = field(default_factory=list)
    tensors_same: int = 0
    agreement: float | None = None       # top-1 agreement of the two models on the golden inputs
    golden_samples: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)   # median on this host: old, new

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _summary(vm: Any, path: Path) -> dict[str, Any]:
    s = vm.summary()
    return {"path": str(path), "bytes": path.stat().st_size,
            **{k: s.get(k) for k in ("kind", "model", "release", "version", "targets", "content_sha256")}}


def _roles(vm: Any) -> dict[str, str]:
    return {f["path"]: f.get("role", "") for f in vm.summary()["files"]}


def _tensors(old: Path, new: Path, model: str) -> tuple[list[TensorChange], int]:
    import onnx
    from onnx import numpy_helper
    a = {t.name: t for t in onnx.load(str(old)).graph.initializer}
    b = {t.name: t for t in onnx.load(str(new)).graph.initializer}
    out, same = [], 0
    for name in sorted(a.keys() | b.keys()):
        if name not in b:
            out.append(TensorChange(model=model, tensor=name, change="removed", shape=list(a[name].dims),
                                    max_abs_diff=None))
            continue
        if name not in a:
            out.append(TensorChange(model=model, tensor=name, change="added", shape=list(b[name].dims),
                                    max_abs_diff=None))
            continue
        x, y = numpy_helper.to_array(a[name]), numpy_helper.to_array(b[name])
        if x.shape != y.shape or x.dtype != y.dtype:
            out.append(TensorChange(model=model, tensor=name, change="reshaped", shape=list(y.shape),
                                    max_abs_diff=None))
        elif x.tobytes() != y.tobytes():
            d = np.abs(x.astype(np.float64) - y.astype(np.float64))
            out.append(TensorChange(model=model, tensor=name, change="changed", shape=list(y.shape),
                                    max_abs_diff=float(d.max()) if d.size else 0.0))
        else:
            same += 1
    return out, same


def _median_ms(sess: Any, feed: dict[str, np.ndarray], runs: int) -> float:
    sess.run(None, feed)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))


def _behaviour(rep: BundleDiff, old_model: Path, new_model: Path, golden: Path, runs: int) -> None:
    import onnxruntime as ort
    z = np.load(golden)
    inputs = [z[k] for k in sorted(k for k in z.files if k.startswith("input"))]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sa = ort.InferenceSession(str(old_model), so, providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(str(new_model), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sb.get_inputs()]
    if len(inputs) != len(names) or [i.name for i in sa.get_inputs()] != names:
        return  # the two models take different inputs: nothing to compare them on
    feed = dict(zip(names, inputs))
    ya, yb = sa.run(None, feed)[0], sb.run(None, feed)[0]
    if ya.shape == yb.shape and ya.ndim >= 2:
        rep.agreement = round(float((ya.argmax(-1) == yb.argmax(-1)).mean()), 6)
        rep.golden_samples = int(ya.shape[0])
    one = {k: v[:1] for k, v in feed.items()}
    rep.latency_ms = {"old": round(_median_ms(sa, one, runs), 4), "new": round(_median_ms(sb, one, runs), 4)}


def diff_bundles(old: str | Path, new: str | Path, trust: Any, *, runs: int = 20) -> BundleDiff:
    """Verify and compare two full bundles (``trust``: the board's TrustRoot)."""
    from device_agent.bundle import extract, open_bundle

    from .errors import UsageError
    old, new = Path(old), Path(new)
    va, vb = open_bundle(old, trust), open_bundle(new, trust)
    if "delta" in (va.kind, vb.kind):
        raise UsageError("diff compares two full bundles; a delta holds patches, not files: diff the full "
                         "bundles it was made from")
    rep = BundleDiff(old=_summary(va, old), new=_summary(vb, new))
    with tempfile.TemporaryDirectory(prefix="edgepack-diff-") as td:
        da, db = Path(td) / "old", Path(td) / "new"
        extract(va, da)
        extract(vb, db)
        ra, rb = _roles(va), _roles(vb)
        ma = [p for p, r in ra.items() if r == "model" and p.endswith(".onnx")]
        mb = [p for p, r in rb.items() if r == "model" and p.endswith(".onnx")]
        if len(ma) == 1 and len(mb) == 1 and ma != mb:  # one model each: the same role, paired across a rename
            same = (da / ma[0]).read_bytes() == (db / mb[0]).read_bytes()
            rep.files.append(FileChange(path=f"{ma[0]} -> {mb[0]}", role="model", change="same" if same else "changed",
                                        old_bytes=(da / ma[0]).stat().st_size, new_bytes=(db / mb[0]).stat().st_size))
            ra, rb = {k: v for k, v in ra.items() if k != ma[0]}, {k: v for k, v in rb.items() if k != mb[0]}
        for p in sorted(ra.keys() | rb.keys()):
            fa, fb = da / p, db / p
            a_b = fa.stat().st_size if p in ra else None
            b_b = fb.stat().st_size if p in rb else None
            ch = ("added" if p not in ra else "removed" if p not in rb else
                  "same" if fa.read_bytes() == fb.read_bytes() else "changed")
            rep.files.append(FileChange(path=p, role=rb.get(p) or ra.get(p, ""), change=ch, old_bytes=a_b,
                                        new_bytes=b_b))
        if len(ma) == 1 and len(mb) == 1:  # one model each: paired whatever its file name
            t, same = _tensors(da / ma[0], db / mb[0], mb[0])
            rep.tensors, rep.tensors_same = t, same
            gold = next((db / p for p, r in _roles(vb).items() if r == "golden"), None)
            if gold is not None:
                _behaviour(rep, da / ma[0], db / mb[0], gold, runs)
    return rep


__all__ = ["diff_bundles", "BundleDiff", "FileChange", "TensorChange"]
