"""The OTA writer: signing keys and trust documents (``keys``), full bundles (``bundle``) and
deltas (``delta``), in the wire format of ``device_agent.wire``.

Every bundle written here is read back with the board's own reader before it is handed out.
It may import ``device_agent``'s public modules and the shared modules below it, never the
quantization room, the fleet or the CLI (docs/architecture.md; tests/test_layering.py).
"""
from __future__ import annotations
