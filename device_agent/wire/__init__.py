"""The bundle wire format, shared by the host (which writes it) and the board (which reads it).

Public on purpose: this is the one package the host imports to write what the board reads
(docs/bundle-format.md is its specification). It holds no trust decisions; those are
device_agent.trust and device_agent.bundle.

* ``header``: ``read_header`` / ``write_header`` and ``MAGIC``;
* ``manifest``: ``FileEntry``, ``Manifest``, ``parse_manifest``, ``content_digest``, format name and version;
* ``encoding``: canonical JSON, strict JSON parsing, time formats, ``safe_text`` for printing board strings;
* ``codecs``: the payload encodings (one registry: names, decoders, encoders);
* ``streams``: bounded reads and zstd frame decoding;
* ``limits``: ``LIMITS``, every bound the reader enforces.
"""
from __future__ import annotations

from .codecs import CODECS, DELTA_ENCODINGS, ENCODINGS, Codec, register_decoder, register_encoder
from .encoding import canonical_json, format_time, parse_json, parse_time, safe_text, sha256_hex
from .header import MAGIC, BundleHeader, read_header, write_header
from .limits import LIMITS, Limits
from .manifest import FORMAT_NAME, FORMAT_VERSION, FileEntry, Manifest, content_digest, parse_manifest

__all__ = ["CODECS", "DELTA_ENCODINGS", "ENCODINGS", "Codec", "register_decoder", "register_encoder",
           "canonical_json", "format_time", "parse_json", "parse_time", "safe_text", "sha256_hex",
           "MAGIC", "BundleHeader", "read_header", "write_header", "LIMITS", "Limits",
           "FORMAT_NAME", "FORMAT_VERSION", "FileEntry", "Manifest", "content_digest", "parse_manifest"]
