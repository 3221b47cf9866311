"""The quantize report travels with the release, and ``push`` honours its verdict.

Why: a model that missed its accuracy budget used to reach boards exactly like one that met it;
only the person who ran ``quantize`` had seen the warning. Now ``edgepack bundle`` carries the
quantize report inside the signed bundle (payload ``quantize-report.json``, role ``extra``: the
board ignores it, its hash is signed like every payload), and ``edgepack push`` refuses a
release whose report says the budget was missed unless the operator passes
``--accept-budget-miss``: an explicit, logged decision, never a silent one.

Only the facts the gate needs are kept from the report (:data:`FACTS`), checked for type; a
report is data from outside and is never trusted beyond that.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import BudgetNotMet, DataError, UsageError

REPORT_NAME = "quantize-report.json"
REPORT_ROLE = "extra"
MAX_REPORT_BYTES = 4 << 20           # a quantize report is a few kB; anything larger is refused
#: The report fields the gate reads, with their types (int where a float is asked is fine).
FACTS = {"target": str, "budget_met": bool, "budget_points": (int, float), "drop_points": (int, float),
         "agreement": (int, float), "metric": str, "numerics": str, "int8_size_bytes": int}


def check_report(path: str | Path) -> dict[str, Any]:
    """The gate's facts of a quantize report file; DataError naming the problem if it is not one."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"quantize report {p}: cannot read it ({e.strerror or e})") from None
    return _facts(raw, str(p))


def _facts(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_REPORT_BYTES:
        raise DataError(f"quantize report {what} is {len(raw)} bytes (max {MAX_REPORT_BYTES}); pass the JSON "
                        "that `edgepack quantize` wrote")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"quantize report {what} is not JSON ({e}); pass the JSON that `edgepack quantize` "
                        "wrote") from None
    if not isinstance(doc, dict):
        raise DataError(f"quantize report {what} is not a JSON object; pass the JSON `edgepack quantize` wrote")
    out: dict[str, Any] = {}
    for key, typ in FACTS.items():
        v = doc.get(key)
        if not isinstance(v, typ) or (typ is not bool and isinstance(v, bool)):
            raise DataError(f"quantize report {what}: field {key!r} is missing or not a "
                            f"{getattr(typ, '__name__', 'number')}; pass the JSON `edgepack quantize` wrote")
        out[key] = v
    return out


def bundled_report(bundle: str | Path) -> dict[str, Any] | None:
    """The facts of the quantize report a full bundle carries, or None when it carries none.

    Read from the header and that one payload (transport and content hashes checked against
    the manifest), without the trust root: push's policy check, not the boards' verification.
    """
    from device_agent.wire import read_header
    from device_agent.wire.encoding import parse_json, safe_text
    from device_agent.durable import open_regular
    from device_agent.wire.manifest import parse_manifest
    from device_agent.errors import OtaError

    p = Path(bundle)
    try:
        with open_regular(p) as f:
            h = read_header(f)
            m = parse_manifest(parse_json(h.manifest_bytes, "manifest"))
            offset = h.payload_offset
            for fe in m.files:
                if fe.path == REPORT_NAME and fe.role == REPORT_ROLE and fe.encoding == "zstd":
                    if fe.transport_length > MAX_REPORT_BYTES or fe.length > MAX_REPORT_BYTES:
                        raise UsageError(f"{p}: its quantize report is too large; rebuild the bundle")
                    f.seek(offset)
                    return _facts(_payload(f.read(fe.transport_length), fe, p), f"in {p.name}")
                offset += fe.transport_length
    except (OtaError, OSError) as e:
        raise UsageError(f"{p} is not a readable edgepack bundle: {safe_text(e)}") from None
    return None


def _payload(comp: bytes, fe, p: Path) -> bytes:
    try:  # Python 3.14+: the standard library's module; before: its backport
        from compression import zstd
    except ImportError:
        from backports import zstd

    if len(comp) != fe.transport_length or hashlib.sha256(comp).hexdigest() != fe.transport_sha256:
        raise UsageError(f"{p}: its quantize report does not match the manifest's hash; rebuild the bundle")
    d = zstd.ZstdDecompressor()
    try:
        raw = d.decompress(comp, max_length=MAX_REPORT_BYTES + 1)
    except zstd.ZstdError as e:
        raise UsageError(f"{p}: its quantize report is corrupt ({e}); rebuild the bundle") from None
    if len(raw) != fe.length or hashlib.sha256(raw).hexdigest() != fe.sha256:
        raise UsageError(f"{p}: its quantize report does not match the manifest's hash; rebuild the bundle")
    return raw


def gate(bundle: str | Path, *, accept_budget_miss: bool = False) -> str | None:
    """Refuse (BudgetNotMet, exit 4) a release whose bundled quantize report missed its budget.

    Returns a line to print when the miss was accepted, or when the bundle carries no report.
    """
    facts = bundled_report(bundle)
    if facts is None:
        return (f"{Path(bundle).name} carries no quantize report: its accuracy is unchecked "
                "(bundle it with --quantize-report)")
    if facts["budget_met"]:
        return None
    what = (f"release {Path(bundle).name} missed its accuracy budget on {facts['target']}: held-out "
            f"{facts['metric']} drop {facts['drop_points']:.2f} points > {facts['budget_points']:g} allowed "
            f"({facts['agreement']:.1f} % agreement, {facts['numerics']} arithmetic)")
    if not accept_budget_miss:
        raise BudgetNotMet(what + "; nothing pushed (pass --accept-budget-miss to push it anyway)")
    return what + "; pushing it because --accept-budget-miss was given"
