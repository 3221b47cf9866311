"""Fuzz the parser: any mutation of a bundle is either refused with an OtaError or (if it did not
change a signed/hashed byte) accepted; never another exception, never a half-written file.

A bounded number of examples runs in CI; scripts/fuzz_bundle.py runs the same properties longer.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from device_agent import bundle as B
from device_agent.wire.streams import FrameReader
from device_agent.delta_apply import iter_tensor_delta
from device_agent.errors import OtaError
from edgepack.ota.delta import make_delta_bundle

from ota_helpers import NOW, build, make_onnx, make_pki, split_bundle

EXAMPLES = int(os.environ.get("EDGEPACK_FUZZ_EXAMPLES", "150"))
_CACHE: dict = {}


def corpus() -> dict:
    """Built once per process (hypothesis does not mix with function-scoped fixtures)."""
    if not _CACHE:
        d = Path(tempfile.mkdtemp(prefix="edgepack-fuzz-"))
        pki = make_pki(d / "pki")
        (d / "a").mkdir(), (d / "b").mkdir()
        m1 = make_onnx(d / "a" / "m.onnx", hidden=64)
        m2 = make_onnx(d / "b" / "m.onnx", hidden=64, drift=0.01)
        b1 = build(pki, d / "1.bundle", m1, release=1).path
        b2 = build(pki, d / "2.bundle", m2, release=2).path
        delta = make_delta_bundle(b1, b2, d / "d.bundle", trust=pki.board_trust(), signer=pki.release[0], now=NOW).path
        slot = d / "slot"
        B.extract(B.open_bundle(b1, pki.board_trust(), now=NOW), slot)
        hdr, m, fr = split_bundle(delta)
        patch = next(f for f, e in zip(fr, m["files"]) if e["encoding"] == "tensor-delta")
        _CACHE.update(d=d, pki=pki, full=b1.read_bytes(), delta=delta.read_bytes(), slot=slot, patch=patch,
                      m1=m1, m2_len=m2.stat().st_size)
    return _CACHE


def check_mutant(data: bytes, original: bytes) -> None:
    c = corpus()
    with tempfile.TemporaryDirectory(dir=c["d"]) as td:
        p = Path(td) / "x.bundle"
        p.write_bytes(data)
        dest = Path(td) / "dest"
        try:
            vm = B.open_bundle(p, c["pki"].board_trust(), now=NOW)
            B.extract(vm, dest, base_dir=c["slot"])
        except OtaError:
            assert not dest.exists()
            return
        # accepted: only possible if no authenticated byte changed
        assert data == original or dest.exists()


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**9), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**9), st.integers(1, 64)),
)


def mutate(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for kind, pos, val in muts:
        if not b:
            break
        i = pos % len(b)
        if kind == "flip":
            b[i] ^= val
        elif kind == "truncate":
            del b[i:]
        elif kind == "insert":
            b[i:i] = bytes([val])
        else:
            del b[i:i + val]
    return bytes(b)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation, min_size=1, max_size=4), st.booleans())
def test_fuzz_mutated_bundles(muts, use_delta):
    c = corpus()
    orig = c["delta"] if use_delta else c["full"]
    check_mutant(mutate(orig, muts), orig)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    check_mutant(b"EPBUNDLE" + data, b"")
    check_mutant(data, b"")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_tensor_patch_parser(muts):
    """The patch decoder itself (normally shielded by the signed transport hash) is robust too."""
    c = corpus()
    patch = mutate(c["patch"], muts)
    fr = FrameReader(io.BytesIO(patch), len(patch), "patch")
    with open(c["slot"] / "m.onnx", "rb") as base:
        try:
            for _ in iter_tensor_delta(fr, base, (c["slot"] / "m.onnx").stat().st_size, c["m2_len"], "patch"):
                pass
        except OtaError:
            pass


def test_zstd_size_past_end_of_frame_is_refused_not_looped():
    """Regression (found by scripts/fuzz_bundle.py): an op declaring more compressed bytes than the
    payload holds used to spin forever; it must be a MalformedBundle/MalformedPatch."""
    from backports import zstd
    from device_agent.wire.streams import zstd_stream
    from device_agent.errors import MalformedBundle
    data = zstd.compress(b"x" * 1000)[:-3]
    fr = FrameReader(io.BytesIO(data), len(data), "frame")
    with pytest.raises(MalformedBundle):
        for _ in zstd_stream(fr, len(data) + 100, 1000, "frame"):
            pass
