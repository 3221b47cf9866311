"""Bounded reads and bounded zstd decompression.

Every read from an untrusted stream goes through here so a short file is always a
TruncatedBundle and too much data is always a LengthExceeded, never an IndexError or an
unbounded allocation.
"""
from __future__ import annotations

import hashlib
from typing import BinaryIO, Iterator

try:  # Python 3.14+: the standard library's module; before: its backport
    from compression import zstd
except ImportError:
    from backports import zstd

from ..errors import LengthExceeded, MalformedBundle, TruncatedBundle
from .limits import LIMITS

CHUNK = LIMITS.chunk  # 1 MiB: the unit of every streamed read/write
# Largest decoder window a bundle may ask for. Full payloads and tensor-delta frames are written
# with window_log <= 23 (8 MiB); a prefix-compressed frame (patch-from, tensor-delta glue) needs a
# window spanning prefix + output, which window_for() bounds from the signed lengths.
MAX_WINDOW_LOG = LIMITS.max_window_log
FRAME_WINDOW_LOG = LIMITS.frame_window_log


def window_for(n: int) -> int:
    """The window_log a frame over ``n`` bytes (prefix + output) needs: what the host writes."""
    import math
    return max(10, min(MAX_WINDOW_LOG, math.ceil(math.log2(max(n, 1024)))))


def read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    """Read exactly n bytes or raise TruncatedBundle."""
    out = bytearray()
    while len(out) < n:
        b = f.read(min(n - len(out), CHUNK))
        if not b:
            raise TruncatedBundle(f"bundle ends inside {what} ({len(out)} of {n} bytes); "
                                  "the file is cut short: copy it again")
        out += b
    return bytes(out)


class FrameReader:
    """Reads exactly ``length`` bytes of one payload frame, hashing them as they pass."""

    def __init__(self, f: BinaryIO, length: int, what: str):
        self._f = f
        self.remaining = length
        self.what = what
        self.hash = hashlib.sha256()

    def read(self, n: int = CHUNK) -> bytes:
        """Up to n bytes; b'' only at the end of the frame."""
        if self.remaining <= 0:
            return b""
        b = self._f.read(min(n, self.remaining, CHUNK))
        if not b:
            raise TruncatedBundle(f"bundle ends inside {self.what} ({self.remaining} bytes missing); "
                                  "the file is cut short: copy it again")
        self.remaining -= len(b)
        self.hash.update(b)
        return b

    def read_exact(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise MalformedBundle(f"{what} claims {n} bytes but only {self.remaining} remain in {self.what}; "
                                  "rebuild the bundle")
        out = bytearray()
        while len(out) < n:
            out += self.read(n - len(out))
        return bytes(out)

    def drain(self) -> None:
        while self.read():
            pass


def zstd_stream(src: "FrameReader", comp_len: int, out_len: int, what: str,
                zstd_dict: zstd.ZstdDict | None = None,
                window_log_max: int = FRAME_WINDOW_LOG) -> Iterator[bytes]:
    """Decompress one zstd frame of ``comp_len`` bytes read from ``src`` into exactly ``out_len`` bytes.

    Yields chunks of at most CHUNK bytes. Raises LengthExceeded if the frame decodes past
    ``out_len`` (a decompression bomb or a payload from another release), MalformedBundle if
    it is corrupt or ends early. Memory: one input chunk + one output chunk + the zstd window.
    """
    try:
        d = zstd.ZstdDecompressor(zstd_dict=zstd_dict,
                                  options={zstd.DecompressionParameter.window_log_max: window_log_max})
    except (zstd.ZstdError, ValueError) as e:
        raise MalformedBundle(f"{what}: cannot set up zstd ({e})") from None
    produced = 0
    left = comp_len
    pending = b""
    while True:
        if d.eof:
            break
        if d.needs_input:
            if left <= 0:
                break
            pending = src.read(min(CHUNK, left))
            if not pending:  # the enclosing frame ended before this zstd frame's declared size
                raise MalformedBundle(f"{what}: declared compressed size runs past the end of its payload; "
                                      "the bundle is corrupt: rebuild it")
            left -= len(pending)
        else:
            pending = b""
        try:
            out = d.decompress(pending, max_length=CHUNK)
        except zstd.ZstdError as e:
            raise MalformedBundle(f"{what} is not valid zstd data ({e}); the bundle is corrupt: rebuild or copy it again") from None
        if out:
            produced += len(out)
            if produced > out_len:
                raise LengthExceeded(f"{what} decompresses past its signed length of {out_len} bytes; "
                                     "refusing it (corrupt or hostile bundle)")
            yield out
    if not d.eof:
        raise MalformedBundle(f"{what}: zstd frame is incomplete; the bundle is corrupt: rebuild or copy it again")
    if d.unused_data or left > 0:
        raise LengthExceeded(f"{what} has {len(d.unused_data) + left} bytes after its zstd frame; "
                             "refusing it (corrupt or hostile bundle)")
    if produced != out_len:
        raise TruncatedBundle(f"{what} decompresses to {produced} bytes, signed length is {out_len}; "
                              "the bundle is corrupt: rebuild it")
