"""Canonical JSON, timestamps and hashes: the byte-exact conventions signatures rely on.

(The clock itself lives in device_agent/durable.py; this module only formats and parses times.)

Signatures cover the exact manifest bytes stored in the bundle, so the reader never has to
re-serialize. The writer still emits canonical JSON (sorted keys, no whitespace, ASCII) so two
builds of the same release produce identical manifests and diffs of manifests stay readable.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from typing import Any

from ..errors import MalformedBundle
from .limits import LIMITS


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in JSON")


def _finite_float(s: str) -> float:
    v = float(s)
    if v != v or v in (float("inf"), float("-inf")):
        # 1e400 parses to inf: canonical JSON could not re-serialize it, and no field needs it
        raise ValueError(f"number {s[:40]} is out of range (not a finite double)")
    return v


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            # Duplicate keys let two parsers disagree about what was signed.
            raise ValueError(f"duplicate key {k!r} in JSON")
        d[k] = v
    return d


def parse_json(data: bytes, what: str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity. Raises MalformedBundle."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_object,
                          parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MalformedBundle(f"{what} is not valid JSON ({e}); rebuild the bundle with `edgepack bundle`") from None


def format_time(t: _dt.datetime) -> str:
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: Any, what: str) -> _dt.datetime:
    if not isinstance(s, str):
        raise MalformedBundle(f"{what} must be a UTC time string like 2030-01-01T00:00:00Z")
    try:
        return _dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        raise MalformedBundle(f"{what} {s!r} is not a UTC time like 2030-01-01T00:00:00Z") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_hex(s: Any, n: int) -> bool:
    return isinstance(s, str) and len(s) == n and all(c in "0123456789abcdef" for c in s)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def safe_text(s: Any, limit: int = 300) -> str:
    """A string from a bundle or a board, made safe to print on a terminal: control characters
    (ANSI escapes, carriage returns, bidi overrides) become visible ``\\xNN`` escapes and the
    length is bounded. Markup is the printer's business (rich: ``escape`` / ``Text``)."""
    t = str(s)
    if len(t) > limit:
        t = t[:limit] + "…"
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", t)


def parse_signatures(obj: Any, what: str) -> list[tuple[str, bytes]]:
    if not isinstance(obj, list) or len(obj) > LIMITS.max_signature_entries:
        raise MalformedBundle(f"{what}: 'signatures' must be a list of at most {LIMITS.max_signature_entries}")
    out = []
    for s in obj:
        if not (isinstance(s, dict) and is_hex(s.get("keyid"), 64) and is_hex(s.get("sig"), 128)):
            raise MalformedBundle(f"{what}: a signature entry is not {{keyid: 64 hex, sig: 128 hex}}")
        out.append((s["keyid"], bytes.fromhex(s["sig"])))
    return out
