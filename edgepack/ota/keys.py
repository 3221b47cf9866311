"""Ed25519 key files and trust documents on the host: root keys, release keys, key lists.

Private keys are PKCS#8 PEM files created with mode 0600 (O_EXCL: never overwritten) and are
refused when group/other permission bits are set (``LoosePermissions``), like ssh does. Private
key material is never printed or put in exceptions; only key ids (SHA-256 of the public key).

Every document written here is verified with the board's own code (``device_agent.trust``)
before it is saved, so a document the host accepts is one a board accepts.
"""
from __future__ import annotations

import datetime as _dt
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_agent.wire.encoding import canonical_json, format_time, parse_json
from device_agent import durable
from device_agent.durable import utc_now
from device_agent.errors import KeyFileError, LoosePermissions, MalformedBundle
from device_agent.trust import (RELEASE_KEYS_TYPE, ROOT_TYPE, ReleaseKeys, Root, TrustRoot, key_id,
                                public_key_entry, signing_message)


@dataclass(frozen=True)
class SigningKey:
    """A loaded private key. ``repr`` shows only the key id."""

    keyid: str
    _key: Ed25519PrivateKey

    def __repr__(self) -> str:  # never leak key material into logs or tracebacks
        return f"SigningKey(keyid={self.keyid[:16]}…)"

    @property
    def public_raw(self) -> bytes:
        return self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, doc_type: str, payload: bytes) -> dict[str, str]:
        return {"keyid": self.keyid, "sig": self._key.sign(signing_message(doc_type, payload)).hex()}


def _raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        durable.write_new(path, data, mode=0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key (choose another path)") from None


def write_public(path: Path, public_raw: bytes) -> None:
    doc = {"keyid": key_id(public_raw), **public_key_entry(public_raw)}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def generate_key(path: str | Path) -> SigningKey:
    """Create a new Ed25519 key at ``path`` (0600) and its public half at ``path.pub``."""
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_private(path, pem)
    sk = SigningKey(keyid=key_id(_raw_public(key.public_key())), _key=key)
    write_public(pub_path(path), sk.public_raw)
    return sk


def pub_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + ".pub")


def load_signing_key(path: str | Path) -> SigningKey:
    """Load a private key; refuses files readable/writable by group or others."""
    path = Path(path)
    try:
        st = path.stat()
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from None
    if head.lstrip().startswith(b"{") or b"PUBLIC KEY" in head:
        priv = path.with_suffix("") if path.suffix == ".pub" else None
        raise KeyFileError(f"{path} is a public key; signing needs the private key"
                           + (f" ({priv}, without .pub)" if priv else " (the file `keys new-release-key` wrote "
                              "beside the .pub)"))
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise LoosePermissions(f"private key {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be "
                               f"accessible by group or others: run `chmod 600 {path}`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is not an unencrypted PEM private key; make one with "
                           "`edgepack keys new-release-key`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key; edgepack signs with Ed25519 only")
    return SigningKey(keyid=key_id(_raw_public(key.public_key())), _key=key)


def load_public_key(path: str | Path) -> bytes:
    """Raw public key from a ``.pub`` JSON file, a PEM public key, or (permissions checked) a private key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from None
    if data.lstrip().startswith(b"{"):
        try:
            doc = parse_json(data, str(path))
            raw = bytes.fromhex(doc["public"])
            Ed25519PublicKey.from_public_bytes(raw)
            return raw
        except (MalformedBundle, KeyError, ValueError, TypeError):
            raise KeyFileError(f"{path} is not an edgepack public key file") from None
    if b"PRIVATE KEY" in data:
        return load_signing_key(path).public_raw
    try:
        pub = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyFileError(f"{path} is not a public key (expected a .pub file from `edgepack keys`)") from None
    if not isinstance(pub, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return _raw_public(pub)


# --------------------------------------------------------------------------- trust documents
def _envelope(doc_type: str, signed: dict[str, Any], signers: Sequence[SigningKey]) -> dict[str, Any]:
    payload = canonical_json(signed)
    return {"signed": signed, "signatures": [k.sign(doc_type, payload) for k in signers]}


def _expiry(days: float, now: _dt.datetime | None) -> str:
    return format_time((now or utc_now()) + _dt.timedelta(days=days))


def write_doc(path: str | Path, doc: dict[str, Any]) -> None:
    """Write a trust document atomically (temp + fsync + rename)."""
    durable.atomic_write_json(path, doc)


def read_doc(path: str | Path) -> dict[str, Any]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror}") from None
    if not data.lstrip().startswith(b"{"):
        raise KeyFileError(f"{path} is not a trust document (the root.json or release-keys.json that "
                           "`edgepack keys` writes); check the path")
    doc = parse_json(data, str(path))
    if not isinstance(doc, dict):
        raise MalformedBundle(f"{path} is not a signed edgepack document")
    return doc


def make_root(keys: Sequence[SigningKey | bytes], threshold: int, signers: Sequence[SigningKey], *,
              version: int = 1, expires_days: float = 3650, now: _dt.datetime | None = None) -> dict[str, Any]:
    raws = [k.public_raw if isinstance(k, SigningKey) else k for k in keys]
    signed = {"type": ROOT_TYPE, "version": version, "threshold": threshold,
              "expires": _expiry(expires_days, now), "keys": {key_id(r): public_key_entry(r) for r in raws}}
    return _envelope(ROOT_TYPE, signed, signers)


def init_root(directory: str | Path, *, count: int = 3, threshold: int = 2,
              expires_days: float = 3650) -> tuple[Path, list[SigningKey]]:
    """Create ``count`` root keys and root.json v1 (signed by all of them) in ``directory``."""
    d = Path(directory)
    if not 1 <= threshold <= count:
        raise KeyFileError(f"threshold {threshold} must be between 1 and the key count {count}")
    keys = [generate_key(d / f"root-{i + 1}.key") for i in range(count)]
    doc = make_root(keys, threshold, keys, expires_days=expires_days)
    TrustRoot.from_bytes(doc)  # the board's own check
    out = d / "root.json"
    write_doc(out, doc)
    return out, keys


def rotate_root(old_root: dict[str, Any], old_signers: Sequence[SigningKey], new_keys: Sequence[SigningKey | bytes],
                new_signers: Sequence[SigningKey], threshold: int, *, expires_days: float = 3650,
                now: _dt.datetime | None = None) -> dict[str, Any]:
    """Root v(n+1) signed by old and new keys; verified by the board's chain rule before returning."""
    trust = TrustRoot.from_bytes(old_root)
    signers = list({k.keyid: k for k in [*old_signers, *new_signers]}.values())
    doc = make_root(new_keys, threshold, signers, version=trust.root.version + 1, expires_days=expires_days, now=now)
    trust.update_root(doc)
    return doc


def make_release_keys(root_doc: dict[str, Any], root_signers: Sequence[SigningKey], release_keys: Iterable[bytes], *,
                      version: int, revoked: Iterable[str] = (), threshold: int = 1, expires_days: float = 365,
                      now: _dt.datetime | None = None, check: bool = True) -> dict[str, Any]:
    """A release-key list signed by root keys (verified against ``root_doc`` unless check=False)."""
    revoked = sorted(set(revoked))
    keys = {key_id(r): public_key_entry(r) for r in release_keys if key_id(r) not in revoked}
    signed = {"type": RELEASE_KEYS_TYPE, "version": version, "threshold": threshold,
              "expires": _expiry(expires_days, now), "keys": keys, "revoked": revoked}
    doc = _envelope(RELEASE_KEYS_TYPE, signed, root_signers)
    if check:
        root, _, _ = Root.parse(root_doc)
        ReleaseKeys.parse(doc, root)
    return doc


def make_counter_reset(root_doc: dict[str, Any], root_signers: Sequence[SigningKey], *, counter: int, version: int,
                       targets: Sequence[str], expires_days: float = 7,
                       now: _dt.datetime | None = None) -> dict[str, Any]:
    """A root-signed reset of boards' anti-rollback counter (after a bundle with an absurd release
    number was signed). Short-lived by default; ``version`` must exceed the last reset applied."""
    from device_agent.trust import COUNTER_RESET_TYPE, CounterReset
    if counter < 0 or version < 1 or not targets:
        raise MalformedBundle("a counter reset needs --counter >= 0, --version >= 1 and at least one --target")
    signed = {"type": COUNTER_RESET_TYPE, "version": version, "counter": counter, "targets": list(targets),
              "expires": _expiry(expires_days, now)}
    doc = _envelope(COUNTER_RESET_TYPE, signed, root_signers)
    root, _, _ = Root.parse(root_doc)
    CounterReset.parse(doc, root, now or _dt.datetime.now(_dt.timezone.utc))
    return doc


def revoke(release_keys_doc: dict[str, Any], root_doc: dict[str, Any], root_signers: Sequence[SigningKey],
           keyids: Iterable[str], *, expires_days: float = 365) -> dict[str, Any]:
    """A new release-key list (version + 1) without ``keyids`` and with them listed as revoked."""
    trust = TrustRoot.from_bytes(root_doc, release_keys_doc)
    rk = trust.release_keys
    assert rk is not None
    ids = list(keyids)
    for k in ids:
        if k not in rk.keys and k not in rk.revoked:
            matches = [full for full in rk.keys if full.startswith(k)]
            if len(matches) != 1:
                raise KeyFileError(f"key id {k!r} is not in release-key list v{rk.version}")
    full_ids = [next((f for f in rk.keys if f.startswith(k)), k) for k in ids]
    return make_release_keys(root_doc, root_signers, rk.keys.values(), version=rk.version + 1,
                             revoked=[*rk.revoked, *full_ids], threshold=rk.threshold, expires_days=expires_days)


def describe_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """Public summary of a trust document (no private material exists in them anyway)."""
    s = doc.get("signed", {})
    return {"type": s.get("type"), "version": s.get("version"), "threshold": s.get("threshold"),
            "expires": s.get("expires"), "keys": sorted(s.get("keys", {})), "revoked": s.get("revoked", []),
            "signatures": [x.get("keyid") for x in doc.get("signatures", [])]}
