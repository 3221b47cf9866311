"""The board's trust root: root keys (with a threshold) vouch for release keys; release keys sign bundles.

Why two levels: root keys live offline (e.g. three people, any two must agree), release keys
live on a build machine and sign every bundle. If a release key leaks, the root keys publish a
new release-key list that revokes it; boards learn it from the next bundle (the list travels
inside bundles) without re-flashing. Root keys themselves rotate TUF-style: root v(n+1) must
be signed by a threshold of v(n)'s keys *and* a threshold of its own keys, one version at a time.

Documents are JSON envelopes ``{"signed": {...}, "signatures": [{"keyid", "sig"}]}``; a
signature covers ``DOMAIN + type + NUL + canonical_json(signed)`` so a signature made for one
kind of document can never be replayed as another. Key ids are the SHA-256 of the raw 32-byte
Ed25519 public key, in hex.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .durable import utc_now
from .wire.encoding import canonical_json, format_time, is_hex, parse_json, parse_signatures, parse_time
from .errors import (ExpiredError, MalformedBundle, RevokedKey, RollbackError, RootRotationError,
                     SignatureError, ThresholdNotMet)

DOMAIN = b"edgepack-sig-v1:"
ROOT_TYPE = "edgepack-root"
RELEASE_KEYS_TYPE = "edgepack-release-keys"
MANIFEST_TYPE = "edgepack-manifest"
COUNTER_RESET_TYPE = "edgepack-counter-reset"
MAX_KEYS = 64


def signing_message(doc_type: str, payload: bytes) -> bytes:
    """The exact bytes an Ed25519 signature covers for a document of ``doc_type``."""
    return DOMAIN + doc_type.encode("ascii") + b"\0" + payload


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()


def public_key_entry(public_raw: bytes) -> dict[str, str]:
    return {"keytype": "ed25519", "public": public_raw.hex()}


# --------------------------------------------------------------------------- parsing helpers
def _parse_keys(obj: Any, what: str) -> dict[str, bytes]:
    if not isinstance(obj, dict) or len(obj) > MAX_KEYS:
        raise MalformedBundle(f"{what}: 'keys' must be an object of at most {MAX_KEYS} keys")
    keys: dict[str, bytes] = {}
    for kid, ent in obj.items():
        if not (isinstance(ent, dict) and ent.get("keytype") == "ed25519" and is_hex(ent.get("public"), 64)):
            raise MalformedBundle(f"{what}: key {kid!r} is not an ed25519 key entry")
        raw = bytes.fromhex(ent["public"])
        if key_id(raw) != kid:
            raise MalformedBundle(f"{what}: key id {kid!r} does not match its public key")
        keys[kid] = raw
    return keys


def _int(obj: Mapping[str, Any], k: str, what: str, lo: int = 0) -> int:
    v = obj.get(k)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or v > 2**63 - 1:
        raise MalformedBundle(f"{what}: '{k}' must be an integer >= {lo}")
    return v


def count_valid(message: bytes, signatures: Iterable[tuple[str, bytes]], keys: Mapping[str, bytes]) -> set[str]:
    """Key ids in ``keys`` with a valid signature over ``message`` (each key counted once)."""
    good: set[str] = set()
    for kid, sig in signatures:
        raw = keys.get(kid)
        if raw is None or kid in good:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(sig, message)
        except (InvalidSignature, ValueError):
            continue
        good.add(kid)
    return good


def _envelope(data: bytes | Mapping[str, Any], doc_type: str, what: str) -> tuple[dict, bytes, list]:
    env = parse_json(data, what) if isinstance(data, (bytes, bytearray)) else data
    if not isinstance(env, dict) or not isinstance(env.get("signed"), dict) or "signatures" not in env:
        raise MalformedBundle(f"{what} is not a signed document ({{signed, signatures}})")
    signed = env["signed"]
    if signed.get("type") != doc_type:
        raise MalformedBundle(f"{what} has type {signed.get('type')!r}, expected {doc_type!r}")
    msg = signing_message(doc_type, canonical_json(signed))
    return signed, msg, parse_signatures(env["signatures"], what)


# --------------------------------------------------------------------------- documents
@dataclass(frozen=True)
class Root:
    """A verified root document: who may vouch for release keys, and how many must agree."""

    version: int
    threshold: int
    keys: dict[str, bytes]
    expires: _dt.datetime
    document: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, data: bytes | Mapping[str, Any], what: str = "root") -> tuple["Root", bytes, list]:
        signed, msg, sigs = _envelope(data, ROOT_TYPE, what)
        keys = _parse_keys(signed.get("keys"), what)
        threshold = _int(signed, "threshold", what, lo=1)
        if threshold > len(keys):
            raise MalformedBundle(f"{what}: threshold {threshold} exceeds its {len(keys)} keys")
        env = data if isinstance(data, Mapping) else parse_json(data, what)
        root = cls(version=_int(signed, "version", what, lo=1), threshold=threshold, keys=keys,
                   expires=parse_time(signed.get("expires"), f"{what} expires"), document=dict(env))
        return root, msg, sigs

    def require_threshold(self, msg: bytes, sigs: list, what: str) -> set[str]:
        good = count_valid(msg, sigs, self.keys)
        if not good and sigs and not any(kid in self.keys for kid, _ in sigs):
            # not too few signatures: signatures from another root's keys entirely
            raise ThresholdNotMet(
                f"{what} is signed by none of root v{self.version}'s keys: it was made under a different root. "
                "Check that the root given (--root / --trust-root) is the root.json the bundle was built with")
        if len(good) < self.threshold:
            raise ThresholdNotMet(
                f"{what} has {len(good)} valid signature(s) from root v{self.version} keys, needs "
                f"{self.threshold}; collect more root-key signatures (`edgepack keys ... --root-key`)")
        return good


@dataclass(frozen=True)
class ReleaseKeys:
    """A verified list of release-signing keys (and revoked key ids), signed by the root threshold."""

    version: int
    threshold: int
    keys: dict[str, bytes]
    revoked: frozenset[str]
    expires: _dt.datetime
    document: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, data: bytes | Mapping[str, Any], root: Root, what: str = "release-key list") -> "ReleaseKeys":
        signed, msg, sigs = _envelope(data, RELEASE_KEYS_TYPE, what)
        root.require_threshold(msg, sigs, what)
        keys = _parse_keys(signed.get("keys"), what)
        revoked = signed.get("revoked", [])
        if not isinstance(revoked, list) or not all(is_hex(r, 64) for r in revoked):
            raise MalformedBundle(f"{what}: 'revoked' must be a list of key ids")
        threshold = _int(signed, "threshold", what, lo=1)
        env = data if isinstance(data, Mapping) else parse_json(data, what)
        return cls(version=_int(signed, "version", what, lo=1), threshold=threshold,
                   keys={k: v for k, v in keys.items() if k not in revoked}, revoked=frozenset(revoked),
                   expires=parse_time(signed.get("expires"), f"{what} expires"), document=dict(env))


@dataclass(frozen=True)
class CounterReset:
    """A root-signed order to set a board's anti-rollback counter to ``counter``.

    Why: a validly signed bundle with an absurd release number (2**63-1) would block every later
    release, and revoking the release key that signed it does not lower the counter. Only the
    root threshold (offline keys) can undo it. ``version`` must exceed the last reset the board
    applied (a reset cannot be replayed), ``targets`` names the boards it is for, and it expires.
    """

    version: int
    counter: int
    targets: tuple[str, ...]
    expires: _dt.datetime

    @classmethod
    def parse(cls, data: bytes | Mapping[str, Any], root: Root, now: _dt.datetime,
              what: str = "counter reset") -> "CounterReset":
        signed, msg, sigs = _envelope(data, COUNTER_RESET_TYPE, what)
        root.require_threshold(msg, sigs, what)
        targets = signed.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise MalformedBundle(f"{what}: 'targets' must be a non-empty list of target names")
        r = cls(version=_int(signed, "version", what, lo=1), counter=_int(signed, "counter", what),
                targets=tuple(targets), expires=parse_time(signed.get("expires"), f"{what} expires"))
        if now > r.expires:
            raise ExpiredError(f"{what} v{r.version} expired at {format_time(r.expires)}; sign a new one")
        return r


@dataclass(frozen=True)
class TrustRoot:
    """What a board trusts. Immutable: updates return a new TrustRoot for the agent to persist.

    ``release_keys_floor`` is the highest release-key list version ever accepted, kept even if a
    root rotation drops the list, so an attacker cannot replay an older list (with a key that
    has since been revoked).
    """

    root: Root
    release_keys: ReleaseKeys | None = None
    release_keys_floor: int = 0

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, root_doc: bytes | Mapping[str, Any], release_keys_doc: bytes | Mapping[str, Any] | None = None,
                   ) -> "TrustRoot":
        """Load a flashed root (which must carry its own threshold of signatures) and optionally a key list."""
        root, msg, sigs = Root.parse(root_doc)
        root.require_threshold(msg, sigs, f"root v{root.version}")
        tr = cls(root=root)
        if release_keys_doc is not None:
            tr = tr.update_release_keys(release_keys_doc)
        return tr

    @classmethod
    def from_files(cls, root_path: str | Path, release_keys_path: str | Path | None = None) -> "TrustRoot":
        try:
            rd = Path(root_path).read_bytes()
            kd = Path(release_keys_path).read_bytes() if release_keys_path else None
        except OSError as e:
            raise MalformedBundle(f"cannot read trust file: {e}") from None
        for path, data in ((root_path, rd), (release_keys_path, kd)):
            if data is not None and not data.lstrip().startswith(b"{"):
                raise MalformedBundle(f"{path} is not a trust document (the root.json or release-keys.json that "
                                      "`edgepack keys` writes); check the path")
        return cls.from_bytes(rd, kd)

    # -- updates -------------------------------------------------------------------------
    def update_root(self, new_root_doc: bytes | Mapping[str, Any]) -> "TrustRoot":
        """Rotate to root v(n+1): needs a threshold of the old root's keys and of the new root's keys."""
        new, msg, sigs = Root.parse(new_root_doc, "new root")
        if new.version <= self.root.version:
            return self  # already have it (or newer): nothing to do
        if new.version != self.root.version + 1:
            raise RootRotationError(
                f"root v{new.version} cannot follow root v{self.root.version}: rotate one version at a "
                f"time (ship roots v{self.root.version + 1}..v{new.version} in the bundle)")
        try:
            self.root.require_threshold(msg, sigs, f"root v{new.version} (by old root v{self.root.version} keys)")
            new.require_threshold(msg, sigs, f"root v{new.version} (by its own keys)")
        except ThresholdNotMet as e:
            raise ThresholdNotMet(f"root rotation refused: {e}") from None
        rk = self.release_keys
        if rk is not None:
            try:
                rk = ReleaseKeys.parse(rk.document, new)
            except SignatureError:
                rk = None  # list signed by retired root keys: wait for one signed by the new root
        return TrustRoot(root=new, release_keys=rk, release_keys_floor=self.release_keys_floor)

    def update_release_keys(self, doc: bytes | Mapping[str, Any]) -> "TrustRoot":
        """Accept a newer release-key list signed by the root threshold; refuse an older one."""
        rk = ReleaseKeys.parse(doc, self.root)
        if rk.version < self.release_keys_floor:
            raise RollbackError(
                f"release-key list v{rk.version} is older than v{self.release_keys_floor} which this board "
                "already trusts; sign a new list with a higher --version")
        if self.release_keys is not None and rk.version == self.release_keys.version:
            if canonical_json(rk.document.get("signed")) != canonical_json(self.release_keys.document.get("signed")):
                raise RollbackError(f"two different release-key lists both claim v{rk.version}; "
                                    "sign the new list with a higher --version")
        return TrustRoot(root=self.root, release_keys=rk, release_keys_floor=max(rk.version, self.release_keys_floor))

    def apply_embedded(self, trust: Mapping[str, Any], now: _dt.datetime) -> "TrustRoot":
        """Apply the root chain and key list a bundle carries; older-than-held documents are ignored."""
        tr = self
        roots = trust.get("roots", [])
        if not isinstance(roots, list) or len(roots) > 16:
            raise MalformedBundle("bundle trust section: 'roots' must be a list of at most 16 root documents")
        for doc in roots:
            tr = tr.update_root(doc)
        rk = trust.get("release_keys")
        if rk is not None:
            parsed = ReleaseKeys.parse(rk, tr.root, "bundle's release-key list")
            if tr.release_keys is None or parsed.version > tr.release_keys.version:
                tr = tr.update_release_keys(rk)
        tr.check_fresh(now)
        return tr

    def check_fresh(self, now: _dt.datetime) -> None:
        if now > self.root.expires:
            raise ExpiredError(f"root v{self.root.version} expired at {format_time(self.root.expires)}; "
                               "ship a rotated root (`edgepack keys rotate-root`) in the next bundle")
        if self.release_keys is not None and now > self.release_keys.expires:
            raise ExpiredError(f"release-key list v{self.release_keys.version} expired at "
                               f"{format_time(self.release_keys.expires)}; sign a new one "
                               "(`edgepack keys sign-release-keys`) and rebuild the bundle")

    # -- verification ----------------------------------------------------------------------
    def verify_release_signatures(self, doc_type: str, payload: bytes, sigs: list[tuple[str, bytes]],
                                  what: str = "manifest") -> list[str]:
        """Check ``sigs`` over ``payload``; returns the signing key ids. Raises, never returns False."""
        rk = self.release_keys
        if rk is None:
            raise SignatureError(f"{what}: this trust root holds no release-key list; pass one "
                                 "(--release-keys) or build the bundle with one embedded")
        if not sigs:
            raise SignatureError(f"{what} is not signed; sign it with a release key (`edgepack bundle --key`)")
        msg = signing_message(doc_type, payload)
        good = count_valid(msg, sigs, rk.keys)
        if len(good) >= rk.threshold:
            return sorted(good)
        revoked = [kid for kid, _ in sigs if kid in rk.revoked]
        if revoked:
            raise RevokedKey(f"{what} is signed by revoked release key {revoked[0][:16]}…; "
                             "re-sign it with a current release key")
        unknown = [kid for kid, _ in sigs if kid not in rk.keys]
        if unknown and not good:
            raise SignatureError(f"{what} is signed by key {unknown[0][:16]}… which is not in release-key "
                                 f"list v{rk.version}; sign with a listed key or add the key with "
                                 "`edgepack keys sign-release-keys`")
        raise SignatureError(f"{what} has {len(good)} valid release-key signature(s), needs {rk.threshold}; "
                             "the signature is bad (tampered manifest?): rebuild the bundle")

    def to_documents(self) -> dict[str, Any]:
        """What an agent persists: the current root and release-key list documents plus the floor."""
        return {"root": self.root.document,
                "release_keys": self.release_keys.document if self.release_keys else None,
                "release_keys_floor": self.release_keys_floor}

    def with_release_keys_floor(self, floor: int) -> "TrustRoot":
        return replace(self, release_keys_floor=max(floor, self.release_keys_floor))


__all__ = ["TrustRoot", "Root", "ReleaseKeys", "CounterReset", "COUNTER_RESET_TYPE", "signing_message", "key_id", "public_key_entry",
           "ROOT_TYPE", "RELEASE_KEYS_TYPE", "MANIFEST_TYPE", "utc_now"]
