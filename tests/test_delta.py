"""Delta making (host) and applying (board): correctness, encodings chosen, fallbacks, memory."""
from __future__ import annotations

import io
import os
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from device_agent import bundle as B
from device_agent.wire.streams import FrameReader
from device_agent.delta_apply import (from_planes, iter_patch_from, iter_tensor_delta, sub_encode, to_planes,
                                      xor_encode)
from edgepack.ota.delta import make_delta_bundle, make_file_delta, onnx_tensor_spans

from ota_helpers import NOW, build, make_onnx, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def apply_file(patch: Path, base: Path, encoding: str, target_len: int) -> bytes:
    data = patch.read_bytes()
    fr = FrameReader(io.BytesIO(data), len(data), "patch")
    with open(base, "rb") as b:
        if encoding == "tensor-delta":
            it = iter_tensor_delta(fr, b, base.stat().st_size, target_len, "patch")
        else:
            it = iter_patch_from(fr, b, base.stat().st_size, target_len, len(data), "patch")
        return b"".join(it)


def test_byte_planes_roundtrip():
    rng = np.random.default_rng(0)
    for elem in (1, 2, 4, 8):
        raw = rng.integers(0, 256, 64 * elem, dtype=np.uint8).tobytes()
        assert from_planes(to_planes(raw, elem), elem) == raw
    a = rng.standard_normal(100).astype(np.float32)
    p = xor_encode(a.tobytes(), a.tobytes(), 4)
    assert p == bytes(400)
    assert sub_encode(a.tobytes(), a.tobytes(), 4) == bytes(400)


def test_onnx_spans_match_onnx_library(tmp_path):
    p = make_onnx(tmp_path / "m.onnx", hidden=32, int8=True)
    data = p.read_bytes()
    spans = {s.name: s for s in onnx_tensor_spans(data)}
    for t in onnx.load(str(p)).graph.initializer:
        s = spans[t.name]
        assert data[s.offset:s.offset + s.length] == t.raw_data
    assert spans["W1"].elem == 4 and spans["Q1"].elem == 1


@pytest.mark.parametrize("drift,int8", [(0.0, False), (1e-3, False), (0.05, True)])
def test_tensor_delta_roundtrip(tmp_path, drift, int8):
    old = make_onnx(tmp_path / "old.onnx", hidden=128, int8=int8)
    new = make_onnx(tmp_path / "new.onnx", hidden=128, drift=drift, int8=int8, extra_tensor=True)
    fd = make_file_delta(old, new, tmp_path / "p", try_patch_from=False)
    assert fd.encoding == "tensor-delta"
    assert apply_file(tmp_path / "p", old, fd.encoding, new.stat().st_size) == new.read_bytes()
    if drift == 0.0:
        assert fd.stats["copied"] == 2 and fd.stats["raw"] == 1  # W1, W2 copied; EXTRA is new


def test_unchanged_tensors_are_referenced(tmp_path):
    old = make_onnx(tmp_path / "old.onnx", hidden=512)
    m = onnx.load(str(old))
    m.graph.name = "renamed-graph"  # only the glue changes
    new = tmp_path / "new.onnx"
    onnx.save(m, str(new))
    fd = make_file_delta(old, new, tmp_path / "p", try_patch_from=False)
    assert fd.stats["copied"] == 2 and fd.size < 400
    assert apply_file(tmp_path / "p", old, fd.encoding, new.stat().st_size) == new.read_bytes()


def test_requantized_int8_prefers_difference(tmp_path):
    """Shifting int8 weights by a small amount: wrap-around difference beats XOR and raw."""
    old = make_onnx(tmp_path / "old.onnx", hidden=256, int8=True)
    m = onnx.load(str(old))
    for t in m.graph.initializer:
        if t.name == "Q1":
            a = numpy_helper.to_array(t).astype(np.int16)
            a = np.clip(a + np.random.default_rng(3).integers(-1, 2, a.shape), -128, 127).astype(np.int8)
            t.CopyFrom(numpy_helper.from_array(a, "Q1"))
    new = tmp_path / "new.onnx"
    onnx.save(m, str(new))
    fd = make_file_delta(old, new, tmp_path / "p", try_patch_from=False)
    assert fd.stats["sub"] == 1 and fd.stats["copied"] == 2
    assert apply_file(tmp_path / "p", old, fd.encoding, new.stat().st_size) == new.read_bytes()


def test_non_onnx_uses_patch_from(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    new = base[:50_000] + b"inserted bytes" + base[50_000:150_000] + base[160_000:]
    (tmp_path / "a.tflite").write_bytes(base)
    (tmp_path / "b.tflite").write_bytes(new)
    fd = make_file_delta(tmp_path / "a.tflite", tmp_path / "b.tflite", tmp_path / "p")
    assert fd.encoding == "zstd-patch-from" and fd.size < 2_000
    assert apply_file(tmp_path / "p", tmp_path / "a.tflite", fd.encoding, len(new)) == new


def test_delta_bundle_falls_back_to_full_when_not_smaller(pki, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "m.tflite").write_bytes(os.urandom(50_000))
    (tmp_path / "b" / "m.tflite").write_bytes(os.urandom(50_000))  # nothing in common
    b1 = build(pki, tmp_path / "1.bundle", tmp_path / "a" / "m.tflite", release=1).path
    b2 = build(pki, tmp_path / "2.bundle", tmp_path / "b" / "m.tflite", release=2,
               settings={"runtime": "tflite", "threads": 4}).path
    rep = make_delta_bundle(b1, b2, tmp_path / "d.bundle", trust=pki.board_trust(), signer=pki.release[0], now=NOW)
    assert rep.fallback and (tmp_path / "d.bundle").read_bytes() == b2.read_bytes()
    vm = B.open_bundle(tmp_path / "d.bundle", pki.board_trust(), now=NOW)
    assert vm.kind == "full"


def test_delta_bundle_rebuilds_every_file(pki, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    m1 = make_onnx(tmp_path / "a" / "m.onnx", hidden=256)
    m2 = make_onnx(tmp_path / "b" / "m.onnx", hidden=256, drift=1e-4)
    b1 = build(pki, tmp_path / "1.bundle", m1, release=1).path
    b2 = build(pki, tmp_path / "2.bundle", m2, release=2, settings={"runtime": "onnxruntime", "threads": 4}).path
    rep = make_delta_bundle(b1, b2, tmp_path / "d.bundle", trust=pki.board_trust(), signer=pki.release[0], now=NOW)
    assert not rep.fallback and rep.bundle_bytes < rep.full_bundle_bytes
    enc = {f["path"]: f["encoding"] for f in rep.files}
    assert enc["m.onnx"] == "tensor-delta"
    s1 = tmp_path / "s1"
    B.extract(B.open_bundle(b1, pki.board_trust(), now=NOW), s1)
    vm = B.open_bundle(tmp_path / "d.bundle", pki.board_trust(), now=NOW, min_release=2)
    assert vm.manifest.base_release == 1
    B.extract(vm, tmp_path / "s2", base_dir=s1)
    full = B.open_bundle(b2, pki.board_trust(), now=NOW)
    assert vm.manifest.content_sha256 == full.manifest.content_sha256  # same end state, signed
    B.extract(full, tmp_path / "s2full")
    for f in ("m.onnx", "settings.json"):
        assert (tmp_path / "s2" / f).read_bytes() == (tmp_path / "s2full" / f).read_bytes()


def test_delta_refuses_wrong_order_and_other_model(pki, tmp_path):
    from edgepack.errors import UsageError
    (tmp_path / "a").mkdir()
    m1 = make_onnx(tmp_path / "a" / "m.onnx")
    b1 = build(pki, tmp_path / "1.bundle", m1, release=3).path
    b2 = build(pki, tmp_path / "2.bundle", m1, release=2).path
    with pytest.raises(UsageError, match="higher"):
        make_delta_bundle(b1, b2, tmp_path / "d.bundle", trust=pki.board_trust(), signer=pki.release[0], now=NOW)
    assert not (tmp_path / "d.bundle").exists()


def test_apply_and_verify_stream_in_bounded_memory(pki, tmp_path):
    """A 24 MiB tensor: the board's delta apply and full verify stay well under the tensor size."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    m1 = make_onnx(tmp_path / "a" / "m.onnx", hidden=196608)
    m2 = make_onnx(tmp_path / "b" / "m.onnx", hidden=196608, drift=1e-3)
    b1 = build(pki, tmp_path / "1.bundle", m1, release=1, level=1).path
    b2 = build(pki, tmp_path / "2.bundle", m2, release=2, level=1).path
    make_delta_bundle(b1, b2, tmp_path / "d.bundle", trust=pki.board_trust(), signer=pki.release[0], now=NOW, level=1)
    s1 = tmp_path / "s1"
    B.extract(B.open_bundle(b1, pki.board_trust(), now=NOW), s1)
    tracemalloc.start()
    try:
        vm = B.open_bundle(tmp_path / "d.bundle", pki.board_trust(), now=NOW)
        B.extract(vm, tmp_path / "s2", base_dir=s1)
        _, peak_delta = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        B.verify_payloads(B.open_bundle(b2, pki.board_trust(), now=NOW))
        _, peak_full = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "s2" / "m.onnx").read_bytes() == m2.read_bytes()
    size = m2.stat().st_size
    assert size > 30 << 20
    assert peak_delta < 12 << 20, peak_delta  # constant: chunks, not tensors
    assert peak_full < 6 << 20, peak_full
