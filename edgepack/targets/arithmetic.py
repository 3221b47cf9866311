"""How a board's INT8 kernels add up products: the board-profile side of edgepack/quantize/numerics.py.

A target names one of these (``int8_arithmetic``); the quantizer reads ``max_weight_bits`` and
the numerics module turns the name into an ONNX Runtime session that computes as the board does.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import TargetError


@dataclass(frozen=True)
class Arithmetic:
    name: str
    description: str
    saturates: bool            # u8 x s8 pair sums saturate at 16 bits
    max_weight_bits: int       # widest weights that compute exactly on such a board


ARITHMETIC: dict[str, Arithmetic] = {a.name: a for a in (
    Arithmetic("exact", "int8 x int8 -> int32, exact (ARM NEON/dotprod, x86 VNNI, NPUs)", False, 8),
    Arithmetic("saturating-u8s8", "u8 x s8 pair sums saturate at 16 bits (x86 AVX2/SSE4.1 without VNNI)", True, 7),
)}


def arithmetic(name: str) -> Arithmetic:
    try:
        return ARITHMETIC[name]
    except KeyError:
        raise TargetError(f"unknown int8_arithmetic {name!r} (known: {', '.join(ARITHMETIC)})") from None


__all__ = ["Arithmetic", "ARITHMETIC", "arithmetic"]
