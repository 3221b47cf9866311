"""Apply delta payloads on the board, streaming, in bounded memory.

Two patch encodings (docs/bundle-format.md, "Delta payloads"):

``tensor-delta`` (ONNX): a zstd-compressed JSON header lists the ops; the new file is rebuilt as a sequence of ops. The "glue" (all bytes
that are not large initializer tensors: graph, node attributes, small tensors) is one zstd frame
compressed with the base file's glue as a raw prefix. Each large tensor is either copied from
the base (unchanged), or rebuilt from the base tensor plus a zstd-compressed XOR or wrap-around
difference whose bytes are grouped by byte plane (all byte-0s, then all byte-1s, ...), chunk by
chunk. Memory: the glue (capped at MAX_GLUE) plus a few 1 MiB chunks, independent of model size.

``zstd-patch-from`` (anything else): one zstd frame compressed with the whole base file as a
raw prefix and long-distance matching. The decoder needs the base in memory, so this encoding is
capped at MAX_PATCH_FROM_BASE; bigger non-ONNX files fall back to full zstd on the host.

Nothing here trusts the patch: every offset and length is bounds-checked and errors are named
(MalformedPatch, LengthExceeded, TruncatedBundle). The caller verifies the reconstructed bytes
against the signed SHA-256 before anything is renamed into place.
"""
from __future__ import annotations

import struct
from typing import BinaryIO, Iterator

import numpy as np
try:  # Python 3.14+: the standard library's module; before: its backport
    from compression import zstd
except ImportError:
    from backports import zstd

from .wire.encoding import parse_json
from .wire.streams import CHUNK, FrameReader, window_for, zstd_stream
from .errors import MalformedBundle, MalformedPatch

PATCH_MAGIC = b"EPTDELT1"
MAX_PATCH_HEADER = 16 << 20
MAX_OPS = 1 << 20
MAX_GLUE = 64 << 20
MAX_PATCH_FROM_BASE = 256 << 20
PATCH_FROM_WINDOW_LOG = 31
ELEM_SIZES = (1, 2, 4, 8)
_UINT = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}


def chunk_bytes(elem: int) -> int:
    """Bytes per byte-plane chunk: a multiple of the element size close to 1 MiB."""
    return (CHUNK // elem) * elem


def to_planes(data: bytes, elem: int) -> bytes:
    """Group bytes by plane: for float32 the sign/exponent bytes of all weights end up together,
    where consecutive fine-tuned weights share them and zstd finds long runs."""
    if elem == 1:
        return bytes(data)
    a = np.frombuffer(data, dtype=np.uint8).reshape(-1, elem)
    return a.T.tobytes()


def from_planes(data: bytes, elem: int) -> bytes:
    if elem == 1:
        return bytes(data)
    a = np.frombuffer(data, dtype=np.uint8).reshape(elem, -1)
    return a.T.tobytes()


def xor_encode(new: bytes, old: bytes, elem: int) -> bytes:
    d = np.bitwise_xor(np.frombuffer(new, np.uint8), np.frombuffer(old, np.uint8))
    return to_planes(d.tobytes(), elem)


def sub_encode(new: bytes, old: bytes, elem: int) -> bytes:
    dt = _UINT[elem]
    d = np.frombuffer(new, dt) - np.frombuffer(old, dt)  # wraps modulo 2**bits
    return to_planes(d.tobytes(), elem)


def _decode(kind: str, planes: bytes, old: bytes, elem: int) -> memoryview:
    """Inverse of xor_encode/sub_encode for one chunk; returns a flat byte view (no extra copy)."""
    d = np.frombuffer(planes, dtype=np.uint8).reshape(elem, -1).T  # a view: bytes back in element order
    o = np.frombuffer(old, dtype=np.uint8).reshape(-1, elem)
    if kind == "x":
        res = np.bitwise_xor(d, o)
    else:
        dt = _UINT[elem]
        res = np.add(np.ascontiguousarray(d).view(dt), o.view(dt))  # wraps modulo 2**bits
    return np.ascontiguousarray(res).reshape(-1).data.cast("B")


def _read_base(base: BinaryIO, off: int, n: int) -> bytes:
    base.seek(off)
    b = base.read(n)
    if len(b) != n:
        raise MalformedPatch(f"patch reads base bytes {off}..{off + n} past the base's end; rebuild the delta")
    return b


def _rechunk(stream: Iterator[bytes], size: int) -> Iterator[bytes]:
    """Regroup decompressed pieces into ``size``-byte chunks (the encoder's plane-chunk size)."""
    buf = bytearray()
    for piece in stream:
        if not buf and len(piece) == size:
            yield piece  # the common case: zstd_stream already yields CHUNK-sized pieces
            continue
        buf += piece
        while len(buf) >= size:
            out = bytes(memoryview(buf)[:size])
            del buf[:size]
            yield out
    if buf:
        yield bytes(buf)


def _ints(op: list, n: int, what: str) -> list[int]:
    vals = op[1:]
    if len(vals) != n or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62 for v in vals):
        raise MalformedPatch(f"{what}: op {op[:1]} needs {n} non-negative integers; rebuild the delta")
    return vals


def _read_patch_header(src: FrameReader, base_length: int, target_length: int, what: str) -> dict:
    """The patch's compressed JSON header, checked against the signed lengths."""
    try:
        magic = src.read_exact(8, f"{what} magic")
        if magic != PATCH_MAGIC:
            raise MalformedPatch(f"{what} is not a tensor-delta patch (bad magic); rebuild the delta")
        hcomp, hlen = struct.unpack(">II", src.read_exact(8, f"{what} header length"))
        if hlen > MAX_PATCH_HEADER or hcomp > MAX_PATCH_HEADER:
            raise MalformedPatch(f"{what} header is {hlen} bytes (max {MAX_PATCH_HEADER}); rebuild the delta")
        raw = b"".join(zstd_stream(src, hcomp, hlen, f"{what} header"))
        header = parse_json(raw, f"{what} header")
    except MalformedBundle as e:
        raise MalformedPatch(str(e)) from None
    if not isinstance(header, dict):
        raise MalformedPatch(f"{what} header is not an object; rebuild the delta")
    if header.get("base_length") != base_length or header.get("target_length") != target_length:
        raise MalformedPatch(f"{what} header lengths disagree with the signed manifest; rebuild the delta")
    glue, ops = header.get("glue"), header.get("ops")
    if not isinstance(glue, dict) or not isinstance(ops, list) or len(ops) > MAX_OPS:
        raise MalformedPatch(f"{what} header needs 'glue' and 'ops'; rebuild the delta")
    return header


def _read_glue(src: FrameReader, base: BinaryIO, glue: dict, base_length: int, what: str) -> bytes:
    """The glue (graph bytes between tensors), decompressed with its base spans as zstd prefix."""
    spans = glue.get("base_spans")
    if not isinstance(spans, list) or len(spans) > MAX_OPS:
        raise MalformedPatch(f"{what}: glue base_spans must be a list; rebuild the delta")
    glue_len, glue_comp = _ints(["glue", glue.get("length"), glue.get("comp_length")], 2, what)
    if glue_len > MAX_GLUE:
        raise MalformedPatch(f"{what}: glue of {glue_len} bytes exceeds {MAX_GLUE}; rebuild the delta")
    prefix = bytearray()
    for sp in spans:
        if not isinstance(sp, list):
            raise MalformedPatch(f"{what}: glue span is not a list; rebuild the delta")
        off, n = _ints(["span", *sp], 2, what)
        if off + n > base_length or len(prefix) + n > MAX_GLUE:
            raise MalformedPatch(f"{what}: glue span {off}+{n} is outside the base; rebuild the delta")
        prefix += _read_base(base, off, n)
    zd = zstd.ZstdDict(bytes(prefix), is_raw=True).as_prefix if prefix else None
    return b"".join(zstd_stream(src, glue_comp, glue_len, f"{what} glue", zstd_dict=zd,
                                window_log_max=max(23, window_for(len(prefix) + glue_len))))


def _tensor_op(src: FrameReader, base: BinaryIO, k: str, op: list, base_length: int, room: int,
               what: str) -> Iterator[bytes]:
    """One XOR ("x") or difference ("s") op: the base tensor's bytes combined with the patch's planes."""
    elem, off, n, comp = _ints(op, 4, what)
    if elem not in ELEM_SIZES or n % elem or off + n > base_length or n > room:
        raise MalformedPatch(f"{what}: tensor op out of bounds or misaligned; rebuild the delta")
    pos = 0
    for planes in _rechunk(zstd_stream(src, comp, n, f"{what} tensor delta"), chunk_bytes(elem)):
        old = _read_base(base, off + pos, len(planes))
        if len(planes) % elem:
            raise MalformedPatch(f"{what}: tensor delta chunk misaligned; rebuild the delta")
        yield _decode(k, planes, old, elem)
        pos += len(planes)


def iter_tensor_delta(src: FrameReader, base: BinaryIO, base_length: int, target_length: int,
                      what: str) -> Iterator[bytes]:
    """Yield the reconstructed file, chunk by chunk, from a tensor-delta patch read off ``src``."""
    header = _read_patch_header(src, base_length, target_length, what)
    glue_bytes = _read_glue(src, base, header["glue"], base_length, what)
    glue_len = len(glue_bytes)
    gpos = produced = 0
    for op in header["ops"]:
        if not isinstance(op, list) or not op or not isinstance(op[0], str):
            raise MalformedPatch(f"{what}: malformed op; rebuild the delta")
        k = op[0]
        if k == "g":
            (n,) = _ints(op, 1, what)
            if gpos + n > glue_len:
                raise MalformedPatch(f"{what}: ops use more glue than the patch carries; rebuild the delta")
            for i in range(gpos, gpos + n, CHUNK):
                yield glue_bytes[i:min(i + CHUNK, gpos + n)]
            gpos += n
        elif k == "c":
            off, n = _ints(op, 2, what)
            if off + n > base_length:
                raise MalformedPatch(f"{what}: copy op reads past the base; rebuild the delta")
            for i in range(0, n, CHUNK):
                yield _read_base(base, off + i, min(CHUNK, n - i))
        elif k == "z":
            n, comp = _ints(op, 2, what)
            if produced + n > target_length:
                raise MalformedPatch(f"{what}: ops produce more than the target length; rebuild the delta")
            yield from zstd_stream(src, comp, n, f"{what} tensor data")
        elif k in ("x", "s"):
            n = _ints(op, 4, what)[2]
            yield from _tensor_op(src, base, k, op, base_length, target_length - produced, what)
        else:
            raise MalformedPatch(f"{what}: unknown op {k!r}; update the device agent or rebuild the delta")
        produced += n
        if produced > target_length:
            raise MalformedPatch(f"{what}: ops produce more than the target length; rebuild the delta")
    if gpos != glue_len or produced != target_length:
        raise MalformedPatch(f"{what}: ops do not rebuild exactly the target ({produced} of {target_length} bytes); "
                             "rebuild the delta")


def iter_patch_from(src: FrameReader, base: BinaryIO, base_length: int, target_length: int, comp_length: int,
                    what: str) -> Iterator[bytes]:
    """Yield the file rebuilt from a zstd frame compressed with the whole base as its prefix."""
    if base_length > MAX_PATCH_FROM_BASE:
        raise MalformedPatch(f"{what}: patch-from base of {base_length} bytes exceeds {MAX_PATCH_FROM_BASE}; "
                             "send a full bundle instead")
    base.seek(0)
    data = base.read()
    if len(data) != base_length:
        raise MalformedPatch(f"{what}: base file changed while applying; retry")
    zd = zstd.ZstdDict(data, is_raw=True).as_prefix if data else None
    # the window spans base + target, never more (a frame asking for 2 GiB on a 1 MiB file is refused)
    yield from zstd_stream(src, comp_length, target_length, what, zstd_dict=zd,
                           window_log_max=max(23, min(PATCH_FROM_WINDOW_LOG, window_for(base_length + target_length))))
