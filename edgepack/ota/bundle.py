"""Write signed, zstd-compressed OTA bundles (the container is specified in docs/bundle-format.md).

The writer streams: each payload is compressed chunk by chunk into a spool file while both the
raw and the compressed bytes are hashed, then the header (trust section, canonical manifest,
signatures) and the frames are written to a temp file that is fsynced and renamed. Finally the
bundle is read back with the board's reader (``device_agent.bundle``) so the host never ships
a bundle a board would refuse.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

try:  # Python 3.14+: the standard library's module; before: its backport
    from compression import zstd
except ImportError:
    from backports import zstd

from device_agent import bundle as reader
from device_agent import durable
from device_agent.durable import utc_now
from device_agent.wire import codecs
from device_agent.wire.encoding import canonical_json, format_time
from device_agent.wire.header import write_header
from device_agent.wire.limits import LIMITS
from device_agent.wire.manifest import FORMAT_NAME, FORMAT_VERSION, FileEntry, content_digest
from device_agent.wire.streams import CHUNK
from device_agent.errors import MalformedBundle, OtaError
from device_agent.trust import MANIFEST_TYPE, TrustRoot

from ..errors import DataError, ModelError, UsageError
from .keys import SigningKey
from .llm_bundle import LLMBundleOptions, check_llm_golden, llm_extras, llm_settings, wants_llm

FULL_WINDOW_LOG = LIMITS.full_window_log  # 8 MiB decoder window: what a board must be able to afford
DEFAULT_LEVEL = 9
SETTINGS_KEYS = {"runtime": str, "threads": int, "execution_provider": str, "execution_providers": list,
                 "graph_optimization_level": str, "input_names": list, "output_names": list}


@dataclass(frozen=True)
class Frame:
    """Where a payload's transport bytes come from when the container is assembled."""

    entry: FileEntry
    source: Path
    offset: int = 0


@dataclass
class BuildReport:
    path: Path
    bundle_bytes: int
    manifest: dict[str, Any]
    files: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------- compression
@codecs.register_encoder(codecs.ZSTD)
def compress_file(src: Path, dst: BinaryIO, *, level: int = DEFAULT_LEVEL) -> tuple[int, str, int, str]:
    """zstd-compress ``src`` into ``dst`` streaming. Returns (length, sha256, transport_length, transport_sha256)."""
    c = zstd.ZstdCompressor(options={zstd.CompressionParameter.compression_level: level,
                                     zstd.CompressionParameter.window_log: FULL_WINDOW_LOG,
                                     zstd.CompressionParameter.checksum_flag: 0})
    h_raw, h_tr = hashlib.sha256(), hashlib.sha256()
    n_raw = n_tr = 0
    with open(src, "rb") as f:
        while chunk := f.read(CHUNK):
            h_raw.update(chunk)
            n_raw += len(chunk)
            out = c.compress(chunk)
            if out:
                h_tr.update(out)
                n_tr += len(out)
                dst.write(out)
    out = c.flush(zstd.ZstdCompressor.FLUSH_FRAME)
    h_tr.update(out)
    n_tr += len(out)
    dst.write(out)
    return n_raw, h_raw.hexdigest(), n_tr, h_tr.hexdigest()


# --------------------------------------------------------------------------- container
def write_container(out: Path, *, trust_section: Mapping[str, Any], manifest: Mapping[str, Any],
                    signers: Sequence[SigningKey], frames: Sequence[Frame]) -> int:
    """Assemble header + frames into ``out`` atomically. Returns the bundle size in bytes."""
    if not signers:
        raise UsageError("a bundle needs at least one release key to sign it (--key)")
    mbytes = canonical_json(manifest)
    sigs = canonical_json([s.sign(MANIFEST_TYPE, mbytes) for s in signers])
    tbytes = canonical_json(dict(trust_section))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = durable.temp_path(out)
    try:
        with open(tmp, "wb") as f:
            write_header(f, trust_bytes=tbytes, manifest_bytes=mbytes, signature_bytes=sigs)
            for fr in frames:
                if fr.entry.transport_length == 0:
                    continue
                with open(fr.source, "rb") as src:
                    src.seek(fr.offset)
                    left = fr.entry.transport_length
                    while left:
                        b = src.read(min(CHUNK, left))
                        if not b:
                            raise MalformedBundle(f"payload source {fr.source} is shorter than expected")
                        f.write(b)
                        left -= len(b)
            size = f.tell()
        durable.commit_file(tmp, out)
        return size
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def trust_section(release_keys_doc: Mapping[str, Any] | None, roots: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The trust documents a bundle carries so boards learn key rotations and revocations."""
    chain = sorted((dict(r) for r in roots if r.get("signed", {}).get("version", 1) > 1),
                   key=lambda r: r["signed"]["version"])
    return {"roots": chain, "release_keys": dict(release_keys_doc) if release_keys_doc else None}


def trust_for_check(roots: Sequence[Mapping[str, Any]], release_keys_doc: Mapping[str, Any] | None) -> TrustRoot:
    """The trust root a freshly flashed board would hold: the oldest root given."""
    if not roots:
        raise UsageError("pass the root document (--root root.json) so the bundle can be checked as a board would")
    ordered = sorted(roots, key=lambda r: r.get("signed", {}).get("version", 1))
    return TrustRoot.from_bytes(dict(ordered[0]))


# --------------------------------------------------------------------------- inputs
def _check_model(p: Path) -> str:
    if not p.is_file():
        raise ModelError(f"model file {p} not found")
    with open(p, "rb") as f:
        head = f.read(8)
    suffix = p.suffix.lower()
    if suffix == ".tflite" or head[4:8] == b"TFL3":
        return "model"
    if suffix == ".onnx":
        # cheap sanity check without loading the model: an ONNX file is a protobuf whose
        # first field is ir_version (field 1, varint) -> byte 0x08
        if not head or head[0] != 0x08:
            raise ModelError(f"{p} does not look like an ONNX model (first byte {head[:1].hex() or 'none'}); "
                             "pass an .onnx or .tflite file")
        return "model"
    raise ModelError(f"{p}: model must be an .onnx or .tflite file")


def _settings_dict(settings: Mapping[str, Any] | Path | None) -> dict[str, Any] | None:
    """Settings as a dict (read from a JSON file if a path), validated as _settings_bytes would."""
    sb = _settings_bytes(settings)
    return None if sb is None else json.loads(sb)


def _settings_bytes(settings: Mapping[str, Any] | Path | None) -> bytes | None:
    if settings is None:
        return None
    if isinstance(settings, (str, Path)):
        try:
            settings = json.loads(Path(settings).read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"runtime settings {settings} is not readable JSON ({e})") from None
    if not isinstance(settings, Mapping):
        raise DataError("runtime settings must be a JSON object like {\"runtime\": \"onnxruntime\", \"threads\": 2}")
    for k, v in settings.items():
        typ = SETTINGS_KEYS.get(k)
        if typ is not None and not isinstance(v, typ):
            raise DataError(f"runtime setting {k!r} must be {typ.__name__}")
    if "runtime" not in settings:
        raise DataError("runtime settings need a 'runtime' name (e.g. onnxruntime, tflite)")
    return json.dumps(dict(settings), sort_keys=True, indent=1).encode() + b"\n"


def check_golden(p: Path) -> list[str]:
    """Golden data is an .npz of arrays (no pickles): inputs, reference outputs, optional labels."""
    try:
        with zipfile.ZipFile(p) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
        import numpy as np
        with np.load(p, allow_pickle=False) as npz:
            for n in npz.files:
                npz[n]  # forces a read: refuses object arrays
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise DataError(f"golden data {p} is not a numpy .npz of plain arrays ({e})") from None
    if not names:
        raise DataError(f"golden data {p} holds no arrays")
    if not any(n.startswith("input") for n in names) or not any(n.startswith("output") for n in names):
        raise DataError(f"golden data {p} needs arrays named input* and output* (reference outputs); has {names}")
    return names


# --------------------------------------------------------------------------- full bundle
def build_bundle(out: str | Path, *, models: Sequence[str | Path], name: str, release: int, version: str,
                 targets: Sequence[str], signer: SigningKey | Sequence[SigningKey],
                 release_keys_doc: Mapping[str, Any], roots: Sequence[Mapping[str, Any]],
                 settings: Mapping[str, Any] | Path | None = None, golden: str | Path | None = None,
                 quantize_report: str | Path | None = None, expires_days: float = 90, now: _dt.datetime | None = None, level: int = DEFAULT_LEVEL,
                 min_agent_version: str = reader.AGENT_VERSION, verify: bool = True,
                 llm: LLMBundleOptions | None = None) -> BuildReport:
    """Build a full bundle: compress every payload, sign the manifest, write atomically, read it back.

    A KV-cache decoder (found by edgepack.ota.llm_bundle, or forced with ``llm.detect``) also
    carries its external data and genai_config.json, LLM golden prompts, and the LLM health
    thresholds in its settings. Every payload streams (1 MiB chunks): memory does not grow with
    the weights."""
    import time
    t0 = time.perf_counter()
    now = now or utc_now()
    signers = [signer] if isinstance(signer, SigningKey) else list(signer)
    if release < 0:
        raise UsageError("--release must be a non-negative integer (the anti-rollback counter)")
    if not targets:
        raise UsageError("name at least one compatible target (--target)")
    items: list[tuple[str, str, Path]] = []
    for m in models:
        p = Path(m)
        items.append((p.name, _check_model(p), p))
    is_llm = wants_llm([Path(m) for m in models], llm)
    if is_llm:
        items += llm_extras(Path(models[0]))
        settings = llm_settings(_settings_dict(settings), Path(models[0]).name, llm)
    with tempfile.TemporaryDirectory(prefix="edgepack-bundle-") as td:
        tdp = Path(td)
        sb = _settings_bytes(settings)
        if sb is not None:
            (tdp / "settings.json").write_bytes(sb)
            items.append(("settings.json", "settings", tdp / "settings.json"))
        if golden is not None:
            gp = Path(golden)
            check_llm_golden(gp) if is_llm else check_golden(gp)
            items.append(("golden.npz", "golden", gp))
        if quantize_report is not None:  # carried for `push`'s budget gate (edgepack.ota.release_gate)
            from .release_gate import REPORT_NAME, REPORT_ROLE, check_report
            check_report(quantize_report)
            items.append((REPORT_NAME, REPORT_ROLE, Path(quantize_report)))
        names = [i[0] for i in items]
        if len(set(n.lower() for n in names)) != len(names):
            raise UsageError(f"two payload files share a name: {names}")
        frames: list[Frame] = []
        for i, (pname, role, src) in enumerate(items):
            spool = tdp / f"frame-{i}.zst"
            with open(spool, "wb") as f:
                n, h, tn, th = compress_file(src, f, level=level)
            frames.append(Frame(FileEntry(path=pname, role=role, length=n, sha256=h, encoding="zstd",
                                          transport_length=tn, transport_sha256=th), spool))
        manifest = make_manifest(kind="full", model=name, release=release, version=version, targets=targets,
                                 created=now, expires=now + _dt.timedelta(days=expires_days),
                                 min_agent_version=min_agent_version, entries=[fr.entry for fr in frames])
        trust = trust_for_check(roots, release_keys_doc)
        size = write_container(Path(out), trust_section=trust_section(release_keys_doc, roots), manifest=manifest,
                               signers=signers, frames=frames)
    if verify:
        check_written(Path(out), trust, now=now)
    return BuildReport(path=Path(out), bundle_bytes=size, manifest=manifest,
                       files=[fr.entry.to_json() for fr in frames], seconds=time.perf_counter() - t0)


def make_manifest(*, kind: str, model: str, release: int, version: str, targets: Sequence[str],
                  created: _dt.datetime, expires: _dt.datetime, min_agent_version: str,
                  entries: Sequence[FileEntry], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind, "model": model,
            "release": release, "version": version, "targets": list(targets), "created": format_time(created),
            "expires": format_time(expires), "min_agent_version": min_agent_version, "compression": "zstd",
            "content_sha256": content_digest([(e.path, e.length, e.sha256) for e in entries]),
            "files": [e.to_json() for e in entries], "base": dict(base) if base else None}


def check_written(path: Path, trust: TrustRoot, *, now: _dt.datetime | None = None,
                  base_dir: Path | None = None) -> reader.VerifiedManifest:
    """Read a just-written bundle back with the board's code; delete it if a board would refuse it."""
    try:
        vm = reader.open_bundle(path, trust, now=now)
        reader.verify_payloads(vm, base_dir=base_dir)
        return vm
    except OtaError:
        path.unlink(missing_ok=True)
        raise
