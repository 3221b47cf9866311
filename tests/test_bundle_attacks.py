"""The attack and fault suite (modelled on TUF's attack classes).

Every case must be refused with its own named error, and ``extract`` must leave nothing behind:
no destination directory, no staging files.
"""
from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from device_agent import bundle as B
from device_agent.errors import (AgentTooOld, BaseMismatch, ExpiredError, HashMismatch, LengthExceeded,
                                 MalformedBundle, MalformedPatch, NotABundle, OtaError, RevokedKey, RollbackError,
                                 RootRotationError, SignatureError, TargetMismatch, ThresholdNotMet, TruncatedBundle,
                                 UnsupportedFormat)
from edgepack.ota import keys as K
from edgepack.ota.delta import make_delta_bundle

from ota_helpers import NOW, assemble, build, files_in, make_golden, make_onnx, make_pki, resign, split_bundle


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("attacks")
    pki = make_pki(d / "pki")
    golden = make_golden(d / "golden.npz")
    (d / "r1").mkdir()
    (d / "r2").mkdir()
    m1 = make_onnx(d / "r1" / "mlp.onnx", hidden=96)
    m2 = make_onnx(d / "r2" / "mlp.onnx", hidden=96, drift=0.01)
    b1 = build(pki, d / "r1.bundle", m1, release=1, golden=golden).path
    b2 = build(pki, d / "r2.bundle", m2, release=2, golden=golden).path
    # two releases of an incompressible .tflite of equal size: equal frame lengths, for mix-and-match
    (d / "t1").mkdir(), (d / "t2").mkdir()
    (d / "t1" / "m.tflite").write_bytes(os.urandom(4096))
    (d / "t2" / "m.tflite").write_bytes(os.urandom(4096))
    t1 = build(pki, d / "t1.bundle", d / "t1" / "m.tflite", release=1).path
    t2 = build(pki, d / "t2.bundle", d / "t2" / "m.tflite", release=2).path
    delta = make_delta_bundle(b1, b2, d / "d12.bundle", trust=pki.board_trust(), signer=pki.release[0], now=NOW).path
    slot1 = d / "slot1"
    B.extract(B.open_bundle(b1, pki.board_trust(), now=NOW), slot1)
    return dict(d=d, pki=pki, b1=b1, b2=b2, t1=t1, t2=t2, delta=delta, slot1=slot1, m1=m1, m2=m2, golden=golden)


def refuse(path, trust, exc, tmp_path, *, now=NOW, base_dir=None, match=None, **kw):
    """The bundle must fail with ``exc`` whether opened, verified or extracted, and write nothing."""
    dest = tmp_path / "dest"
    with pytest.raises(exc, match=match):
        vm = B.open_bundle(path, trust, now=now, **kw)
        B.extract(vm, dest, base_dir=base_dir)
    assert not dest.exists(), files_in(dest)


def ok(path, trust, tmp_path, **kw):
    vm = B.open_bundle(path, trust, now=kw.pop("now", NOW), **kw)
    B.verify_payloads(vm)
    return vm


def flip(src: Path, dst: Path, pos: int) -> Path:
    data = bytearray(src.read_bytes())
    data[pos] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def test_good_bundle_passes(env, tmp_path):
    vm = ok(env["b1"], env["pki"].board_trust(), tmp_path, target="rpi4-2gb", min_release=1)
    assert vm.release == 1 and vm.signed_by == (env["pki"].release[0].keyid,)


# ---------------------------------------------------------------- signatures
def test_missing_signature(env, tmp_path):
    hdr, m, fr = split_bundle(env["b1"])
    p = assemble(tmp_path / "x.bundle", trust=hdr.trust, manifest=m, signers=[], frames=fr)
    refuse(p, env["pki"].board_trust(), SignatureError, tmp_path, match="not signed")


def test_bad_signature_bytes(env, tmp_path):
    data = bytearray(env["b1"].read_bytes())
    hdr, _, _ = split_bundle(env["b1"])
    sigs = json.dumps([{"keyid": k, "sig": s.hex()} for k, s in hdr.signatures])
    i = data.find(hdr.signatures[0][1].hex().encode())
    data[i] = ord("0") if data[i] != ord("0") else ord("1")
    p = tmp_path / "x.bundle"
    p.write_bytes(bytes(data))
    refuse(p, env["pki"].board_trust(), SignatureError, tmp_path, match="bad")


def test_signed_by_unknown_key(env, tmp_path):
    stranger = K.generate_key(tmp_path / "stranger.key")
    p = resign(env["b1"], tmp_path / "x.bundle", stranger)
    refuse(p, env["pki"].board_trust(), SignatureError, tmp_path, match="not in release-key list")


def test_signed_by_root_key_instead_of_release_key(env, tmp_path):
    p = resign(env["b1"], tmp_path / "x.bundle", env["pki"].root_keys[0])
    refuse(p, env["pki"].board_trust(), SignatureError, tmp_path)


def test_wrong_key_claims_listed_key_id(env, tmp_path):
    """Signature made by a stranger but labelled with a listed release key's id."""
    stranger = K.generate_key(tmp_path / "stranger.key")
    hdr, m, fr = split_bundle(env["b1"])
    from device_agent.wire.encoding import canonical_json
    from device_agent.trust import MANIFEST_TYPE
    sig = stranger.sign(MANIFEST_TYPE, canonical_json(m))
    sig["keyid"] = env["pki"].release[0].keyid
    p = assemble(tmp_path / "x.bundle", trust=hdr.trust, manifest=m, signers=[], frames=fr)
    data = p.read_bytes().replace(b"[]", canonical_json([sig]), 1)
    import struct
    # rebuild properly: write the signature section by hand
    from device_agent.wire import MAGIC
    tb, mb, sb = canonical_json(hdr.trust), canonical_json(m), canonical_json([sig])
    p.write_bytes(MAGIC + struct.pack(">HH", 1, 0) + b"".join(struct.pack(">I", len(s)) + s for s in (tb, mb, sb))
                  + b"".join(fr))
    refuse(p, env["pki"].board_trust(), SignatureError, tmp_path)


@pytest.mark.parametrize("where", [0, 0.25, 0.5, 0.75, -1])
def test_flipped_manifest_byte(env, tmp_path, where):
    hdr, _, _ = split_bundle(env["b1"])
    start = env["b1"].read_bytes().find(hdr.manifest_bytes)
    n = len(hdr.manifest_bytes)
    pos = start + (n - 1 if where == -1 else int(n * where))
    p = flip(env["b1"], tmp_path / "x.bundle", pos)
    refuse(p, env["pki"].board_trust(), SignatureError, tmp_path)


@pytest.mark.parametrize("frame", [0, 1, 2])
@pytest.mark.parametrize("where", [0, 0.5, -1])
def test_flipped_payload_byte(env, tmp_path, frame, where):
    hdr, m, fr = split_bundle(env["b1"])
    off = hdr.payload_offset + sum(len(f) for f in fr[:frame])
    n = len(fr[frame])
    pos = off + (n - 1 if where == -1 else int(n * where))
    p = flip(env["b1"], tmp_path / "x.bundle", pos)
    refuse(p, env["pki"].board_trust(), HashMismatch, tmp_path)


def test_flipped_trust_section_byte(env, tmp_path):
    data = env["b1"].read_bytes()
    pos = data.find(b'"sig":"') + 10  # inside a root signature over the embedded key list
    while not chr(data[pos]).isdigit():  # keep it hex: a well-formed but wrong signature
        pos += 1
    p = flip(env["b1"], tmp_path / "x.bundle", pos)
    refuse(p, env["pki"].board_trust(), ThresholdNotMet, tmp_path)


# ---------------------------------------------------------------- policy
def test_rollback_to_older_release(env, tmp_path):
    refuse(env["b1"], env["pki"].board_trust(), RollbackError, tmp_path, min_release=2)


def test_expired_manifest_freeze(env, tmp_path):
    refuse(env["b1"], env["pki"].board_trust(), ExpiredError, tmp_path, now=NOW + dt.timedelta(days=91))


def test_wrong_target(env, tmp_path):
    refuse(env["b1"], env["pki"].board_trust(), TargetMismatch, tmp_path, target="jetson-orin")


def test_agent_too_old(env, tmp_path):
    p = resign(env["b1"], tmp_path / "x.bundle", env["pki"].release[0],
               mutate=lambda m: m.update(min_agent_version="9.0.0"))
    refuse(p, env["pki"].board_trust(), AgentTooOld, tmp_path)


def test_release_key_list_rollback_in_bundle_is_ignored_and_revocation_holds(env, tmp_path):
    """Board knows list v2 (release key 0 revoked); an old bundle carrying list v1 is refused."""
    pki = env["pki"]
    v2 = K.revoke(pki.rk_doc, pki.root_doc, pki.root_keys[:2], [pki.release[0].keyid])
    board = pki.board_trust().update_release_keys(v2)
    refuse(env["b1"], board, RevokedKey, tmp_path)


def test_revoked_key_with_new_list_in_bundle(env, tmp_path):
    """A bundle that itself carries the revocation cannot be signed by the revoked key."""
    pki = env["pki"]
    v2 = K.revoke(pki.rk_doc, pki.root_doc, pki.root_keys[:2], [pki.release[0].keyid])
    hdr, m, fr = split_bundle(env["b1"])
    p = assemble(tmp_path / "x.bundle", trust={"roots": [], "release_keys": v2}, manifest=m,
                 signers=[pki.release[0]], frames=fr)
    refuse(p, pki.board_trust(), RevokedKey, tmp_path)
    p2 = assemble(tmp_path / "y.bundle", trust={"roots": [], "release_keys": v2}, manifest=m,
                  signers=[pki.release[1]], frames=fr)
    vm = ok(p2, pki.board_trust(), tmp_path)
    assert vm.trust.release_keys.version == 2  # the agent persists the new list


def test_embedded_key_list_below_root_threshold(env, tmp_path):
    pki = env["pki"]
    weak = K.make_release_keys(pki.root_doc, pki.root_keys[:1], [pki.release[1].public_raw], version=5, check=False)
    hdr, m, fr = split_bundle(env["b1"])
    p = assemble(tmp_path / "x.bundle", trust={"roots": [], "release_keys": weak}, manifest=m,
                 signers=[pki.release[1]], frames=fr)
    refuse(p, pki.board_trust(), ThresholdNotMet, tmp_path)


def test_key_rotation_in_bundle_done_right(env, tmp_path):
    """Root v2 + a list signed by it travel in the bundle; a board flashed with v1 follows."""
    pki = env["pki"]
    new = [K.generate_key(tmp_path / f"n{i}.key") for i in range(3)]
    v2 = K.rotate_root(pki.root_doc, pki.root_keys[:2], new, new[:2], 2)
    rel = K.generate_key(tmp_path / "rel.key")
    rk = K.make_release_keys(v2, new[1:], [rel.public_raw], version=2, now=NOW)
    p = build(pki, tmp_path / "x.bundle", env["m1"], signer=rel, rk_doc=rk, roots=[pki.root_doc, v2]).path
    vm = ok(p, pki.board_trust(with_keys=True), tmp_path)
    assert vm.trust.root.version == 2 and vm.trust.release_keys.version == 2
    # ...and the old release key no longer works for a board that learned the rotation
    refuse(env["b2"], vm.trust, (SignatureError, ThresholdNotMet), tmp_path)


def test_key_rotation_in_bundle_done_wrong(env, tmp_path):
    pki = env["pki"]
    new = [K.generate_key(tmp_path / f"n{i}.key") for i in range(3)]
    bad_v2 = K.make_root(new, 2, new, version=2)  # not signed by the old root
    hdr, m, fr = split_bundle(env["b1"])
    p = assemble(tmp_path / "x.bundle", trust={"roots": [bad_v2], "release_keys": None}, manifest=m,
                 signers=[pki.release[0]], frames=fr)
    refuse(p, pki.board_trust(with_keys=True), ThresholdNotMet, tmp_path)
    v3 = K.make_root(new, 2, [*pki.root_keys, *new], version=3)
    p = assemble(tmp_path / "y.bundle", trust={"roots": [v3], "release_keys": None}, manifest=m,
                 signers=[pki.release[0]], frames=fr)
    refuse(p, pki.board_trust(with_keys=True), RootRotationError, tmp_path)


# ---------------------------------------------------------------- payload integrity
def test_mix_and_match_payload_from_other_release(env, tmp_path):
    _, _, fr2 = split_bundle(env["t2"])
    hdr, m, fr1 = split_bundle(env["t1"])
    assert len(fr1[0]) == len(fr2[0])
    data = env["t1"].read_bytes()
    p = tmp_path / "x.bundle"
    p.write_bytes(data[:hdr.payload_offset] + fr2[0] + b"".join(fr1[1:]))
    refuse(p, env["pki"].board_trust(), HashMismatch, tmp_path)


def test_mix_and_match_manifest_from_other_release(env, tmp_path):
    """Release 2's signed header in front of release 1's payloads."""
    hdr2, _, _ = split_bundle(env["t2"])
    hdr1, _, fr1 = split_bundle(env["t1"])
    d2 = env["t2"].read_bytes()
    p = tmp_path / "x.bundle"
    p.write_bytes(d2[:hdr2.payload_offset] + b"".join(fr1))
    refuse(p, env["pki"].board_trust(), HashMismatch, tmp_path)


def test_trailing_data_endless(env, tmp_path):
    p = tmp_path / "x.bundle"
    p.write_bytes(env["b1"].read_bytes() + b"\0" * 4096)
    refuse(p, env["pki"].board_trust(), LengthExceeded, tmp_path, match="past its declared end")


def test_payload_decompresses_past_signed_length(env, tmp_path):
    """A signed (but hostile) manifest understating a length: the decoder stops at the limit."""
    p = resign(env["b1"], tmp_path / "x.bundle", env["pki"].release[0],
               mutate=lambda m: _understate(m, 0, 1000))
    refuse(p, env["pki"].board_trust(), LengthExceeded, tmp_path)


def _understate(m, i, n):
    from device_agent.wire.manifest import content_digest
    m["files"][i]["length"] = n
    m["content_sha256"] = content_digest([(f["path"], f["length"], f["sha256"]) for f in m["files"]])


@pytest.mark.parametrize("cut", [4, 20, "manifest", "payload", -1])
def test_truncated_bundle(env, tmp_path, cut):
    data = env["b1"].read_bytes()
    hdr, _, _ = split_bundle(env["b1"])
    n = {"manifest": data.find(hdr.manifest_bytes) + 10, "payload": hdr.payload_offset + 100,
         -1: len(data) - 1}.get(cut, cut)
    p = tmp_path / "x.bundle"
    p.write_bytes(data[:n])
    refuse(p, env["pki"].board_trust(), TruncatedBundle, tmp_path)


def test_not_a_bundle(env, tmp_path):
    refuse(env["m1"], env["pki"].board_trust(), NotABundle, tmp_path)
    refuse(tmp_path / "missing.bundle", env["pki"].board_trust(), NotABundle, tmp_path)


def test_newer_format_version(env, tmp_path):
    data = bytearray(env["b1"].read_bytes())
    data[9] = 2
    p = tmp_path / "x.bundle"
    p.write_bytes(bytes(data))
    refuse(p, env["pki"].board_trust(), UnsupportedFormat, tmp_path)


@pytest.mark.parametrize("bad", ["../evil", "a/b", ".hidden", ""])
def test_signed_manifest_with_unsafe_path(env, tmp_path, bad):
    def mutate(m):
        m["files"][0]["path"] = bad
    p = resign(env["b1"], tmp_path / "x.bundle", env["pki"].release[0], mutate=mutate)
    refuse(p, env["pki"].board_trust(), MalformedBundle, tmp_path)


def test_signed_manifest_with_duplicate_keys(env, tmp_path):
    hdr, m, fr = split_bundle(env["b1"])
    from device_agent.wire.encoding import canonical_json
    raw = canonical_json(m)
    raw = raw[:-1] + b',"release":99}'
    p = assemble(tmp_path / "x.bundle", trust=hdr.trust, manifest=raw, signers=[env["pki"].release[0]], frames=fr)
    refuse(p, env["pki"].board_trust(), MalformedBundle, tmp_path, match="duplicate")


def test_header_section_too_large(env, tmp_path):
    import struct
    data = bytearray(env["b1"].read_bytes())
    data[12:16] = struct.pack(">I", 1 << 30)
    p = tmp_path / "x.bundle"
    p.write_bytes(bytes(data))
    refuse(p, env["pki"].board_trust(), MalformedBundle, tmp_path, match="max")


# ---------------------------------------------------------------- deltas
def test_delta_applies_on_right_base(env, tmp_path):
    vm = B.open_bundle(env["delta"], env["pki"].board_trust(), now=NOW, min_release=2)
    out = B.extract(vm, tmp_path / "slot2", base_dir=env["slot1"])
    assert (tmp_path / "slot2" / "mlp.onnx").read_bytes() == env["m2"].read_bytes()
    assert len(out) == 3


def test_delta_on_wrong_base(env, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in env["slot1"].iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    (wrong / "mlp.onnx").write_bytes(env["m2"].read_bytes())  # board already on release 2's model
    refuse(env["delta"], env["pki"].board_trust(), BaseMismatch, tmp_path, base_dir=wrong)


def test_delta_without_base(env, tmp_path):
    refuse(env["delta"], env["pki"].board_trust(), BaseMismatch, tmp_path, base_dir=tmp_path / "empty")
    refuse(env["delta"], env["pki"].board_trust(), BaseMismatch, tmp_path, base_dir=None)


def test_delta_base_file_changed_on_disk(env, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for f in env["slot1"].iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    flip(base / "mlp.onnx", base / "mlp.onnx", 100)
    refuse(env["delta"], env["pki"].board_trust(), BaseMismatch, tmp_path, base_dir=base)


def test_signed_hostile_patch_is_contained(env, tmp_path):
    """A validly signed delta whose patch reads outside the base: MalformedPatch, nothing written."""
    hdr, m, fr = split_bundle(env["delta"])
    import struct
    from device_agent.wire.encoding import canonical_json, sha256_hex
    i = next(k for k, f in enumerate(m["files"]) if f["encoding"] == "tensor-delta")
    patch = fr[i]
    from backports import zstd
    hcomp, hlen = struct.unpack(">II", patch[8:16])
    ph = json.loads(zstd.decompress(patch[16:16 + hcomp]))
    ph["glue"]["base_spans"][0] = [10**9, 10]
    nh = canonical_json(ph)
    nc = zstd.compress(nh)
    patch = patch[:8] + struct.pack(">II", len(nc), len(nh)) + nc + patch[16 + hcomp:]
    fr[i] = patch
    m["files"][i]["transport_length"] = len(patch)
    m["files"][i]["transport_sha256"] = sha256_hex(patch)
    p = assemble(tmp_path / "x.bundle", trust=hdr.trust, manifest=m, signers=[env["pki"].release[0]], frames=fr)
    refuse(p, env["pki"].board_trust(), MalformedPatch, tmp_path, base_dir=env["slot1"])


def test_all_errors_are_ota_errors():
    for exc in (SignatureError, RevokedKey, ThresholdNotMet, RollbackError, ExpiredError, TargetMismatch,
                LengthExceeded, TruncatedBundle, BaseMismatch, HashMismatch, NotABundle, MalformedPatch):
        assert issubclass(exc, OtaError)
