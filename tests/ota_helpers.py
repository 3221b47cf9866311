"""Shared helpers for the OTA tests: a tmp-dir "simulator" of keys, bundles and a board.

Fast and offline: keys are generated per test session, models are tiny ONNX graphs built with
onnx.helper, and time is passed explicitly (no sleeps).
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from device_agent.trust import TrustRoot
from edgepack.ota import keys as K

# The test PKI is signed "yesterday at midnight UTC", not at a fixed date: a fixed date turns into a
# time bomb once the real clock passes the release-key list's one-year lifetime.
NOW = (dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
       - dt.timedelta(days=1))


def make_onnx(path: Path, *, seed: int = 0, hidden: int = 64, drift: float = 0.0, int8: bool = False,
              extra_tensor: bool = False) -> Path:
    """A small MLP: x[1,32] -> MatMul W1 -> Relu -> MatMul W2. ``drift`` perturbs weights (fine-tune)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((32, hidden)).astype(np.float32)
    w2 = rng.standard_normal((hidden, 10)).astype(np.float32)
    if drift:
        r2 = np.random.default_rng(seed + 1000)
        w1 = w1 + drift * r2.standard_normal(w1.shape).astype(np.float32)
        w2 = w2 + drift * r2.standard_normal(w2.shape).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
    if int8:
        inits.append(numpy_helper.from_array(np.clip(np.round(w1 * 40), -127, 127).astype(np.int8), "Q1"))
    if extra_tensor:
        inits.append(numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "EXTRA"))
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def make_golden(path: Path) -> Path:
    rng = np.random.default_rng(1)
    np.savez(path, inputs_x=rng.standard_normal((2, 1, 32)).astype(np.float32),
             outputs_y=rng.standard_normal((2, 1, 10)).astype(np.float32), labels=np.array([1, 2]))
    return path


@dataclass
class Pki:
    """Root keys (2 of 3), two release keys, the docs, and a board's trust root."""

    dir: Path
    root_keys: list[K.SigningKey]
    release: list[K.SigningKey]
    root_doc: dict[str, Any]
    rk_doc: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def board_trust(self, with_keys: bool = False) -> TrustRoot:
        return TrustRoot.from_bytes(self.root_doc, self.rk_doc if with_keys else None)


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    root_path, root_keys = K.init_root(d / "root", count=3, threshold=2)
    rel = [K.generate_key(d / f"release-{i}.key") for i in range(2)]
    root_doc = K.read_doc(root_path)
    rk_doc = K.make_release_keys(root_doc, root_keys[:2], [r.public_raw for r in rel], version=1, now=NOW)
    return Pki(d, root_keys, rel, root_doc, rk_doc)


def build(pki: Pki, out: Path, model: Path, *, release: int = 1, targets=("rpi4-2gb",), signer=None,
          rk_doc=None, roots=None, now=NOW, expires_days: float = 90, settings=None, golden=None, **kw):
    from edgepack.ota.bundle import build_bundle
    return build_bundle(out, models=[model], name="mlp", release=release, version=f"1.{release}.0",
                        targets=list(targets), signer=signer or pki.release[0],
                        release_keys_doc=rk_doc or pki.rk_doc, roots=roots or [pki.root_doc],
                        settings=settings if settings is not None else {"runtime": "onnxruntime", "threads": 2},
                        golden=golden, now=now, expires_days=expires_days, **kw)


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*")) if d.exists() else []


def read_json(p: Path) -> Any:
    return json.loads(p.read_text())


# --------------------------------------------------------------------------- crafting hostile bundles
def split_bundle(path: Path) -> tuple[Any, dict[str, Any], list[bytes]]:
    """(header, manifest dict, frames) of an existing bundle, without verifying it."""
    from device_agent.wire.header import read_header
    with open(path, "rb") as f:
        hdr = read_header(f)
        m = json.loads(hdr.manifest_bytes)
        frames = [f.read(fe["transport_length"]) for fe in m["files"]]
    return hdr, m, frames


def assemble(out: Path, *, trust: dict, manifest: dict | bytes, signers, frames: list[bytes], tail: bytes = b"",
             doc_type: str | None = None, fmt_version: int = 1) -> Path:
    """Write a container with arbitrary (possibly hostile, but properly signed) content."""
    import struct
    from device_agent.wire.encoding import canonical_json
    from device_agent.wire import MAGIC
    from device_agent.trust import MANIFEST_TYPE
    mbytes = manifest if isinstance(manifest, bytes) else canonical_json(manifest)
    sigs = canonical_json([s.sign(doc_type or MANIFEST_TYPE, mbytes) for s in signers])
    tb = canonical_json(trust)
    with open(out, "wb") as f:
        f.write(MAGIC + struct.pack(">HH", fmt_version, 0))
        for sec in (tb, mbytes, sigs):
            f.write(struct.pack(">I", len(sec)) + sec)
        for fr in frames:
            f.write(fr)
        f.write(tail)
    return out


def resign(src: Path, out: Path, signer, mutate=None, frames=None, trust=None, tail: bytes = b"") -> Path:
    """Copy ``src`` with a mutated manifest / frames / trust section, signed again by ``signer``."""
    hdr, m, fr = split_bundle(src)
    if mutate:
        m = mutate(m) or m
    return assemble(out, trust=hdr.trust if trust is None else trust, manifest=m, signers=[signer],
                    frames=fr if frames is None else frames, tail=tail)
