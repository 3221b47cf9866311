"""Make delta payloads and delta bundles (the board applies them with device_agent.delta_apply).

Per file the smallest of these wins:

* ``base-copy``: the file did not change (no payload at all);
* ``tensor-delta`` (ONNX): initializers are matched by name. Unchanged tensors are referenced
  in the base; changed tensors of the same size are encoded as XOR or as wrap-around difference
  (whichever compresses smaller; XOR suits float weights, difference suits re-quantized int8),
  with bytes grouped by byte plane, then zstd. Everything else (graph, small tensors such as
  scales and zero points) is the "glue", compressed with the base's glue as zstd prefix;
* ``zstd-patch-from``: one zstd frame with the base file as raw prefix and long-distance
  matching (the byte-level fallback for .tflite, settings, golden data);
* ``zstd``: the full file, when no delta is smaller.

And for the bundle as a whole: when the delta bundle would not be smaller than the full
bundle, the full bundle is written instead (``DeltaReport.fallback``).

One zstd library for everything: backports.zstd (Python 3.14's compression.zstd). It exposes
raw-content prefixes (``ZstdDict(..., is_raw=True).as_prefix``, i.e. zstd's patch-from) and the
long-distance-matching parameters; the ``zstandard`` package has no public prefix API.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

try:  # Python 3.14+: the standard library's module; before: its backport
    from compression import zstd
except ImportError:
    from backports import zstd

from device_agent import bundle as reader
from device_agent import durable
from device_agent.durable import sha256_of_file, utc_now
from device_agent.wire import codecs
from device_agent.wire.encoding import canonical_json
from device_agent.wire.manifest import FileEntry
from device_agent.wire.streams import CHUNK, FRAME_WINDOW_LOG
from device_agent.delta_apply import (MAX_GLUE, MAX_PATCH_FROM_BASE, PATCH_MAGIC, chunk_bytes, sub_encode,
                                      xor_encode)
from device_agent.trust import TrustRoot

from .bundle import Frame, check_written, make_manifest, write_container
from ..errors import UsageError
from .keys import SigningKey

MIN_TENSOR = 256  # smaller initializers stay in the glue: per-op overhead would outweigh the gain
DEFAULT_LEVEL = 19

# ONNX TensorProto.DataType -> element size in bytes (for byte-plane grouping)
_ELEM = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2,
         17: 1, 18: 1, 19: 1, 20: 1, 21: 1, 22: 1}


BOARD_PATCH_FROM_BASE = 64 << 20   # an external data file above this is tensor-delta coded only

# --------------------------------------------------------------------------- ONNX wire format
@dataclass(frozen=True)
class TensorSpan:
    name: str
    elem: int
    offset: int  # of the raw_data bytes in the file
    length: int


class _NotOnnx(Exception):
    pass


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _NotOnnx("bad varint")
        b = buf[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            return v, pos
        shift += 7


def _fields(buf: Any, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field, wire_type, value_or_start, length, next_pos) for each field of a message."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        fno, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = _varint(buf, pos, end)
            yield fno, wt, v, 0, pos
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _NotOnnx("length past end")
            yield fno, wt, pos, n, pos + n
            pos += n
        elif wt == 1:
            pos += 8
            yield fno, wt, 0, 0, pos
        elif wt == 5:
            pos += 4
            yield fno, wt, 0, 0, pos
        else:
            raise _NotOnnx(f"wire type {wt}")
    if pos != end:
        raise _NotOnnx("message overruns")


def onnx_tensor_spans(buf: Any) -> list[TensorSpan]:
    """Byte ranges of every main-graph initializer's raw_data, found by walking the protobuf.

    Walking the wire format (instead of onnx.load) gives exact file offsets and needs no copy
    of the tensors. Raises _NotOnnx for anything that is not an ONNX ModelProto.
    """
    end = len(buf)
    spans: list[TensorSpan] = []
    saw_ir = saw_graph = False
    for fno, wt, start, n, _ in _fields(buf, 0, end):
        if fno == 1 and wt == 0:
            saw_ir = True
        if fno == 7 and wt == 2:
            saw_graph = True
            for gf, gwt, gs, gn, _ in _fields(buf, start, start + n):
                if gf == 5 and gwt == 2:
                    name, dtype, raw = None, 0, None
                    for tf, twt, ts, tn, _ in _fields(buf, gs, gs + gn):
                        if tf == 8 and twt == 2:
                            name = bytes(buf[ts:ts + tn]).decode("utf-8", "replace")
                        elif tf == 2 and twt == 0:
                            dtype = ts
                        elif tf == 9 and twt == 2:
                            raw = (ts, tn)
                    if name is not None and raw is not None:
                        spans.append(TensorSpan(name, _ELEM.get(dtype, 1), raw[0], raw[1]))
    if not (saw_ir and saw_graph):
        raise _NotOnnx("no ir_version/graph")
    return sorted(spans, key=lambda s: s.offset)


# --------------------------------------------------------------------------- per-file deltas
def _compressor(level: int, window_log: int | None = None, ldm: bool = False,
                prefix: bytes | None = None) -> zstd.ZstdCompressor:
    opts: dict[Any, int] = {zstd.CompressionParameter.compression_level: level,
                            zstd.CompressionParameter.checksum_flag: 0,
                            zstd.CompressionParameter.content_size_flag: 0}
    if window_log:
        opts[zstd.CompressionParameter.window_log] = window_log
    if ldm:
        opts[zstd.CompressionParameter.enable_long_distance_matching] = 1
    zd = zstd.ZstdDict(prefix, is_raw=True).as_prefix if prefix else None
    return zstd.ZstdCompressor(options=opts, zstd_dict=zd)


def _compress_chunks(chunks: Iterator[bytes], level: int) -> bytes:
    c = _compressor(level, window_log=FRAME_WINDOW_LOG)  # boards decode these with an 8 MiB window at most
    out = bytearray()
    for ch in chunks:
        out += c.compress(ch)
    out += c.flush(zstd.ZstdCompressor.FLUSH_FRAME)
    return bytes(out)


def _window_for(n: int) -> int:
    return max(10, min(31, math.ceil(math.log2(max(n, 1024)))))


SELECT_LEVEL = 3  # candidates are compared at a cheap level; only the winner gets the full level


def _tensor_candidates(new: memoryview, old: memoryview, elem: int, level: int) -> tuple[str, bytes]:
    """Smallest of XOR, wrap-around difference (both byte-plane grouped) and the plain tensor."""
    cb = chunk_bytes(elem)
    n = len(new)

    def chunks(kind: str) -> Iterator[bytes]:
        if kind == "z":
            return (bytes(new[i:i + CHUNK]) for i in range(0, n, CHUNK))
        enc = xor_encode if kind == "x" else sub_encode
        return (enc(new[i:i + cb], old[i:i + cb], elem) for i in range(0, n, cb))

    sel = min(("x", "s", "z"), key=lambda k: len(_compress_chunks(chunks(k), min(level, SELECT_LEVEL))))
    return sel, _compress_chunks(chunks(sel), level)


def external_spans(graph: Path, data_name: str) -> list[TensorSpan]:
    """Byte ranges, in the external data file ``data_name``, of the initializers ``graph`` keeps there.

    An LLM's weights live in ``model.onnx.data`` (the graph names offset and length of each):
    with these spans the data file gets the same tensor-delta as an ONNX file (unchanged tensors
    copied from the base, changed ones XOR/difference-coded), which the board applies streaming,
    where a byte-level patch-from would make it hold the whole base in memory."""
    import onnx
    try:
        m = onnx.load(str(graph), load_external_data=False)
    except Exception:  # not a readable graph: no spans
        return []
    spans = []
    for t in m.graph.initializer:
        kv = {e.key: e.value for e in t.external_data}
        if kv.get("location") == data_name and "length" in kv:
            spans.append(TensorSpan(t.name, _ELEM.get(t.data_type, 1), int(kv.get("offset", 0)), int(kv["length"])))
    return sorted(spans, key=lambda s: s.offset)


def graph_naming(folder: Path, data_name: str) -> Path | None:
    """The ONNX graph in ``folder`` whose weights live in ``data_name``, if one does."""
    for g in sorted(Path(folder).glob("*.onnx")):
        if g.stat().st_size <= 64 << 20 and external_spans(g, data_name):
            return g
    return None


@codecs.register_encoder(codecs.TENSOR_DELTA)
def tensor_delta(old_path: Path, new_path: Path, out: BinaryIO, *, level: int = DEFAULT_LEVEL,
                 spans: tuple[list[TensorSpan], list[TensorSpan]] | None = None) -> dict[str, Any]:
    """Write a tensor-delta patch for two ONNX files (or two external data files, given their
    ``spans``) into ``out``; returns stats. Raises _NotOnnx."""
    # Host side: plain reads (the host has memory; the board's apply is the part that streams).
    return _tensor_delta(memoryview(Path(old_path).read_bytes()), memoryview(Path(new_path).read_bytes()), out, level,
                         spans)


def _tensor_delta(old: memoryview, new: memoryview, out: BinaryIO, level: int,
                  spans: tuple[list[TensorSpan], list[TensorSpan]] | None = None) -> dict[str, Any]:
    os_, ns_ = spans if spans is not None else (onnx_tensor_spans(old), onnx_tensor_spans(new))
    old_spans = [s for s in os_ if s.length >= MIN_TENSOR and s.offset + s.length <= len(old)]
    new_spans = [s for s in ns_ if s.length >= MIN_TENSOR and s.offset + s.length <= len(new)]
    if not new_spans:
        raise _NotOnnx("no large initializers")
    old_by_name = {s.name: s for s in old_spans}
    # glue of the base: everything outside its large tensors (the prefix for the new glue)
    base_spans: list[list[int]] = []
    pos = 0
    for s in old_spans:
        if s.offset > pos:
            base_spans.append([pos, s.offset - pos])
        pos = max(pos, s.offset + s.length)
    if pos < len(old):
        base_spans.append([pos, len(old) - pos])
    old_glue = b"".join(bytes(old[o:o + n]) for o, n in base_spans)
    ops: list[list[Any]] = []
    glue = bytearray()
    blobs: list[bytes] = []
    stats = {"copied": 0, "xor": 0, "sub": 0, "raw": 0, "tensors": len(new_spans)}
    pos = 0
    for s in new_spans:
        if s.offset > pos:
            ops.append(["g", s.offset - pos])
            glue += new[pos:s.offset]
        pos = s.offset + s.length
        nb = new[s.offset:s.offset + s.length]
        o = old_by_name.get(s.name)
        if o is not None and o.length == s.length and old[o.offset:o.offset + o.length] == nb:
            ops.append(["c", o.offset, s.length])
            stats["copied"] += 1
            continue
        if o is not None and o.length == s.length and o.elem == s.elem:
            kind, data = _tensor_candidates(nb, old[o.offset:o.offset + o.length], s.elem, level)
        else:
            kind, data = "z", _compress_chunks((bytes(nb[i:i + CHUNK]) for i in range(0, len(nb), CHUNK)), level)
        if kind == "z":
            ops.append(["z", s.length, len(data)])
            stats["raw"] += 1
        else:
            ops.append([kind, s.elem, o.offset, s.length, len(data)])  # type: ignore[union-attr]
            stats["xor" if kind == "x" else "sub"] += 1
        blobs.append(data)
    if pos < len(new):
        ops.append(["g", len(new) - pos])
        glue += new[pos:]
    if len(glue) > MAX_GLUE or len(old_glue) > MAX_GLUE:
        raise _NotOnnx("glue too large for the board's bounded memory")
    gc = _compressor(level, window_log=_window_for(len(old_glue) + len(glue)), prefix=old_glue or None)
    gdata = gc.compress(bytes(glue), zstd.ZstdCompressor.FLUSH_FRAME)
    header = canonical_json({"base_length": len(old), "target_length": len(new), "ops": ops,
                             "glue": {"length": len(glue), "comp_length": len(gdata), "base_spans": base_spans}})
    hdata = _compressor(level, window_log=FRAME_WINDOW_LOG).compress(header, zstd.ZstdCompressor.FLUSH_FRAME)
    out.write(PATCH_MAGIC + struct.pack(">II", len(hdata), len(header)) + hdata + gdata)
    for b in blobs:
        out.write(b)
    stats.update(glue_bytes=len(glue), glue_comp=len(gdata), header_bytes=len(header), header_comp=len(hdata))
    return stats


@codecs.register_encoder(codecs.PATCH_FROM)
def patch_from(old_path: Path, new_path: Path, out: BinaryIO, *, level: int = DEFAULT_LEVEL) -> None:
    """Byte-level delta: zstd with the base as raw prefix and long-distance matching (zstd --patch-from)."""
    base = Path(old_path).read_bytes()
    size = os.path.getsize(new_path)
    c = _compressor(level, window_log=_window_for(len(base) + size), ldm=True, prefix=base or None)
    with open(new_path, "rb") as f:
        while chunk := f.read(CHUNK):
            out.write(c.compress(chunk))
    out.write(c.flush(zstd.ZstdCompressor.FLUSH_FRAME))


@dataclass
class FileDelta:
    encoding: str  # tensor-delta | zstd-patch-from
    size: int
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)


def make_file_delta(old_path: str | Path, new_path: str | Path, out_path: str | Path, *,
                    level: int = DEFAULT_LEVEL, try_patch_from: bool = True,
                    spans: tuple[list[TensorSpan], list[TensorSpan]] | None = None) -> FileDelta:
    """Write the smaller of tensor-delta (ONNX, or external data with ``spans``) and zstd
    patch-from for one file pair to ``out_path``."""
    old_path, new_path, out_path = Path(old_path), Path(new_path), Path(out_path)
    t0 = time.perf_counter()
    best: FileDelta | None = None
    tmp_t = out_path.with_name(out_path.name + ".td")
    tmp_p = out_path.with_name(out_path.name + ".pf")
    try:
        try:
            with open(tmp_t, "wb") as f:
                stats = tensor_delta(old_path, new_path, f, level=level, spans=spans)
            best = FileDelta(codecs.TENSOR_DELTA, tmp_t.stat().st_size, 0.0, stats)
        except _NotOnnx:
            tmp_t.unlink(missing_ok=True)
        base_size = old_path.stat().st_size
        if (best is None or try_patch_from) and base_size <= MAX_PATCH_FROM_BASE:
            with open(tmp_p, "wb") as f:
                patch_from(old_path, new_path, f, level=level)
            if best is None or tmp_p.stat().st_size < best.size:
                best = FileDelta(codecs.PATCH_FROM, tmp_p.stat().st_size, 0.0, {})
        if best is None:
            raise UsageError(f"{old_path} is too large for a byte-level delta and not ONNX; send the full bundle")
        os.replace(tmp_t if best.encoding == codecs.TENSOR_DELTA else tmp_p, out_path)
        best.seconds = time.perf_counter() - t0
        return best
    finally:
        tmp_t.unlink(missing_ok=True)
        tmp_p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- delta bundles
@dataclass
class DeltaReport:
    path: Path
    fallback: bool  # True: the full bundle was written because the delta was not smaller
    bundle_bytes: int
    full_bundle_bytes: int
    base_release: int
    release: int
    files: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def _initializer_names(p: Path) -> set[tuple[str, int]]:
    """The graph's weights as (name, byte length): what a retrained or renamed model keeps."""
    try:
        return {(s.name, s.length) for s in onnx_tensor_spans(memoryview(p.read_bytes()))}
    except Exception:  # not ONNX (or not parseable): no graph to match on
        return set()


def pair_files(new_files: list[Any], old_files: list[Any], d_new: Path, d_old: Path) -> dict[str, tuple[str, str]]:
    """For each NEW file without a same-path file in OLD: the OLD file it corresponds to, matched by
    role (the only unmatched OLD file of that role), then by graph (the ONNX file sharing the most
    initializers by name and size). ``{new_path: (old_path, "role" | "graph")}``."""
    old_paths = {f.path for f in old_files}
    new_paths = {f.path for f in new_files}
    free = [f for f in old_files if f.path not in new_paths]
    out: dict[str, tuple[str, str]] = {}
    for fe in (f for f in new_files if f.path not in old_paths):
        cands = [o for o in free if o.role == fe.role and o.path not in {v[0] for v in out.values()}]
        if len(cands) == 1:
            out[fe.path] = (cands[0].path, "role")
        elif len(cands) > 1 and fe.path.endswith(".onnx"):
            mine = _initializer_names(d_new / fe.path)
            scored = sorted(((len(mine & _initializer_names(d_old / o.path)), o.path) for o in cands), reverse=True)
            if scored and scored[0][0] > 0 and (len(scored) == 1 or scored[0][0] > scored[1][0]):
                out[fe.path] = (scored[0][1], "graph")
    return out


def _frame_for(fe: FileEntry, full: Frame, ofe: FileEntry | None, pair: tuple[str, str] | None, base_release: int,
               d_old: Path, d_new: Path, tdp: Path, level: int) -> tuple[Frame, dict[str, Any], list[str]]:
    """One file of the delta: a base copy, the smaller of its patches, or the full frame (and why)."""
    if ofe is None:
        row: dict[str, Any] = {"path": fe.path, "encoding": "zstd", "bytes": fe.transport_length}
        if pair is None:
            return full, row, []
        # boards find a delta's base file by its path in the bundle: a renamed file cannot be
        # patched until the format carries a base path, so it is sent whole, and said so
        old_path, by = pair
        row.update(paired_with=old_path, paired_by=by)
        return full, row, [f"{fe.path} corresponds to {old_path} of release {base_release} (matched by {by}) "
                           f"but has another name, so it is sent whole; keep the file name across releases "
                           f"(`edgepack bundle` carries a single model as NAME.onnx) to get a delta"]
    base = dict(base_length=ofe.length, base_sha256=ofe.sha256)
    if ofe.sha256 == fe.sha256:
        e = FileEntry(path=fe.path, role=fe.role, length=fe.length, sha256=fe.sha256, encoding=codecs.BASE_COPY,
                      transport_length=0, transport_sha256=hashlib.sha256(b"").hexdigest(), **base)
        return Frame(e, d_new / fe.path), {"path": fe.path, "encoding": codecs.BASE_COPY, "bytes": 0}, []
    patch = tdp / f"{fe.path}.patch"
    fd = make_file_delta(d_old / fe.path, d_new / fe.path, patch, level=level, **_data_file_options(fe, d_old, d_new))
    if fd.size < fe.transport_length:
        e = FileEntry(path=fe.path, role=fe.role, length=fe.length, sha256=fe.sha256, encoding=fd.encoding,
                      transport_length=fd.size, transport_sha256=sha256_of_file(patch), **base)
        return Frame(e, patch), {"path": fe.path, "encoding": fd.encoding, "bytes": fd.size, **fd.stats}, []
    return full, {"path": fe.path, "encoding": "zstd", "bytes": fe.transport_length, "delta_bytes": fd.size}, []


def _data_file_options(fe: FileEntry, d_old: Path, d_new: Path) -> dict[str, Any]:
    """An external data file (role extra, named by a graph on both sides) is delta-coded tensor by
    tensor; past BOARD_PATCH_FROM_BASE its byte-level patch-from is not even tried, since the board
    would hold the whole base in memory to apply it."""
    if fe.role != "extra" or fe.path.endswith(".onnx"):
        return {}
    go, gn = graph_naming(d_old, fe.path), graph_naming(d_new, fe.path)
    if go is None or gn is None:
        return {}
    spans = (external_spans(go, fe.path), external_spans(gn, fe.path))
    return {"spans": spans, "try_patch_from": fe.length <= BOARD_PATCH_FROM_BASE}


def make_delta_bundle(old_bundle: str | Path, new_bundle: str | Path, out: str | Path, *, trust: TrustRoot,
                      signer: SigningKey | Sequence[SigningKey], level: int = DEFAULT_LEVEL,
                      now: _dt.datetime | None = None) -> DeltaReport:
    """Delta bundle taking a board from OLD's release to NEW's. Both inputs are verified first.

    The delta manifest repeats NEW's signed facts (release, targets, expiry, the hashes of the
    files the board ends up with) and adds the base release; it is signed by ``signer``.
    """
    t0 = time.perf_counter()
    now = now or utc_now()
    signers = [signer] if isinstance(signer, SigningKey) else list(signer)
    out = Path(out)
    ov = reader.open_bundle(old_bundle, trust, now=now)
    nv = reader.open_bundle(new_bundle, trust, now=now)
    if nv.kind != "full" or ov.kind != "full":
        raise UsageError("edgepack delta takes two full bundles (OLD and NEW), not delta bundles")
    if ov.manifest.model != nv.manifest.model:
        raise UsageError(f"OLD is model {ov.manifest.model!r}, NEW is {nv.manifest.model!r}: a delta needs the same model")
    if nv.release <= ov.release:
        raise UsageError(f"NEW release {nv.release} must be higher than OLD release {ov.release}")
    with tempfile.TemporaryDirectory(prefix="edgepack-delta-") as td:
        tdp = Path(td)
        d_old, d_new = tdp / "old", tdp / "new"
        reader.extract(ov, d_old)
        reader.extract(nv, d_new)
        old_files = {f.path: f for f in ov.files}
        pairs = pair_files(list(nv.files), list(ov.files), d_new, d_old)
        warnings = []
        frames: list[Frame] = []
        offset = nv.payload_offset
        rows = []
        for fe in nv.files:
            frame_off, offset = offset, offset + fe.transport_length
            fr, row, warn = _frame_for(fe, Frame(fe, Path(nv.path), frame_off), old_files.get(fe.path),
                                       pairs.get(fe.path), ov.release, d_old, d_new, tdp, level)
            frames.append(fr)
            rows.append(row)
            warnings += warn
        m = nv.manifest
        manifest = make_manifest(kind="delta", model=m.model, release=m.release, version=m.version, targets=m.targets,
                                 created=now, expires=m.expires, min_agent_version=m.min_agent_version,
                                 entries=[fr.entry for fr in frames],
                                 base={"release": ov.release, "content_sha256": ov.manifest.content_sha256})
        full_size = nv.summary()["bundle_bytes"]
        tmp_out = tdp / "delta.bundle"
        size = write_container(tmp_out, trust_section=nv.embedded_trust, manifest=manifest, signers=signers, frames=frames)
        fallback = size >= full_size
        if fallback:
            shutil.copyfile(nv.path, tmp_out)
            size = full_size
        else:
            check_written(tmp_out, trust, now=now, base_dir=d_old)
        out.parent.mkdir(parents=True, exist_ok=True)
        part = durable.temp_path(out)
        shutil.copyfile(tmp_out, part)
        durable.commit_file(part, out)
    return DeltaReport(path=out, fallback=fallback, bundle_bytes=size, full_bundle_bytes=full_size,
                       base_release=ov.release, release=nv.release, files=rows, seconds=time.perf_counter() - t0,
                       warnings=warnings)
