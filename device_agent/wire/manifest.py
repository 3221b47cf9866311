"""Schema of the signed manifest (docs/bundle-format.md, format_version 1), checked strictly.

Parsing happens only *after* the signature over the manifest bytes checked out, but the
schema is still enforced strictly: a release key is not trusted to produce well-formed input
(a buggy writer must not be able to make the board write outside its slot).
"""
from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from typing import Any

from ..errors import MalformedBundle, UnsupportedFormat
from .codecs import BASE_COPY, DELTA_ENCODINGS, ENCODINGS
from .encoding import canonical_json, is_hex, parse_time, sha256_hex
from .limits import LIMITS

FORMAT_NAME = "edgepack-bundle"
FORMAT_VERSION = 1
ROLES = ("model", "settings", "golden", "extra")
MAX_FILES = LIMITS.max_files
MAX_FILE_LENGTH = LIMITS.max_file_length
# Used with fullmatch only: `$` also matches before a trailing newline, so "model.onnx\n" passed re.match
PATH_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
_VERSION_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+~-]{0,63}")


@dataclass(frozen=True)
class FileEntry:
    """One payload file. ``length``/``sha256`` describe the file the board ends up with;
    ``transport_*`` describe the bytes in the bundle (compressed file or patch)."""

    path: str
    role: str
    length: int
    sha256: str
    encoding: str
    transport_length: int
    transport_sha256: str
    base_length: int | None = None
    base_sha256: str | None = None

    @property
    def is_delta(self) -> bool:
        return self.encoding in DELTA_ENCODINGS

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "role": self.role, "length": self.length, "sha256": self.sha256,
                             "encoding": self.encoding, "transport_length": self.transport_length,
                             "transport_sha256": self.transport_sha256}
        if self.is_delta:
            d["base_length"] = self.base_length
            d["base_sha256"] = self.base_sha256
        return d


def content_digest(files: list[tuple[str, int, str]]) -> str:
    """Identity of what a board ends up with: same for the full and delta bundle of one release."""
    return sha256_hex(canonical_json(sorted([list(f) for f in files])))


_DOTTED_RE = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9}){0,7}")


def version_tuple(v: str) -> tuple[int, ...]:
    # int() accepts " 1", "1\n", "+1" and "1_0": only plain dotted digits are a version
    if not isinstance(v, str) or not _DOTTED_RE.fullmatch(v):
        raise MalformedBundle(f"version {str(v)[:40]!r} is not dotted integers like 0.1.0") from None
    try:
        return tuple(int(p) for p in v.split("."))
    except ValueError:
        raise MalformedBundle(f"version {v!r} is not dotted integers like 0.1.0") from None


def _int(d: dict, k: str, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    v = d.get(k)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise MalformedBundle(f"{what}: '{k}' must be an integer in [{lo}, {hi}]; rebuild the bundle")
    return v


def _str(d: dict, k: str, what: str, pattern: re.Pattern | None = None) -> str:
    v = d.get(k)
    if not isinstance(v, str) or not v or len(v) > 256 or (pattern and not pattern.fullmatch(v)):
        raise MalformedBundle(f"{what}: '{k}' is missing or not a valid name; rebuild the bundle")
    return v


def _hex(d: dict, k: str, what: str) -> str:
    v = d.get(k)
    if not is_hex(v, 64):
        raise MalformedBundle(f"{what}: '{k}' must be a lowercase hex SHA-256; rebuild the bundle")
    return v


@dataclass(frozen=True)
class Manifest:
    kind: str
    model: str
    release: int
    version: str
    targets: tuple[str, ...]
    created: _dt.datetime
    expires: _dt.datetime
    min_agent_version: str
    compression: str
    content_sha256: str
    files: tuple[FileEntry, ...]
    base_release: int | None
    base_content_sha256: str | None


def parse_manifest(m: Any) -> Manifest:
    w = "manifest"
    if not isinstance(m, dict):
        raise MalformedBundle("manifest is not a JSON object; rebuild the bundle")
    if m.get("format") != FORMAT_NAME:
        raise MalformedBundle(f"manifest format is {m.get('format')!r}, expected {FORMAT_NAME!r}")
    fv = _int(m, "format_version", w, lo=1)
    if fv > FORMAT_VERSION:
        raise UnsupportedFormat(f"manifest format_version {fv} is newer than this agent reads "
                                f"({FORMAT_VERSION}); update the device agent first")
    kind = m.get("kind")
    if kind not in ("full", "delta"):
        raise MalformedBundle("manifest 'kind' must be 'full' or 'delta'; rebuild the bundle")
    targets = m.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and _NAME_RE.fullmatch(t) for t in targets):
        raise MalformedBundle("manifest 'targets' must be a non-empty list of target names; rebuild the bundle")
    if m.get("compression") != "zstd":
        raise MalformedBundle(f"manifest compression {m.get('compression')!r} is not supported (only zstd)")
    mav = _str(m, "min_agent_version", w)
    version_tuple(mav)
    files_raw = m.get("files")
    if not isinstance(files_raw, list) or not 1 <= len(files_raw) <= MAX_FILES:
        raise MalformedBundle(f"manifest 'files' must list 1..{MAX_FILES} files; rebuild the bundle")
    files: list[FileEntry] = []
    seen: set[str] = set()
    for i, f in enumerate(files_raw):
        fw = f"manifest file #{i}"
        if not isinstance(f, dict):
            raise MalformedBundle(f"{fw} is not an object; rebuild the bundle")
        path = _str(f, "path", fw, PATH_RE)
        if path in seen or path.lower() in {p.lower() for p in seen}:
            raise MalformedBundle(f"manifest lists {path!r} twice; rebuild the bundle")
        seen.add(path)
        enc = f.get("encoding")
        if enc not in ENCODINGS:
            raise MalformedBundle(f"{fw}: encoding {enc!r} is not one of {', '.join(ENCODINGS)}")
        if enc in DELTA_ENCODINGS and kind != "delta":
            raise MalformedBundle(f"{fw}: delta encoding {enc!r} in a full bundle; rebuild the bundle")
        role = f.get("role")
        if role not in ROLES:
            raise MalformedBundle(f"{fw}: role {role!r} is not one of {', '.join(ROLES)}")
        fe = FileEntry(path=path, role=role, length=_int(f, "length", fw, hi=MAX_FILE_LENGTH),
                       sha256=_hex(f, "sha256", fw), encoding=enc,
                       transport_length=_int(f, "transport_length", fw, hi=MAX_FILE_LENGTH),
                       transport_sha256=_hex(f, "transport_sha256", fw),
                       base_length=_int(f, "base_length", fw, hi=MAX_FILE_LENGTH) if enc in DELTA_ENCODINGS else None,
                       base_sha256=_hex(f, "base_sha256", fw) if enc in DELTA_ENCODINGS else None)
        if enc == BASE_COPY and (fe.transport_length != 0 or fe.base_sha256 != fe.sha256 or fe.base_length != fe.length):
            raise MalformedBundle(f"{fw}: base-copy must have no payload and equal base/target hashes")
        files.append(fe)
    content = _hex(m, "content_sha256", w)
    if content_digest([(f.path, f.length, f.sha256) for f in files]) != content:
        raise MalformedBundle("manifest content_sha256 does not match its file list; rebuild the bundle")
    base = m.get("base")
    if kind == "delta":
        if not isinstance(base, dict):
            raise MalformedBundle("delta manifest needs a 'base' object; rebuild the bundle")
        base_release = _int(base, "release", "manifest base")
        base_content = _hex(base, "content_sha256", "manifest base")
    else:
        if base is not None:
            raise MalformedBundle("full manifest must not name a base; rebuild the bundle")
        base_release = base_content = None
    created = parse_time(m.get("created"), "manifest created")
    expires = parse_time(m.get("expires"), "manifest expires")
    if expires <= created:
        raise MalformedBundle("manifest expires before it was created; rebuild the bundle")
    return Manifest(kind=kind, model=_str(m, "model", w, _NAME_RE), release=_int(m, "release", w),
                    version=_str(m, "version", w, _VERSION_RE), targets=tuple(targets), created=created, expires=expires,
                    min_agent_version=mav, compression="zstd", content_sha256=content, files=tuple(files),
                    base_release=base_release, base_content_sha256=base_content)
