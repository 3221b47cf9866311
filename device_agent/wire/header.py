"""The container header: magic, format version, trust section, manifest, signatures.

Layout (docs/bundle-format.md): ``EPBUNDLE`` | u16 format_version | u16 flags (0) | then three
sections, each a u32 big-endian length and its bytes: the trust section (canonical JSON), the
signed manifest (canonical JSON, the exact bytes the signatures cover), the signature list.
Payload frames follow. The host writes it with :func:`write_header`, the board reads it with
:func:`read_header`: one module, so the two cannot disagree.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import MalformedBundle, NotABundle, TruncatedBundle, UnsupportedFormat
from .encoding import parse_json, parse_signatures
from .limits import LIMITS
from .manifest import FORMAT_VERSION
from .streams import read_exact

MAGIC = b"EPBUNDLE"


@dataclass(frozen=True)
class BundleHeader:
    """The raw, *unverified* parts of a bundle header. Use only to inspect; trust open_bundle."""

    format_version: int
    trust: dict[str, Any]
    manifest_bytes: bytes
    signatures: list[tuple[str, bytes]]
    payload_offset: int


def _sections() -> tuple[tuple[str, int], ...]:
    return (("trust section", LIMITS.max_trust_section), ("manifest", LIMITS.max_manifest),
            ("signatures", LIMITS.max_signatures))


def write_header(f: BinaryIO, *, trust_bytes: bytes, manifest_bytes: bytes, signature_bytes: bytes) -> int:
    """Write the header at the current position; returns its length (the payload offset)."""
    n = f.write(MAGIC + struct.pack(">HH", FORMAT_VERSION, 0))
    for (name, cap), sec in zip(_sections(), (trust_bytes, manifest_bytes, signature_bytes)):
        if len(sec) > cap:
            raise MalformedBundle(f"bundle {name} would be {len(sec)} bytes, over the {cap} a board reads")
        n += f.write(struct.pack(">I", len(sec)) + sec)
    return n


def read_header(f: BinaryIO) -> BundleHeader:
    """Parse the container header from the current position. No trust decisions are made here."""
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        if not magic:
            raise NotABundle("not an edgepack bundle (empty file, bad magic); pass a file made by `edgepack bundle`")
        if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
            raise TruncatedBundle("bundle ends inside its magic; the file is cut short: copy it again")
        raise NotABundle("not an edgepack bundle (bad magic); pass a file made by `edgepack bundle` or `edgepack delta`")
    fv, flags = struct.unpack(">HH", read_exact(f, 4, "header"))
    if fv > FORMAT_VERSION:
        raise UnsupportedFormat(f"bundle format version {fv} is newer than this agent reads ({FORMAT_VERSION}); "
                                "update the device agent first")
    if fv < 1 or flags != 0:
        raise MalformedBundle(f"bundle header has format version {fv} / flags {flags}; rebuild the bundle")
    pos = len(MAGIC) + 4
    sections = []
    for name, cap in _sections():
        (n,) = struct.unpack(">I", read_exact(f, 4, f"{name} length"))
        if n > cap:
            raise MalformedBundle(f"bundle {name} is {n} bytes (max {cap}); the file is corrupt or hostile")
        sections.append(read_exact(f, n, name))
        pos += 4 + n
    trust = parse_json(sections[0], "bundle trust section")
    if not isinstance(trust, dict):
        raise MalformedBundle("bundle trust section is not a JSON object; rebuild the bundle")
    return BundleHeader(format_version=fv, trust=trust, manifest_bytes=sections[1],
                        signatures=parse_signatures(parse_json(sections[2], "bundle signatures"), "bundle signatures"),
                        payload_offset=pos)


__all__ = ["MAGIC", "BundleHeader", "read_header", "write_header"]
