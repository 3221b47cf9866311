"""Read and verify edgepack OTA bundles. Runs on the board; the host uses the very same code.

Public API (everything else is private):

* ``open_bundle(path, trust_root, *, now, min_release, target)`` reads the header, checks the
  trust metadata the bundle carries, the manifest signature and the policy (expiry,
  anti-rollback, target, agent version) and returns a ``VerifiedManifest``. It reads only the
  header: cheap, and nothing is written.
* ``verify_payloads(bundle, base_dir=None)`` streams every payload and checks it against the
  signed hashes without writing anything.
* ``extract(bundle, dest_dir, base_dir=None)`` streams payloads into a staging directory,
  verifies every file (transport hash, then the reconstructed file's hash and length), fsyncs,
  and only then renames the files into ``dest_dir``. On any failure nothing is left behind.

Order matters for safety: a payload frame's SHA-256 (signed in the manifest) is checked before
its bytes reach zstd or the delta decoder, so parsers only ever see authenticated data; and for
a delta, the base files are hashed before anything is written.

Memory is bounded: 1 MiB read chunks, a zstd window of at most 8 MiB for full payloads, and a
delta decoder that works tensor by tensor (see delta_apply.py).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
import secrets
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from . import __version__ as AGENT_VERSION
from .delta_apply import iter_patch_from, iter_tensor_delta
from .durable import describe, fsync_dir, hash_file, open_regular, utc_now
from .errors import (AgentTooOld, BaseMismatch, ExpiredError, HashMismatch, LengthExceeded, NotABundle, NotYetValid,
                     ReleaseStepTooLarge, RollbackError, TargetMismatch, TruncatedBundle)
from .trust import MANIFEST_TYPE, TrustRoot
from .wire import codecs
from .wire.encoding import format_time, parse_json, sha256_hex
from .wire.header import read_header
from .wire.limits import LIMITS
from .wire.manifest import FORMAT_VERSION, FileEntry, Manifest, parse_manifest, version_tuple
from .wire.streams import CHUNK, FrameReader, read_exact, zstd_stream

STAGING_PREFIX = ".edgepack-partial-"

# the container header (MAGIC, read_header) is device_agent.wire's: import it from there
__all__ = ["open_bundle", "verify_payloads", "extract", "VerifiedManifest", "FileEntry",
           "FORMAT_VERSION", "AGENT_VERSION"]


@dataclass(frozen=True)
class VerifiedManifest:
    """A bundle whose header passed every check. Payloads are checked when streamed."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    signed_by: tuple[str, ...]
    trust: TrustRoot  # the trust root after the bundle's embedded updates: the agent persists it
    payload_offset: int
    embedded_trust: dict[str, Any]  # the trust section as carried (a delta of this release carries it on)

    # conveniences used by the agent and CLI
    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def release(self) -> int:
        return self.manifest.release

    @property
    def files(self) -> tuple[FileEntry, ...]:
        return self.manifest.files

    @property
    def manifest_sha256(self) -> str:
        return sha256_hex(self.manifest_bytes)

    def file(self, role: str) -> FileEntry | None:
        return next((f for f in self.manifest.files if f.role == role), None)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {"kind": m.kind, "model": m.model, "release": m.release, "version": m.version,
                "targets": list(m.targets), "created": format_time(m.created), "expires": format_time(m.expires),
                "min_agent_version": m.min_agent_version, "content_sha256": m.content_sha256,
                "manifest_sha256": self.manifest_sha256, "signed_by": list(self.signed_by),
                "base": ({"release": m.base_release, "content_sha256": m.base_content_sha256}
                         if m.kind == "delta" else None),
                "files": [f.to_json() for f in m.files],
                "bundle_bytes": self.payload_offset + sum(f.transport_length for f in m.files)}


# --------------------------------------------------------------------------- header
def _open(path: Path) -> BinaryIO:
    """The bundle file, refused unless it is a regular file (a FIFO would block, /dev/zero never ends)."""
    try:
        return open_regular(path)
    except OSError as e:
        raise NotABundle(f"cannot open bundle {path}: {describe(e)}; pass a regular bundle file") from None


def open_bundle(path: str | Path, trust_root: TrustRoot, *, now: _dt.datetime | None = None,
                min_release: int = 0, target: str | None = None,
                agent_version: str = AGENT_VERSION, max_release: int | None = None,
                on_trust: Callable[[TrustRoot], None] | None = None) -> VerifiedManifest:
    """Verify a bundle's header: signatures, trust updates, expiry, anti-rollback, target, size.

    ``min_release`` is the lowest release the board accepts (its anti-rollback counter);
    ``max_release`` the highest (the board's bounded release step; None: unbounded);
    ``target`` is the board's target name (None skips the check: host-side inspection only).
    ``on_trust(tr)`` is called as soon as the embedded root chain / release-key list verified and
    changed the trust root, *before* the manifest is checked: a revocation must stick even when
    this bundle is refused later (expired, wrong target, failed trial).
    Raises a named OtaError; never returns a half-verified manifest.
    """
    path = Path(path)
    now = now or utc_now()
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        hdr = read_header(f)
    trust = trust_root.apply_embedded(hdr.trust, now)
    if on_trust is not None and trust.to_documents() != trust_root.to_documents():
        on_trust(trust)
    signed_by = trust.verify_release_signatures(MANIFEST_TYPE, hdr.manifest_bytes, hdr.signatures)
    m = parse_manifest(parse_json(hdr.manifest_bytes, "manifest"))
    if m.created > now + LIMITS.max_clock_skew:
        raise NotYetValid(f"bundle for {m.model} release {m.release} claims it was created {format_time(m.created)}, "
                          f"after this board's clock ({format_time(now)}) + {LIMITS.max_clock_skew.days} day; fix the "
                          "build host's or the board's clock and rebuild")
    if now > m.expires:
        raise ExpiredError(f"bundle for {m.model} release {m.release} expired at {format_time(m.expires)}; "
                           "build a fresh bundle (a stale or frozen update is refused)")
    if m.release < min_release:
        raise RollbackError(f"bundle release {m.release} is older than {min_release}, the lowest this board "
                            "accepts; build a bundle with a higher --release")
    if max_release is not None and m.release > max_release:
        raise ReleaseStepTooLarge(f"bundle release {m.release} jumps past {max_release}, the highest this board "
                                  "accepts (its max_release_step policy); build it with a smaller --release, or "
                                  "reset the board's counter with a root-signed reset (`edgepack keys reset-counter`)")
    if target is not None and target not in m.targets:
        raise TargetMismatch(f"bundle is for target(s) {', '.join(m.targets)}, this board is {target!r}; "
                             "build a bundle for this target")
    if version_tuple(agent_version) < version_tuple(m.min_agent_version):
        raise AgentTooOld(f"bundle needs device agent >= {m.min_agent_version}, this is {agent_version}; "
                          "update the agent first")
    expected = hdr.payload_offset + sum(fe.transport_length for fe in m.files)
    if size < expected:
        raise TruncatedBundle(f"bundle is {size} bytes, its manifest declares {expected}; "
                              "the file is cut short: copy it again")
    if size > expected:
        raise LengthExceeded(f"bundle has {size - expected} bytes past its declared end; "
                             "refusing it (corrupt or hostile bundle)")
    return VerifiedManifest(path=path, manifest=m, manifest_bytes=hdr.manifest_bytes, signed_by=tuple(signed_by),
                            trust=trust, payload_offset=hdr.payload_offset, embedded_trust=hdr.trust)


# --------------------------------------------------------------------------- payloads
def _check_bases(vm: VerifiedManifest, base_dir: Path | None) -> dict[str, Path]:
    """Hash every base file a delta needs *before* anything is written."""
    bases: dict[str, Path] = {}
    need = [fe for fe in vm.files if fe.is_delta]
    if not need:
        return bases
    if base_dir is None:
        raise BaseMismatch(f"this is a delta bundle against release {vm.manifest.base_release}; "
                           "pass the directory holding that release (base_dir / --base-dir)")
    for fe in need:
        p = Path(base_dir) / fe.path
        try:
            n, digest = hash_file(p, CHUNK)
        except OSError as e:
            raise BaseMismatch(f"delta needs base file {fe.path!r} of release {vm.manifest.base_release}, "
                               f"not usable in {base_dir} ({describe(e)}); send the full bundle instead") from None
        if n != fe.base_length or digest != fe.base_sha256:
            raise BaseMismatch(f"base file {fe.path!r} in {base_dir} is not the one release "
                               f"{vm.manifest.base_release} shipped (sha256 {digest[:16]}…, expected "
                               f"{fe.base_sha256[:16]}…); send the full bundle instead")
        bases[fe.path] = p
    return bases


def _check_transport(f: BinaryIO, fe: FileEntry) -> None:
    """First pass over a frame: its bytes must hash to the signed transport_sha256."""
    fr = FrameReader(f, fe.transport_length, f"payload {fe.path!r}")
    fr.drain()
    if fr.hash.hexdigest() != fe.transport_sha256:
        raise HashMismatch(f"payload {fe.path!r} does not match its signed hash (tampered, corrupt, or taken "
                           "from another release); copy the bundle again or rebuild it")


@codecs.register_decoder(codecs.ZSTD)
def _decode_zstd(fr: FrameReader, fe: FileEntry, base: BinaryIO | None, what: str) -> Iterator[bytes]:
    yield from zstd_stream(fr, fe.transport_length, fe.length, what, window_log_max=LIMITS.full_window_log)


@codecs.register_decoder(codecs.BASE_COPY)
def _decode_base_copy(fr: FrameReader, fe: FileEntry, base: BinaryIO, what: str) -> Iterator[bytes]:
    while chunk := base.read(CHUNK):
        yield chunk


@codecs.register_decoder(codecs.PATCH_FROM)
def _decode_patch_from(fr: FrameReader, fe: FileEntry, base: BinaryIO, what: str) -> Iterator[bytes]:
    yield from iter_patch_from(fr, base, fe.base_length or 0, fe.length, fe.transport_length, what)


@codecs.register_decoder(codecs.TENSOR_DELTA)
def _decode_tensor_delta(fr: FrameReader, fe: FileEntry, base: BinaryIO, what: str) -> Iterator[bytes]:
    yield from iter_tensor_delta(fr, base, fe.base_length or 0, fe.length, what)


def _iter_file(f: BinaryIO, fe: FileEntry, bases: dict[str, Path], stack: ExitStack) -> Iterator[bytes]:
    fr = FrameReader(f, fe.transport_length, f"payload {fe.path!r}")
    what = f"payload {fe.path!r}"
    decode = codecs.decoder(fe.encoding)  # the manifest schema admitted only registered names
    if fe.is_delta:
        with open_regular(bases[fe.path]) as b:
            yield from decode(fr, fe, b, what)
    else:
        yield from decode(fr, fe, None, what)
    if fr.remaining:
        raise LengthExceeded(f"{what} has {fr.remaining} unused bytes after its data; refusing it")
    if fe.transport_length and fr.hash.hexdigest() != fe.transport_sha256:
        # second read of a large frame: the file changed between the two passes
        raise HashMismatch(f"payload {fe.path!r} changed while it was being read (the hashed bytes and the "
                           "decoded bytes differ); copy the bundle again and keep it still while installing")


def _stream(vm: VerifiedManifest, bases: dict[str, Path], sink: Callable[[FileEntry], Any] | None) -> None:
    """Walk every frame: check its transport hash, then (if it can be rebuilt) its content hash.

    A frame of at most LIMITS.max_buffered_frame bytes is read once, hashed, and decoded from that
    authenticated copy. A larger frame is hashed in a first pass and decoded in a second pass
    over the same descriptor, which is hashed again and must match (docs/bundle-format.md says
    why: holding a 200 MB frame in RAM or spooling it to disk is what a board cannot afford).
    ``sink(fe)`` returns a writable file for fe's output; None discards the output.
    """
    with _open(vm.path) as f, ExitStack() as stack:
        f.seek(vm.payload_offset)
        for fe in vm.files:
            start = f.tell()
            if fe.transport_length <= LIMITS.max_buffered_frame:
                data = read_exact(f, fe.transport_length, f"payload {fe.path!r}")
                if sha256_hex(data) != fe.transport_sha256:
                    raise HashMismatch(f"payload {fe.path!r} does not match its signed hash (tampered, corrupt, or "
                                       "taken from another release); copy the bundle again or rebuild it")
                src: BinaryIO = io.BytesIO(data)
            else:
                _check_transport(f, fe)
                f.seek(start)
                src = f
            if fe.is_delta and fe.path not in bases:
                f.seek(start + fe.transport_length)
                continue  # verify-only without a base: the signed transport hash is all we can check
            out = sink(fe) if sink else None
            h = hashlib.sha256()
            n = 0
            for chunk in _iter_file(src, fe, bases, stack):
                n += len(chunk)
                if n > fe.length:
                    raise LengthExceeded(f"payload {fe.path!r} rebuilds past its signed length {fe.length}; refusing it")
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
            f.seek(start + fe.transport_length)
            if n != fe.length or h.hexdigest() != fe.sha256:
                raise HashMismatch(f"file {fe.path!r} rebuilds to a different hash than the signed one "
                                   "(wrong base or corrupt delta); send the full bundle instead")
        if f.read(1):
            raise LengthExceeded("bundle has data past its declared end; refusing it (corrupt or hostile bundle)")


def verify_payloads(vm: VerifiedManifest, base_dir: str | Path | None = None) -> None:
    """Stream every payload and check it against the signed hashes. Writes nothing.

    Without ``base_dir`` a delta payload is checked against its signed transport hash only;
    with it, the file is also rebuilt (in memory chunks, discarded) and checked.
    """
    bases = _check_bases(vm, Path(base_dir)) if base_dir is not None else {}
    _stream(vm, bases, None)


def extract(vm: VerifiedManifest, dest_dir: str | Path, base_dir: str | Path | None = None) -> list[Path]:
    """Write the bundle's files into ``dest_dir``, all verified, or nothing at all.

    Files are streamed into a staging directory inside ``dest_dir``, each checked against its
    signed hash and length, fsynced, and only when *every* file passed are they renamed into
    place (rename is atomic per file; the agent extracts into an inactive A/B slot, so a crash
    mid-rename leaves the active slot untouched). For a delta, ``base_dir`` holds the base
    release (typically the active slot) and is hashed before anything is written.
    """
    dest = Path(dest_dir)
    base = Path(base_dir) if base_dir is not None else None
    bases = _check_bases(vm, base)  # before creating anything
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / f"{STAGING_PREFIX}{secrets.token_hex(6)}"
    staging.mkdir()
    opened: list[Any] = []
    try:
        def sink(fe: FileEntry) -> BinaryIO:
            fh = open(staging / fe.path, "wb")
            opened.append(fh)
            return fh

        _stream(vm, bases, sink)
        for fh in opened:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        fsync_dir(staging)
        out = []
        for fe in vm.files:
            target = dest / fe.path
            os.replace(staging / fe.path, target)
            out.append(target)
        fsync_dir(dest)
        staging.rmdir()
        return out
    except BaseException:
        for fh in opened:
            try:
                fh.close()
            except OSError:
                pass
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        raise
