"""Every bound the bundle reader enforces, in one frozen object that docs/bundle-format.md quotes.

Why one object: a bound written as a literal in the reader, another in the writer and a third in
the format document drifts apart; the host writer, the board reader and the document's table
(checked by tests/test_layering.py) all read these fields.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Limits:
    max_trust_section: int = 1 << 20       # bytes of the embedded trust documents
    max_manifest: int = 1 << 20            # bytes of the signed manifest
    max_signatures: int = 64 << 10         # bytes of the signature list
    max_signature_entries: int = 64        # signatures on one document or manifest
    max_files: int = 256                   # payload files in one bundle
    max_file_length: int = 1 << 40         # bytes of one file (rebuilt or in transport)
    chunk: int = 1 << 20                   # unit of every streamed read and write
    full_window_log: int = 23              # zstd window of a full payload: 8 MiB, what a board can afford
    frame_window_log: int = 23             # zstd window of tensor-delta frames
    max_window_log: int = 31               # largest window a prefix (patch-from) frame may ask for
    max_buffered_frame: int = 8 << 20      # frames up to this size are read once and decoded from the hashed copy
    max_clock_skew: _dt.timedelta = _dt.timedelta(days=1)  # "created" later than now + this is refused


LIMITS = Limits()

__all__ = ["Limits", "LIMITS"]
