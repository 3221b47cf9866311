"""Trust root: root threshold, release-key lists, revocation, root rotation, key files."""
from __future__ import annotations

import os

import pytest

from device_agent.errors import (ExpiredError, KeyFileError, LoosePermissions, MalformedBundle, RevokedKey,
                                 RollbackError, RootRotationError, SignatureError, ThresholdNotMet)
from device_agent.trust import MANIFEST_TYPE, TrustRoot
from edgepack.ota import keys as K

from ota_helpers import NOW, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_root_loads_and_lists_release_keys(pki):
    tr = pki.board_trust(with_keys=True)
    assert tr.root.threshold == 2 and len(tr.root.keys) == 3
    assert set(tr.release_keys.keys) == {k.keyid for k in pki.release}


def test_release_key_list_below_root_threshold_is_refused(pki):
    doc = K.make_release_keys(pki.root_doc, pki.root_keys[:1], [pki.release[0].public_raw], version=2, check=False)
    with pytest.raises(ThresholdNotMet, match="needs 2"):
        pki.board_trust().update_release_keys(doc)


def test_release_key_list_signed_twice_by_same_root_key_counts_once(pki):
    doc = K.make_release_keys(pki.root_doc, pki.root_keys[:1], [pki.release[0].public_raw], version=2, check=False)
    doc["signatures"] = doc["signatures"] * 2
    with pytest.raises(ThresholdNotMet):
        pki.board_trust().update_release_keys(doc)


def test_release_key_list_signed_by_release_key_is_refused(pki):
    doc = K.make_release_keys(pki.root_doc, pki.release, [pki.release[0].public_raw], version=2, check=False)
    with pytest.raises(ThresholdNotMet):
        pki.board_trust().update_release_keys(doc)


def test_tampered_release_key_list_is_refused(pki):
    doc = K.make_release_keys(pki.root_doc, pki.root_keys[:2], [pki.release[0].public_raw], version=2)
    doc["signed"]["threshold"] = 1
    doc["signed"]["keys"].update(K.make_release_keys(pki.root_doc, pki.root_keys[:2], [pki.release[1].public_raw],
                                                     version=2)["signed"]["keys"])
    with pytest.raises(ThresholdNotMet):
        pki.board_trust().update_release_keys(doc)


def test_self_signed_root_below_threshold_is_refused(pki):
    doc = K.make_root(pki.root_keys, 2, pki.root_keys[:1])
    with pytest.raises(ThresholdNotMet):
        TrustRoot.from_bytes(doc)


def test_release_key_list_rollback_is_refused(pki):
    v2 = K.make_release_keys(pki.root_doc, pki.root_keys[:2], [pki.release[1].public_raw], version=2)
    tr = pki.board_trust(with_keys=True).update_release_keys(v2)
    with pytest.raises(RollbackError):
        tr.update_release_keys(pki.rk_doc)


def test_revoked_key_signature_is_refused(pki):
    v2 = K.revoke(pki.rk_doc, pki.root_doc, pki.root_keys[1:], [pki.release[0].keyid[:12]])
    tr = pki.board_trust(with_keys=True).update_release_keys(v2)
    payload = b"{}"
    sig = pki.release[0].sign(MANIFEST_TYPE, payload)
    with pytest.raises(RevokedKey):
        tr.verify_release_signatures(MANIFEST_TYPE, payload, [(sig["keyid"], bytes.fromhex(sig["sig"]))])
    sig1 = pki.release[1].sign(MANIFEST_TYPE, payload)
    assert tr.verify_release_signatures(MANIFEST_TYPE, payload, [(sig1["keyid"], bytes.fromhex(sig1["sig"]))])


def test_signature_for_other_document_type_is_refused(pki):
    """Domain separation: a release-key signature over bytes of one type never verifies as another."""
    tr = pki.board_trust(with_keys=True)
    sig = pki.release[0].sign("edgepack-release-keys", b"{}")
    with pytest.raises(SignatureError):
        tr.verify_release_signatures(MANIFEST_TYPE, b"{}", [(sig["keyid"], bytes.fromhex(sig["sig"]))])


def test_release_threshold_two_needs_two_signatures(pki):
    doc = K.make_release_keys(pki.root_doc, pki.root_keys[:2], [k.public_raw for k in pki.release], version=3,
                              threshold=2)
    tr = pki.board_trust().update_release_keys(doc)
    sigs = [pki.release[i].sign(MANIFEST_TYPE, b"m") for i in range(2)]
    parsed = [(s["keyid"], bytes.fromhex(s["sig"])) for s in sigs]
    with pytest.raises(SignatureError, match="needs 2"):
        tr.verify_release_signatures(MANIFEST_TYPE, b"m", parsed[:1])
    assert len(tr.verify_release_signatures(MANIFEST_TYPE, b"m", parsed)) == 2


def test_root_rotation_done_right(pki, tmp_path):
    new = [K.generate_key(tmp_path / f"n{i}.key") for i in range(3)]
    v2 = K.rotate_root(pki.root_doc, pki.root_keys[:2], new, new[:2], 2)
    tr = pki.board_trust(with_keys=True).update_root(v2)
    assert tr.root.version == 2 and set(tr.root.keys) == {k.keyid for k in new}
    assert tr.release_keys is None  # old list was signed by retired keys: wait for a new one
    rk = K.make_release_keys(v2, new[:2], [pki.release[1].public_raw], version=2)
    assert tr.update_release_keys(rk).release_keys.version == 2
    with pytest.raises(ThresholdNotMet):  # the old list is signed by retired root keys only
        tr.update_release_keys(pki.rk_doc)
    with pytest.raises(RollbackError):  # the floor survives the rotation
        tr.with_release_keys_floor(5).update_release_keys(rk)


def test_root_rotation_without_old_threshold_is_refused(pki, tmp_path):
    new = [K.generate_key(tmp_path / f"n{i}.key") for i in range(3)]
    bad = K.make_root(new, 2, new, version=2)  # the new keys vouch for themselves only
    with pytest.raises(ThresholdNotMet, match="old root"):
        pki.board_trust().update_root(bad)


def test_root_rotation_without_new_threshold_is_refused(pki, tmp_path):
    new = [K.generate_key(tmp_path / f"n{i}.key") for i in range(3)]
    bad = K.make_root(new, 2, pki.root_keys[:2], version=2)  # new keys never agreed
    with pytest.raises(ThresholdNotMet, match="own keys"):
        pki.board_trust().update_root(bad)


def test_root_rotation_skipping_a_version_is_refused(pki, tmp_path):
    new = [K.generate_key(tmp_path / f"n{i}.key") for i in range(2)]
    bad = K.make_root(new, 1, [*pki.root_keys[:2], *new], version=3)
    with pytest.raises(RootRotationError, match="one version at a time"):
        pki.board_trust().update_root(bad)


def test_expired_root_and_key_list_are_refused(pki):
    import datetime as dt
    tr = pki.board_trust(with_keys=True)
    with pytest.raises(ExpiredError, match="release-key list"):
        tr.check_fresh(NOW + dt.timedelta(days=400))
    with pytest.raises(ExpiredError, match="root"):
        tr.check_fresh(NOW + dt.timedelta(days=365 * 20))


def test_loose_private_key_permissions_are_refused(tmp_path):
    K.generate_key(tmp_path / "k.key")
    os.chmod(tmp_path / "k.key", 0o640)
    with pytest.raises(LoosePermissions, match="chmod 600"):
        K.load_signing_key(tmp_path / "k.key")


def test_new_key_is_0600_and_never_overwritten(tmp_path):
    k = K.generate_key(tmp_path / "k.key")
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    assert K.load_signing_key(tmp_path / "k.key").keyid == k.keyid
    with pytest.raises(KeyFileError, match="already exists"):
        K.generate_key(tmp_path / "k.key")


def test_private_key_never_in_repr(tmp_path):
    k = K.generate_key(tmp_path / "k.key")
    pem = (tmp_path / "k.key").read_text()
    body = "".join(pem.strip().splitlines()[1:-1])
    assert body not in repr(k) and k.keyid[:16] in repr(k)


def test_not_a_key_file(tmp_path):
    p = tmp_path / "x.key"
    p.write_text("hello")
    p.chmod(0o600)
    with pytest.raises(KeyFileError):
        K.load_signing_key(p)


def test_malformed_trust_document(pki):
    with pytest.raises(MalformedBundle):
        TrustRoot.from_bytes(b'{"signed": {"type": "edgepack-root"}, "signatures": []}')
    with pytest.raises(MalformedBundle, match="duplicate"):
        TrustRoot.from_bytes(b'{"signed": {}, "signed": {}, "signatures": []}')
