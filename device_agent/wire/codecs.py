"""The payload encodings, one registry: their names, whether they need a base, and who codes them.

The board registers a *decoder* for each name (device_agent/bundle.py); the host registers an
*encoder* (edgepack's OTA writer). The manifest schema accepts exactly the names declared here,
so a new encoding is added in one place and both sides fail closed on a name they lack.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

ZSTD = "zstd"
BASE_COPY = "base-copy"
PATCH_FROM = "zstd-patch-from"
TENSOR_DELTA = "tensor-delta"


@dataclass(frozen=True)
class Codec:
    name: str
    delta: bool  # needs the board's previous release as its base
    doc: str


CODECS: dict[str, Codec] = {c.name: c for c in (
    Codec(ZSTD, False, "the file, zstd-compressed (window <= LIMITS.full_window_log)"),
    Codec(BASE_COPY, True, "the file is unchanged from the base release: no payload bytes"),
    Codec(PATCH_FROM, True, "zstd with the base file as prefix (--patch-from)"),
    Codec(TENSOR_DELTA, True, "ONNX-aware: per-tensor XOR/diff against the base, zstd frames"),
)}
ENCODINGS = tuple(CODECS)
DELTA_ENCODINGS = tuple(n for n, c in CODECS.items() if c.delta)

_decoders: dict[str, Callable[..., Any]] = {}
_encoders: dict[str, Callable[..., Any]] = {}


def _register(table: dict[str, Callable[..., Any]], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if name not in CODECS:
        raise KeyError(f"unknown encoding {name!r}: declare it in device_agent/wire/codecs.py first")
    table[name] = fn
    return fn


def register_decoder(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the board's decoder for ``name``."""
    return lambda fn: _register(_decoders, name, fn)


def register_encoder(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the host's encoder for ``name``."""
    return lambda fn: _register(_encoders, name, fn)


def decoder(name: str) -> Callable[..., Any]:
    return _decoders[name]


def encoder(name: str) -> Callable[..., Any]:
    return _encoders[name]


__all__ = ["Codec", "CODECS", "ENCODINGS", "DELTA_ENCODINGS", "ZSTD", "BASE_COPY", "PATCH_FROM", "TENSOR_DELTA",
           "register_decoder", "register_encoder", "decoder", "encoder"]
