"""``edgepack publish``: a TUF repository of releases on static storage, for fleets that pull.

Layout (any static web server or object store can serve it; python-tuf's ``tuf.ngclient`` reads
it as is)::

    metadata/1.root.json, 2.root.json ...   root versions (boards walk the chain: N+1 probe)
    metadata/root.json                      the newest root, to flash onto new boards
    metadata/N.targets.json                 consistent snapshots: every version is a new object
    metadata/N.snapshot.json
    metadata/timestamp.json                 the only object ever overwritten
    targets/MODEL/<sha256>.rR-full.bundle   bundles and deltas, named by content hash
    reports/...                             what boards upload (edgepack.fleet.ingest)

Publishing is atomic for readers: new bundle objects first, then the new targets and snapshot
versions (new names, nobody reads them yet), and the timestamp last. A board polling in the
middle sees the old timestamp, hence the old, complete repository.

Keys. The four TUF roles have their own Ed25519 keys and thresholds (``root`` n-of-m offline,
``targets``, ``snapshot`` and ``timestamp`` one each by default), PKCS#8 files made and checked
by ``edgepack.ota.keys`` (0600, O_EXCL, loose permissions refused). The TUF root may reuse the
project's offline root keys (``--root-key keys/root-1.key ...``): TUF signs canonical JSON of the
``signed`` object, edgepack signs ``edgepack-sig-v1:<type>\\0<payload>``, so neither signature can
be replayed as the other. TUF decides *which* bundle a board may fetch (freshness, consistency,
no rollback or mix-and-match of metadata); the bundle's own release-key signature, trust chain
and anti-rollback counter are still checked by the agent's install, unchanged: an attacker
must break both to install anything (defence in depth).

Custom target fields (``custom.edgepack``): ``model, release, version, kind (full|delta),
content_sha256, base_release, base_content_sha256, targets`` (board targets) and ``rollout``
(``basis_points`` = percent x 100, ``halted``, ``recall``; integers and booleans only:
TUF's canonical JSON has no floats), which ``edgepack rollout`` rewrites (edgepack.fleet.rollout).
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import InventoryError
from .push import BundleFile, read_bundle_info
from .storage import Backend, open_backend

ROLES = ("root", "targets", "snapshot", "timestamp")
CUSTOM = "edgepack"


class RepositoryError(InventoryError):
    """The repository (or its keys) is missing, inconsistent or not signed by our keys."""

    exit_code = 2


@dataclass(frozen=True, kw_only=True)
class RepoOptions:
    """Lifetimes of the signed metadata (days). The timestamp is re-signed by ``edgepack repo
    refresh`` (cron): a board whose timestamp has expired refuses the repository (freeze attack)."""

    root_days: float = 365.0
    targets_days: float = 90.0
    snapshot_days: float = 30.0
    timestamp_days: float = 7.0


def _tuf():
    try:
        from securesystemslib.signer import CryptoSigner
        from tuf.api import metadata as M
        from tuf.api.serialization.json import JSONSerializer
    except ImportError:
        raise InventoryError("publishing needs python-tuf: pip install 'edgepack[host]'") from None
    return M, CryptoSigner, JSONSerializer


def _expiry(days: float, now: _dt.datetime | None = None) -> _dt.datetime:
    t = (now or _dt.datetime.now(_dt.timezone.utc)) + _dt.timedelta(days=days)
    return t.replace(microsecond=0)


# --------------------------------------------------------------------------- keys
class RepoKeys:
    """The repository's private keys in one folder: tuf-root-N.key, tuf-{targets,snapshot,timestamp}.key."""

    def __init__(self, directory: str | Path, root_keys: list[Path] | None = None):
        self.dir = Path(directory)
        self.root_paths = list(root_keys) if root_keys else sorted(self.dir.glob("tuf-root-*.key"))

    def path(self, role: str) -> Path:
        return self.dir / f"tuf-{role}.key"

    def signer(self, role: str):
        from ..ota.keys import load_signing_key
        _, CryptoSigner, _ = _tuf()
        p = self.path(role)
        if not p.is_file():
            raise RepositoryError(f"no {role} key at {p}; run `edgepack repo init` (or pass the right --keys)")
        return CryptoSigner(load_signing_key(p)._key)

    def root_signers(self) -> list:
        from ..ota.keys import load_signing_key
        _, CryptoSigner, _ = _tuf()
        if not self.root_paths:
            raise RepositoryError(f"no root keys in {self.dir} (tuf-root-*.key) and none given with --root-key")
        return [CryptoSigner(load_signing_key(p)._key) for p in self.root_paths]

    @classmethod
    def create(cls, directory: str | Path, *, root_count: int = 1, root_keys: list[Path] | None = None) -> "RepoKeys":
        from ..ota.keys import generate_key
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for role in ("targets", "snapshot", "timestamp"):
            generate_key(d / f"tuf-{role}.key")
        if not root_keys:
            root_keys = []
            for i in range(root_count):
                generate_key(d / f"tuf-root-{i + 1}.key")
                root_keys.append(d / f"tuf-root-{i + 1}.key")
        return cls(d, root_keys)


# --------------------------------------------------------------------------- the repository
@dataclass
class PublishResult:
    repository: str
    release: int
    targets: list[dict[str, Any]]
    targets_version: int
    snapshot_version: int
    timestamp_version: int
    bytes_uploaded: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def target_name(b: BundleFile) -> str:
    model = b.model.replace("+", "_")
    leaf = f"r{b.release}-full.bundle" if b.kind == "full" else f"r{b.release}-from-r{b.base_release}.bundle"
    return f"{model}/{leaf}"


def _custom(b: BundleFile, targets: list[str], rollout: dict[str, Any]) -> dict[str, Any]:
    return {CUSTOM: {"model": b.model, "release": b.release, "version": b.version, "kind": b.kind,
                     "content_sha256": b.content_sha256, "base_release": b.base_release,
                     "base_content_sha256": b.base_content_sha256, "targets": targets, "rollout": rollout}}


class TufRepository:
    """The signed metadata of one repository, loaded from and written to a ``Backend``.

    Loading verifies every role against the stored root and checks that the root names *our*
    keys: a tampered store must not get its content re-signed (laundered) by the next publish."""

    def __init__(self, backend: Backend, keys: RepoKeys, options: RepoOptions | None = None):
        self.be, self.keys, self.opt = backend, keys, options or RepoOptions()
        self.M, _, ser = _tuf()
        self.ser = ser(compact=True)
        self.root = self.targets = self.snapshot = self.timestamp = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ create / load
    @classmethod
    def init(cls, backend: Backend | str, keys_dir: str | Path, *, root_keys: list[Path] | None = None,
             root_count: int = 1, root_threshold: int = 1, options: RepoOptions | None = None) -> "TufRepository":
        be = open_backend(backend) if isinstance(backend, (str, Path)) else backend
        if be.exists("metadata/timestamp.json"):
            raise RepositoryError(f"{be.describe()} already holds a repository (metadata/timestamp.json); "
                                  "publish into it, or choose an empty location")
        existing = RepoKeys(keys_dir)
        keys = existing if existing.path("targets").is_file() else RepoKeys.create(
            keys_dir, root_count=root_count, root_keys=root_keys)
        if root_keys:
            keys.root_paths = list(root_keys)
        repo = cls(be, keys, options)
        M = repo.M
        roots = keys.root_signers()
        if not 1 <= root_threshold <= len(roots):
            raise RepositoryError(f"root threshold {root_threshold} needs 1..{len(roots)} root keys")
        root = M.Root(expires=_expiry(repo.opt.root_days), consistent_snapshot=True)
        for s in roots:
            root.add_key(s.public_key, "root")
        root.roles["root"].threshold = root_threshold
        for role in ("targets", "snapshot", "timestamp"):
            root.add_key(keys.signer(role).public_key, role)
        repo.root = M.Metadata(root)
        for s in roots:
            repo.root.sign(s, append=True)
        repo.targets = M.Metadata(M.Targets(expires=_expiry(repo.opt.targets_days)))
        repo.snapshot = M.Metadata(M.Snapshot(expires=_expiry(repo.opt.snapshot_days)))
        repo.timestamp = M.Metadata(M.Timestamp(expires=_expiry(repo.opt.timestamp_days)))
        repo._put_root()
        repo.commit(first=True)
        return repo

    @classmethod
    def open(cls, backend: Backend | str, keys_dir: str | Path, *, root_keys: list[Path] | None = None,
             options: RepoOptions | None = None) -> "TufRepository":
        be = open_backend(backend) if isinstance(backend, (str, Path)) else backend
        repo = cls(be, RepoKeys(keys_dir, root_keys), options)
        repo._load()
        return repo

    def _read(self, key: str):
        data = self.be.get(key)
        if data is None:
            raise RepositoryError(f"{self.be.describe()}: {key} is missing; is this a repository made by "
                                  "`edgepack repo init`?")
        try:
            return self.M.Metadata.from_bytes(data)
        except Exception as e:
            raise RepositoryError(f"{self.be.describe()}: {key} is not TUF metadata ({e})") from None

    def _load(self) -> None:
        M = self.M
        root = self._read("metadata/root.json")
        # walk to the newest versioned root (root.json is a convenience copy)
        while self.be.exists(f"metadata/{root.signed.version + 1}.root.json"):
            root = self._read(f"metadata/{root.signed.version + 1}.root.json")
        self.root = root
        self.timestamp = self._read("metadata/timestamp.json")
        sv = self.timestamp.signed.snapshot_meta.version
        self.snapshot = self._read(f"metadata/{sv}.snapshot.json")
        tv = self.snapshot.signed.meta["targets.json"].version
        self.targets = self._read(f"metadata/{tv}.targets.json")
        r = root.signed
        for role, md in (("timestamp", self.timestamp), ("snapshot", self.snapshot), ("targets", self.targets)):
            try:
                r.verify_delegate(role, md.signed_bytes, md.signatures)
            except Exception as e:
                raise RepositoryError(f"{self.be.describe()}: stored {role} metadata does not verify against the "
                                      f"root ({e}); the store was tampered with: restore it before publishing") from None
            ours = self.keys.signer(role).public_key.keyid
            if ours not in r.roles[role].keyids:
                raise RepositoryError(f"the repository's root does not list this {role} key ({ours[:16]}…); "
                                      f"wrong --keys folder for {self.be.describe()}")
        assert isinstance(self.targets.signed, M.Targets)

    # ------------------------------------------------------------------ writing
    def _put_root(self) -> None:
        data = self.root.to_bytes(self.ser)
        self.be.put_bytes(f"metadata/{self.root.signed.version}.root.json", data)
        self.be.put_bytes("metadata/root.json", data)

    def commit(self, *, targets_changed: bool = True, first: bool = False) -> tuple[int, int, int]:
        """Sign and write new targets (if changed), snapshot and timestamp versions, timestamp last."""
        M = self.M
        bump = 0 if first else 1
        if targets_changed:
            t = self.targets.signed
            t.version += bump
            t.expires = _expiry(self.opt.targets_days)
            self.targets.sign(self.keys.signer("targets"))
            tb = self.targets.to_bytes(self.ser)
            self.be.put_bytes(f"metadata/{t.version}.targets.json", tb)
            s = self.snapshot.signed
            s.version += bump
            s.expires = _expiry(self.opt.snapshot_days)
            s.meta["targets.json"] = M.MetaFile(version=t.version, length=len(tb))
            self.snapshot.sign(self.keys.signer("snapshot"))
            sb = self.snapshot.to_bytes(self.ser)
            self.be.put_bytes(f"metadata/{s.version}.snapshot.json", sb)
            self._snapshot_len = len(sb)
        else:
            self._snapshot_len = len(self.snapshot.to_bytes(self.ser))
        ts = self.timestamp.signed
        ts.version += bump
        ts.expires = _expiry(self.opt.timestamp_days)
        ts.snapshot_meta = M.MetaFile(version=self.snapshot.signed.version, length=self._snapshot_len)
        self.timestamp.sign(self.keys.signer("timestamp"))
        self.be.put_bytes("metadata/timestamp.json", self.timestamp.to_bytes(self.ser))  # readers switch here
        return self.targets.signed.version, self.snapshot.signed.version, ts.version

    def refresh_timestamp(self) -> int:
        """Re-sign the timestamp with a new expiry (cron): boards refuse an expired one."""
        return self.commit(targets_changed=False)[2]

    def rotate_key(self, role: str, new_key_path: Path | None = None) -> int:
        """Replace one role's key (after a compromise) in a new root version: ``rotate_keys([role])``."""
        return self.rotate_keys([role], {role: new_key_path} if new_key_path else None)

    def rotate_keys(self, roles: Iterable[str], new_key_paths: dict[str, Path] | None = None) -> int:
        """Replace the keys of ``roles`` (targets, snapshot, timestamp) in ONE new root version signed
        by the root keys, then re-sign those roles (and everything below them) with the new keys.

        This is how a fleet recovers from a fast-forward attack (TUF spec 5.3.11): a board that was
        made to trust a timestamp or snapshot of a huge version refuses every honest one after it as
        a rollback; once the root it walks to names other keys for those roles, its stored copies no
        longer verify, it drops them and takes the honest versions again. A stolen timestamp key
        needs ``timestamp``; a stolen snapshot key (which lets the attacker raise the targets version)
        needs ``snapshot`` and ``timestamp`` (the attacker's timestamp pointed at its snapshot)."""
        from ..ota.keys import generate_key, load_signing_key
        _, CryptoSigner, _ = _tuf()
        roles = list(dict.fromkeys(roles))
        paths = dict(new_key_paths or {})
        bad = [r for r in roles if r not in ("targets", "snapshot", "timestamp")]
        if not roles or bad:
            raise RepositoryError(f"rotate: roles must be targets, snapshot or timestamp, not {bad or roles!r}")
        r = self.root.signed
        for role in roles:
            old = self.keys.signer(role).public_key.keyid
            p = self.keys.path(role)
            archived = p.with_name(p.name + f".retired-{r.version}")
            p.rename(archived)
            pub = p.with_name(p.name + ".pub")
            if pub.exists():
                pub.rename(archived.with_name(archived.name + ".pub"))
            if role in paths:
                sk = load_signing_key(paths[role])
                p.write_bytes(Path(paths[role]).read_bytes())
                p.chmod(0o600)
            else:
                sk = generate_key(p)
            r.revoke_key(old, role)
            r.add_key(CryptoSigner(sk._key).public_key, role)
        r.version += 1
        r.expires = _expiry(self.opt.root_days)
        self.root.signatures.clear()
        for s in self.keys.root_signers():
            self.root.sign(s, append=True)
        self._put_root()
        # re-sign the rotated roles with their new keys (and everything below them) so boards move on
        self.commit(targets_changed=bool({"targets", "snapshot"} & set(roles)))
        return r.version

    # ------------------------------------------------------------------ targets
    def target_items(self) -> dict[str, Any]:
        return dict(self.targets.signed.targets)

    def add_bundle(self, b: BundleFile, board_targets: list[str], rollout: dict[str, Any]) -> dict[str, Any]:
        M = self.M
        name = target_name(b)
        tf = M.TargetFile.from_file(name, str(b.path), ["sha256"])
        tf.unrecognized_fields["custom"] = _custom(b, board_targets, rollout)
        h = tf.hashes["sha256"]
        d, _, leaf = name.rpartition("/")
        self.be.put_file(f"targets/{d}/{h}.{leaf}", b.path)
        self.targets.signed.targets[name] = tf
        return {"path": name, "kind": b.kind, "length": tf.length, "sha256": h, "base_release": b.base_release}


def _board_targets(path: Path) -> list[str]:
    """The bundle's target names, from its manifest parsed with the board's schema (unverified)."""
    from device_agent.durable import open_regular
    from device_agent.wire import parse_json, parse_manifest, read_header
    with open_regular(path) as f:
        return list(parse_manifest(parse_json(read_header(f).manifest_bytes, "manifest")).targets)


def publish(bundle: str | Path, repository: str | Path | Backend, keys_dir: str | Path, *,
            deltas: Iterable[str | Path] = (), percent: float | None = None, discover: bool = True,
            options: RepoOptions | None = None) -> PublishResult:
    """Add a release (its full bundle and deltas) as targets, rollout at ``percent``, one commit.

    The bundles are not verified here beyond their headers (the boards verify everything); a
    delta must be of the same release as the full bundle."""
    from .push import load_release
    percent_default = percent is None
    percent = 0.0 if percent is None else percent
    if not 0 <= percent <= 100:
        raise InventoryError(f"--percent must be in 0..100, not {percent}")
    rel = load_release(bundle, [Path(d) for d in deltas], discover=discover)
    repo = TufRepository.open(repository, keys_dir, options=options)
    board_targets = _board_targets(rel.full.path)
    for name, tf in repo.target_items().items():
        c = (tf.custom or {}).get(CUSTOM, {})
        if c.get("model") == rel.full.model and c.get("release") == rel.release and c.get("content_sha256") != rel.full.content_sha256:
            raise InventoryError(f"release {rel.release} of {rel.full.model} is already published with other "
                                 f"content ({name}); releases are immutable: build release {rel.release + 1}")
    rollout = {"basis_points": round(percent * 100), "halted": False, "recall": False}
    for tf in repo.target_items().values():  # re-publishing the same release keeps its rollout
        c = (tf.custom or {}).get(CUSTOM, {})
        if c.get("model") == rel.full.model and c.get("release") == rel.release and percent_default:
            rollout = dict(c.get("rollout") or rollout)
    added = [repo.add_bundle(b, board_targets, rollout) for b in [rel.full, *rel.deltas]]
    tv, sv, tsv = repo.commit()
    return PublishResult(repository=repo.be.describe(), release=rel.release, targets=added, targets_version=tv,
                         snapshot_version=sv, timestamp_version=tsv,
                         bytes_uploaded=sum(a["length"] for a in added))


__all__ = ["TufRepository", "RepoKeys", "RepoOptions", "PublishResult", "RepositoryError", "publish", "target_name",
           "read_bundle_info"]
