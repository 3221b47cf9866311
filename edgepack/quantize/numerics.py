"""How a board computes INT8, and how this host can compute the same numbers.

A quantized model's accuracy is a property of the board's kernels, not of the laptop's. Boards
fall into two classes of integer arithmetic:

- ``exact``: int8 x int8 products summed in int32 without loss (ARM NEON widening multiplies and
  dotprod, x86 AVX-512 VNNI / AVX-VNNI, NPUs, XNNPACK). On any host this is reproduced by
  running the QDQ model *unfused* (graph optimizations off): DequantizeLinear -> float op ->
  QuantizeLinear, whose float32 sums of integer products match int32 accumulation to within
  float rounding.
- ``saturating-u8s8``: x86 AVX2 (and SSE4.1) without VNNI, where ONNX Runtime's u8 x s8 kernels
  add pairs of products in saturating 16-bit registers (``vpmaddubsw``). Weights limited to
  7 bits cannot saturate (2 x 255 x 63 < 32767), so the quantizer gives such boards 7-bit
  weights; a model with full 8-bit weights can only be judged on a host with the same kernels.

:func:`board_session` is the one place that turns "the target's arithmetic" into an ONNX Runtime
session on this host; :func:`host_int8` says what this host's CPU computes.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from ..errors import TargetError
from ..targets.arithmetic import arithmetic
from .evaluate import session as _session


@dataclass(frozen=True)
class HostInt8:
    """The INT8 instructions of this host's CPU, and the arithmetic ONNX Runtime's kernels use here."""

    machine: str
    instructions: tuple[str, ...]      # e.g. ("avx2",), ("avx2", "avx512_vnni"), ("neon", "dotprod")
    cpu: str = ""                      # the CPU's model name, for benchmark records

    @property
    def arithmetic(self) -> str:
        if self.machine in ("x86_64", "AMD64", "i686", "x86"):
            vnni = {"avx512_vnni", "avx_vnni"} & set(self.instructions)
            return "exact" if vnni else "saturating-u8s8"
        return "exact"                   # aarch64: NEON widening multiplies / dotprod

    @property
    def label(self) -> str:
        return f"{self.machine} ({', '.join(self.instructions) or 'no SIMD int8'}; {self.arithmetic})"


_X86_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "avx512bw", "amx_int8")
_ARM_FLAGS = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm"}


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """This CPU's model name and flags from ``/proc/cpuinfo`` (other systems: the platform's name, no
    flags): the one reader of it, for host_int8 and the benchmarks' machine records."""
    flags: set[str] = set()
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("flags", "features"):
                    flags.update(value.split())
                elif key == "model name" and not cpu:
                    cpu = value.strip()
    except OSError:
        pass
    return cpu or platform.processor(), frozenset(flags)


@functools.lru_cache(maxsize=1)
def host_int8() -> HostInt8:
    """The host's INT8 instructions, read from its CPU flags (cpu_info)."""
    cpu, flags = cpu_info()
    found = [f for f in _X86_FLAGS if f in flags] + [v for k, v in _ARM_FLAGS.items() if k in flags]
    return HostInt8(platform.machine(), tuple(found), cpu)


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                             "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear") for n in model.graph.node)


class NumericsUnavailable(TargetError):
    """This host cannot compute a model as the target does (and nothing stands in for it)."""


def board_session(model: str | Path, arith: str, *, threads: int = 0,
                  weight_bits: int | None = None) -> ort.InferenceSession:
    """A session whose outputs are what a board with ``arith`` arithmetic computes.

    ``weight_bits`` (the widest weights in the model, when the caller knows it) lets a
    saturating target be judged exactly on any host: 7-bit weights cannot saturate.
    """
    a = arithmetic(arith)
    host = host_int8()
    if not a.saturates:
        return _session(model, threads, optimize=False)
    if weight_bits is not None and weight_bits <= a.max_weight_bits:
        return _session(model, threads, optimize=False)   # provably no saturation: exact == board
    if host.arithmetic == a.name:
        return _session(model, threads, optimize=True)    # this host's kernels are the board's
    raise NumericsUnavailable(
        f"the target saturates u8 x s8 pair sums but this host ({host.label}) computes exactly, and the "
        f"model's weights are wider than {a.max_weight_bits} bits: quantize it for this target (7-bit "
        "weights) or judge it on an AVX2 host without VNNI")


def host_session(model: str | Path, *, threads: int = 0) -> ort.InferenceSession:
    """This host's own fused kernels (what the laptop computes, reported beside the board's figure)."""
    return _session(model, threads, optimize=True)
