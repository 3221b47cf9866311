"""How a board computes INT8, and how this host can compute the same numbers.

A quantized model's accuracy is a property of the board's kernels, not of the laptop's. Boards
fall into two classes of integer arithmetic:

- ``exact``: int8 x int8 products summed in int32 without loss (ARM NEON widening multiplies and
  dotprod, x86 AVX-512 VNNI / AVX-VNNI, NPUs, XNNPACK). A board runs the QDQ model through ONNX
  Runtime's QDQ fusions (QLinearConv, QLinearAdd, QLinearSigmoid, ...), whose requantization and
  lookup tables round differently from the unfused graph (DequantizeLinear -> float op ->
  QuantizeLinear): on EfficientNet-Lite0 the unfused graph read 97.16 % where the emulated Pi 4's
  ARM kernels gave 95.45 % and this host's fused VNNI kernels agreed with the Pi on 175/176
  images. So the judge is the *fused* graph computed exactly: on x86 the session option
  ``session.x64quantprecision`` makes ONNX Runtime rewrite s8 weights to u8 (+128, an exact
  change of zero point) for its u8 x u8 kernels, which sum in 32 bits on AVX2 as on VNNI.
  :func:`unfused_session` keeps the unfused figure for comparison.
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

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import TargetError
from ..targets.arithmetic import arithmetic
from .evaluate import session as _session


@dataclass(frozen=True)
class HostInt8:
    """The INT8 instructions of this host's CPU, and the arithmetic ONNX Runtime's kernels use here.

    ``measured`` is what :func:`kernel_arithmetic` found ONNX Runtime's kernels to compute on this
    CPU; the flags only say why. The two disagree where the flags lie: a CPU emulator (qemu-user
    passes the real /proc/cpuinfo through), a VM that masks CPUID, a future ORT kernel."""

    machine: str
    instructions: tuple[str, ...]      # e.g. ("avx2",), ("avx2", "avx512_vnni"), ("neon", "dotprod")
    cpu: str = ""                      # the CPU's model name, for benchmark records
    measured: str | None = None        # kernel_arithmetic() on this host; None: from the flags alone

    @property
    def declared(self) -> str:
        """The arithmetic the CPU flags imply."""
        if self.machine in ("x86_64", "AMD64", "i686", "x86"):
            vnni = {"avx512_vnni", "avx_vnni"} & set(self.instructions)
            return "exact" if vnni else "saturating-u8s8"
        return "exact"                   # aarch64: NEON widening multiplies / dotprod

    @property
    def arithmetic(self) -> str:
        return self.measured or self.declared

    @property
    def label(self) -> str:
        how = "measured" if self.measured else "from CPU flags"
        return f"{self.machine} ({', '.join(self.instructions) or 'no SIMD int8'}; {self.arithmetic}, {how})"


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
    """The host's INT8 instructions, read from its CPU flags (cpu_info), and the arithmetic its
    ONNX Runtime kernels were measured to compute (kernel_arithmetic)."""
    cpu, flags = cpu_info()
    found = [f for f in _X86_FLAGS if f in flags] + [v for k, v in _ARM_FLAGS.items() if k in flags]
    return HostInt8(platform.machine(), tuple(found), cpu, kernel_arithmetic())


def _probe_model() -> bytes:
    """``y = a @ b`` with u8 ``a`` and a constant s8 ``b`` (MatMulInteger, the u8 x s8 GEMM every
    fused QLinearConv/QLinearMatMul uses): with a = 255 and b = 127 each pair of products is
    64,770, which a saturating 16-bit pair sum clips to 32,767."""
    from onnx import TensorProto, helper, numpy_helper

    b = numpy_helper.from_array(np.full((_PROBE_K, 16), 127, np.int8), "b")
    g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8-arithmetic-probe",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, _PROBE_K])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 16])], [b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m.SerializeToString()


_PROBE_K = 64


def kernel_arithmetic(*, precision_mode: bool = False) -> str:
    """What ONNX Runtime's u8 x s8 kernels compute on this CPU, measured (milliseconds): ``exact``
    when the probe's int32 sum is exact, ``saturating-u8s8`` when pair sums clip at 16 bits."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry(PRECISION_MODE, "1" if precision_mode else "0")
    sess = ort.InferenceSession(_probe_model(), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"a": np.full((1, _PROBE_K), 255, np.uint8)})[0]
    if np.all(y == 255 * 127 * _PROBE_K):
        return "exact"
    if np.all(y == 32767 * (_PROBE_K // 2)):
        return "saturating-u8s8"
    raise NumericsUnavailable(f"ONNX Runtime's int8 kernels on this host compute {int(y.flat[0])} for a sum whose "
                              f"exact value is {255 * 127 * _PROBE_K}: neither exact nor 16-bit saturating; "
                              "report this CPU and ONNX Runtime version")


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
        return exact_session(model, threads=threads)
    if weight_bits is not None and weight_bits <= a.max_weight_bits:
        return exact_session(model, threads=threads)      # provably no saturation: exact == board
    if host.arithmetic == a.name:
        return _session(model, threads, optimize=True)    # this host's kernels are the board's
    raise NumericsUnavailable(
        f"the target saturates u8 x s8 pair sums but this host ({host.label}) computes exactly, and the "
        f"model's weights are wider than {a.max_weight_bits} bits: quantize it for this target (7-bit "
        "weights) or judge it on an AVX2 host without VNNI")


PRECISION_MODE = "session.x64quantprecision"   # ORT: u8 x u8 kernels instead of saturating u8 x s8


def exact_session(model: str | Path | bytes, *, threads: int = 0) -> ort.InferenceSession:
    """ONNX Runtime's fused integer kernels, with exact int32 sums on any host: what an ``exact``
    board computes. Every optimization level, as the board's ORT runs it: measured against the
    emulated Pi 4 (ARM kernels) on two EfficientNet-Lite0 models with float activations, this
    session gave the board's top-1 on 176/176 and 175/176 held-out images, the "extended" level
    (no layout rewrites) on 172/176 and 175/176. Precision mode holds at this level: under an
    emulated Haswell (AVX2, no VNNI) its logits equal a VNNI host's bit for bit."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry(PRECISION_MODE, "1")
    m = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    return ort.InferenceSession(_unshared_weight_quantizers(m).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _unshared_weight_quantizers(m: onnx.ModelProto) -> onnx.ModelProto:
    """Each weight DequantizeLinear gets its own scale and zero point. compact.py lets layers share
    value-identical ones (bytes on the wire); ONNX Runtime's s8 -> u8 weight rewrite (precision
    mode) rewrites a shared zero point once per layer and fails ("Attempt to replace the existing
    tensor"). In the judge's copy only; the file keeps its shared tensors."""
    inits = {i.name: i for i in m.graph.initializer}
    uses: dict[str, int] = {}
    for n in m.graph.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1
    for k, n in enumerate(m.graph.node):
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        for j in range(1, len(n.input)):
            name = n.input[j]
            if name in inits and uses.get(name, 0) > 1:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__judge{k}"
                m.graph.initializer.append(copy)
                n.input[j] = copy.name
    return m


def unfused_session(model: str | Path | bytes, *, threads: int = 0) -> ort.InferenceSession:
    """The QDQ graph unfused (DequantizeLinear -> float op -> QuantizeLinear): exact integer
    products, float requantization; the first-approximation judge, reported beside the board's."""
    return _session(model, threads, optimize=False)


def host_session(model: str | Path, *, threads: int = 0) -> ort.InferenceSession:
    """This host's own fused kernels (what the laptop computes, reported beside the board's figure)."""
    return _session(model, threads, optimize=True)
