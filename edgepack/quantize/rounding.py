"""Advanced post-training weight rounding: GPTQ and bias correction for int8 per-channel weights.

Why this exists: with per-channel symmetric int8 weights, plain round-to-nearest (RTN) treats
every weight independently, so small rounding errors that all push a layer's output the same way
add up. On EfficientNet-Lite0 the weight rounding alone costs ~8 % top-1 agreement with FP32.
GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", an OBQ-style solver) rounds one input column at a time and pushes each rounding
error onto the columns not yet rounded, weighted by the layer's input second moment
``H = E[x xᵀ]``, so that the *output* error ``tr(ΔW H ΔWᵀ)`` stays small instead of the weight
error. Bias correction (Nagel et al. 2019) then removes what is left of the *mean* output shift
``E[(W - Ŵ) x] = (W - Ŵ) E[x]`` by folding it into the bias.

The pass keeps the model a float model: each optimised weight initializer is replaced by its
dequantized values ``q·s``. ONNX Runtime's static quantizer then re-quantizes it; the returned
``TensorQuantOverrides`` pin ORT to exactly our per-channel scales (zero point 0), so ORT's
``round(Ŵ / s)`` gives back exactly our integers ``q``. :func:`check_quantized_weights` verifies
that on a quantized model.

Statistics come from the FP32 model (every selected layer's input is exposed as a graph output
and ``H`` is accumulated batch by batch, so memory does not grow with the number of images).
Using the FP32 inputs rather than those of the partly quantized network is simple and robust; the
alternative (sequential GPTQ on quantized-network inputs) can compensate for upstream activation
error too but needs one pass per layer or per block.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = [
    "LayerRounding",
    "RoundingReport",
    "check_quantized_weights",
    "optimize_weight_rounding",
]

#: Ops whose weight the pass can optimise (MatMul only with a constant 2-D B).
SUPPORTED_OPS = ("Conv", "Gemm", "MatMul")
#: ORT's int32 bias range (quant_utils / qdq_quantizer._adjust_weight_scale_for_int32_bias).
_INT32_QRANGE = float(np.iinfo(np.int32).max) - float(np.iinfo(np.int32).min + 1)
#: Safety factor for the weight-scale floor that keeps ORT from re-scaling near-zero channels.
_BIAS_SCALE_MARGIN = 64.0
#: im2col chunk budget: bytes of float32 patches materialised at once.
_PATCH_BYTES = 48 << 20
#: Most samples pushed through the statistics model in one ORT run (see _split_feed).
_MAX_RUN_BATCH = 4


@dataclass
class LayerRounding:
    """What the pass did to one layer.

    ``err_rtn`` and ``err_opt`` are relative output errors on the calibration statistics:
    ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` for round-to-nearest and for the chosen method (``H`` undamped).
    ``floored_channels`` counts output channels whose scale was raised above ``max|w|/qmax`` so
    that ORT's int32-bias check never has to re-scale them (channels with ~zero weights).
    """

    name: str
    op: str
    weight: str
    shape: tuple[int, ...]
    groups: int
    err_rtn: float
    err_opt: float
    bias_corrected: bool
    floored_channels: int
    seconds: float

    @property
    def reduction(self) -> float:
        """How many times smaller the output error is than with round-to-nearest."""
        return self.err_rtn / self.err_opt if self.err_opt > 0 else float("inf")


@dataclass
class RoundingReport:
    """Summary of a :func:`optimize_weight_rounding` pass."""

    method: str
    bits: int
    samples: int
    batches: int
    collect_seconds: float
    solve_seconds: float
    layers: list[LayerRounding] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> reason

    @property
    def total_seconds(self) -> float:
        return self.collect_seconds + self.solve_seconds

    @property
    def mean_reduction(self) -> float:
        """Geometric mean over layers of the output-error reduction vs round-to-nearest."""
        r = [lay.reduction for lay in self.layers if np.isfinite(lay.reduction) and lay.reduction > 0]
        return float(np.exp(np.mean(np.log(r)))) if r else 1.0

    def summary(self) -> str:
        lines = [f"{self.method} {self.bits}-bit rounding on {len(self.layers)} layers, {self.samples} samples, "
                 f"{self.collect_seconds:.1f}s statistics + {self.solve_seconds:.1f}s solve; "
                 f"output error x{self.mean_reduction:.2f} lower than round-to-nearest (geomean)"]
        for lay in self.layers:
            lines.append(f"  {lay.name} {lay.op} {list(lay.shape)} g={lay.groups}: rel. output err "
                         f"{lay.err_rtn:.2e} -> {lay.err_opt:.2e} (x{lay.reduction:.2f})"
                         f"{' +bias' if lay.bias_corrected else ''}"
                         f"{f' floored={lay.floored_channels}' if lay.floored_channels else ''}")
        for name, why in self.skipped.items():
            lines.append(f"  skipped {name}: {why}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Layer description


@dataclass
class _Layer:
    """One optimisable node, its weight viewed as ``(G, R, K)``: G independent groups, R output
    rows per group, K input columns (im2col order ``cin, kh, kw`` for convs)."""

    node: onnx.NodeProto
    op: str
    input: str
    weight: str
    bias: str | None
    w_shape: tuple[int, ...]
    axis: int  # per-channel axis of the weight initializer
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # ONNX order: begins then ends
    auto_pad: str = "NOTSET"
    trans_a: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    # statistics
    H: np.ndarray | None = None  # (G, K, K) float64, sum of x xᵀ
    S: np.ndarray | None = None  # (G, K) float64, sum of x
    # with a quantized model (input compensation): x̃ is the layer input as the INT8 model sees it
    Hq: np.ndarray | None = None  # (G, K, K) sum of x̃ x̃ᵀ
    C: np.ndarray | None = None   # (G, K, K) sum of x x̃ᵀ
    Sq: np.ndarray | None = None  # (G, K) sum of x̃
    n: int = 0
    xmin: float = 0.0
    xmax: float = 0.0

    def weight_grk(self, w: np.ndarray) -> np.ndarray:
        """Initializer layout -> (G, R, K)."""
        if self.op == "Conv":
            return w.reshape(self.groups, w.shape[0] // self.groups, -1)
        if self.axis == 0:  # Gemm transB=1: (N, K)
            return w[None]
        return w.T[None]  # Gemm transB=0 / MatMul: (K, N)

    def weight_back(self, wg: np.ndarray) -> np.ndarray:
        """(G, R, K) -> initializer layout."""
        if self.op == "Conv":
            return wg.reshape(self.w_shape)
        return wg[0] if self.axis == 0 else wg[0].T


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _find_layers(model: onnx.ModelProto, nodes: Collection[str] | None,
                 skipped: dict[str, str]) -> list[_Layer]:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    wanted = set(nodes) if nodes is not None else None
    layers: list[_Layer] = []
    for n in g.node:
        if wanted is not None and n.name not in wanted:
            continue
        if n.op_type not in SUPPORTED_OPS:
            if wanted is not None:
                skipped[n.name] = f"op {n.op_type} not supported"
            continue
        label = n.name or n.output[0]
        if len(n.input) < 2 or n.input[1] not in inits:
            skipped[label] = "weight is not an initializer"
            continue
        wt = inits[n.input[1]]
        if wt.data_type != onnx.TensorProto.FLOAT:
            skipped[label] = "weight is not float32"
            continue
        if uses.get(wt.name, 0) > 1:
            skipped[label] = "weight initializer is shared with another node"
            continue
        shape = tuple(wt.dims)
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if bias is not None and bias not in inits:
            bias = "?"  # present but not constant: no bias correction possible
        if n.op_type == "Conv":
            if len(shape) not in (3, 4):
                skipped[label] = "only 1-D and 2-D convolutions are supported"
                continue
            nd = len(shape) - 2
            lay = _Layer(n, "Conv", n.input[0], wt.name, bias, shape, 0,
                         groups=int(_attr(n, "group", 1)), kernel=shape[2:],
                         strides=tuple(_attr(n, "strides", [1] * nd)),
                         dilations=tuple(_attr(n, "dilations", [1] * nd)),
                         pads=tuple(_attr(n, "pads", [0] * 2 * nd)),
                         auto_pad=str(_attr(n, "auto_pad", "NOTSET")))
        elif n.op_type == "Gemm":
            trans_b = bool(_attr(n, "transB", 0))
            lay = _Layer(n, "Gemm", n.input[0], wt.name, bias, shape, 0 if trans_b else 1,
                         trans_a=bool(_attr(n, "transA", 0)), alpha=float(_attr(n, "alpha", 1.0)),
                         beta=float(_attr(n, "beta", 1.0)))
        else:
            if len(shape) != 2:
                skipped[label] = "MatMul weight is not 2-D"
                continue
            lay = _Layer(n, "MatMul", n.input[0], wt.name, None, shape, 1)
        layers.append(lay)
    if wanted is not None:
        found = {n.name for n in g.node}
        for name in sorted(wanted - found):
            skipped[name] = "no such node"
    return layers


# ----------------------------------------------------------------------------------------------
# Statistics


def _conv_pads(lay: _Layer, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
    nd = len(spatial)
    if lay.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for i in range(nd):
            o = -(-spatial[i] // lay.strides[i])
            total = max(0, (o - 1) * lay.strides[i] + (lay.kernel[i] - 1) * lay.dilations[i] + 1 - spatial[i])
            lo = total // 2 if lay.auto_pad == "SAME_UPPER" else total - total // 2
            out.append((lo, total - lo))
        return out
    if lay.auto_pad == "VALID":
        return [(0, 0)] * nd
    return [(lay.pads[i], lay.pads[i + nd]) for i in range(nd)]


def _conv_patches(lay: _Layer, x: np.ndarray) -> np.ndarray:
    """im2col of a conv input (N, Cin, *spatial) -> (G, K, M), rows in weight-column order
    (cin, kh, kw). This layout keeps each group's ``P Pᵀ`` a single contiguous BLAS call, which
    is ~8x faster than (G, M, K) patches for depthwise convs."""
    if x.ndim == 3:  # 1-D conv as 2-D with height 1
        x = x[:, :, None, :]
    one = len(lay.kernel) == 1
    kh, kw = (1, *lay.kernel) if one else lay.kernel
    sh, sw = (1, *lay.strides) if one else lay.strides
    dh, dw = (1, *lay.dilations) if one else lay.dilations
    pads = _conv_pads(lay, (x.shape[3],) if one else tuple(x.shape[2:]))
    if one:
        pads = [(0, 0), *pads]
    n, c = x.shape[:2]
    g = lay.groups
    cg = c // g
    if any(p != (0, 0) for p in pads):
        x = np.pad(x, [(0, 0), (0, 0), *pads])
    ho = (x.shape[2] - (kh - 1) * dh - 1) // sh + 1
    wo = (x.shape[3] - (kw - 1) * dw - 1) // sw + 1
    P = np.empty((g, cg, kh, kw, n, ho, wo), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            sl = x[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
            P[:, :, i, j] = sl.reshape(n, g, cg, ho, wo).transpose(1, 2, 0, 3, 4)
    return P.reshape(g, cg * kh * kw, n * ho * wo)


def _layer_rows(lay: _Layer, x: np.ndarray) -> Iterator[np.ndarray]:
    """The layer input as (G, K, M) float32 blocks of bounded size (M = samples/positions)."""
    if lay.op == "Conv":
        per_image = max(1, int(np.prod(x.shape[1:])) * int(np.prod(lay.kernel)) * 4)
        step = max(1, _PATCH_BYTES // per_image)
        for i in range(0, x.shape[0], step):
            yield _conv_patches(lay, x[i:i + step])
        return
    if lay.op == "Gemm":
        a = x if lay.trans_a else x.T  # (K, M)
    else:
        a = x.reshape(-1, x.shape[-1]).T
    step = max(1, _PATCH_BYTES // max(1, a.shape[0] * 4))
    for i in range(0, a.shape[1], step):
        yield a[None, :, i:i + step]


def _accumulate(lay: _Layer, x: np.ndarray, xq: np.ndarray | None = None) -> None:
    x = np.asarray(x, dtype=np.float32)
    if x.size:
        lay.xmin = min(lay.xmin, float(x.min()))
        lay.xmax = max(lay.xmax, float(x.max()))
    rows_q = _layer_rows(lay, np.asarray(xq, dtype=np.float32)) if xq is not None else None
    for p in _layer_rows(lay, x):
        G, K, M = p.shape
        if lay.H is None:
            lay.H = np.zeros((G, K, K))
            lay.S = np.zeros((G, K))
        for gi in range(G):
            pg = p[gi]
            lay.H[gi] += pg @ pg.T  # float32 BLAS (syrk), accumulated in float64
        lay.S += p.sum(axis=2, dtype=np.float64)
        lay.n += M
        if rows_q is not None:
            pq = next(rows_q)
            if lay.Hq is None:
                lay.Hq, lay.C, lay.Sq = np.zeros((G, K, K)), np.zeros((G, K, K)), np.zeros((G, K))
            for gi in range(G):
                lay.Hq[gi] += pq[gi] @ pq[gi].T
                lay.C[gi] += p[gi] @ pq[gi].T
            lay.Sq += pq.sum(axis=2, dtype=np.float64)


@contextlib.contextmanager
def _blas_threads(n: int) -> Iterator[None]:
    """Temporarily limit numpy's OpenBLAS to ``n`` threads (no-op if it cannot be found).

    Why: the statistics pass alternates ORT runs with thousands of small ``P Pᵀ`` products
    (one per depthwise channel). Multi-threaded OpenBLAS busy-waits between such calls and, on a
    loaded 2-core machine, made the pass 5x slower (20 s vs 3.6 s for 32 images); single-threaded
    BLAS loses nothing measurable here. The previous thread count is restored afterwards."""
    setter = getter = None
    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in glob.glob(os.path.join(libdir, "*openblas*.so*")) + glob.glob(
            os.path.join(os.path.dirname(np.__file__), ".dylibs", "*openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("64_", "_64_", ""):
            for prefix in ("scipy_openblas", "openblas"):
                st = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                gt = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                if st is not None and gt is not None:
                    setter, getter = st, gt
                    break
            if setter is not None:
                break
        if setter is not None:
            break
    if setter is None:
        yield
        return
    setter.argtypes = [ctypes.c_int]
    getter.restype = ctypes.c_int
    old = int(getter())
    setter(n)
    try:
        yield
    finally:
        setter(old)


def _split_feed(feed: dict[str, np.ndarray], n: int) -> Iterator[dict[str, np.ndarray]]:
    """Split a feed along axis 0 into runs of at most ``n`` samples when every input shares that
    leading size (the batch axis); otherwise yield it whole. Every selected layer's input is held
    at once for a run (~25 MB per 224x224 image on EfficientNet-Lite0, twice inside ORT), so this
    bounds peak memory independently of the caller's batch size."""
    arrs = {k: np.asarray(v) for k, v in feed.items()}
    sizes = {a.shape[0] if a.ndim else -1 for a in arrs.values()}
    if len(sizes) != 1 or (size := sizes.pop()) <= n:
        yield arrs
        return
    for i in range(0, size, n):
        yield {k: a[i:i + n] for k, a in arrs.items()}


def _batch_iter(batches) -> Iterator[dict[str, np.ndarray]]:
    return iter(batches() if callable(batches) else batches)


def _input_quantizers(qmodel: onnx.ModelProto, layers: list[_Layer]) -> dict[str, tuple]:
    """Per layer (matched by node name): the DequantizeLinear output its quantized node reads, and
    that quantizer's (scale, zero point, qmin, qmax) when they are per-tensor constants."""
    by_name = {n.name: n for n in qmodel.graph.node}
    consts = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    dq = {n.output[0]: n for n in qmodel.graph.node if n.op_type == "DequantizeLinear"}
    found = {}
    for lay in layers:
        qn = by_name.get(lay.node.name)
        d = dq.get(qn.input[0]) if qn is not None and qn.input else None
        if d is None or d.input[1] not in consts or len(d.input) < 3 or d.input[2] not in consts:
            continue
        sc, zp = consts[d.input[1]], consts[d.input[2]]
        if sc.size != 1:
            continue
        info = np.iinfo(zp.dtype)
        found[lay.node.name] = (qn.input[0], float(sc), int(zp), info.min, info.max)
    return found


def _local_quant(x: np.ndarray, q: tuple) -> np.ndarray:
    _, sc, zp, lo, hi = q
    return ((np.clip(np.rint(x / sc) + zp, lo, hi) - zp) * sc).astype(np.float32)


def _quantized_inputs(qmodel: onnx.ModelProto, layers: list[_Layer]):
    """An unfused session over the QDQ model exposing, per layer (matched by node name), the input
    its quantized node computes with (the DequantizeLinear output); {layer input: that tensor}."""
    import onnxruntime as ort

    names = {k: v[0] for k, v in _input_quantizers(qmodel, layers).items()}
    if not names:
        return None, {}
    probe = onnx.ModelProto()
    probe.CopyFrom(qmodel)
    del probe.graph.output[:]
    for t in dict.fromkeys(names.values()):
        probe.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # exact arithmetic
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"]), names


def _collect(model: onnx.ModelProto, layers: list[_Layer], batches,
             progress: Callable[[int, int], None] | None, n_total: int,
             qmodel: onnx.ModelProto | None = None, local: bool = True) -> tuple[int, int]:
    """One FP32 pass over the calibration batches; every layer's H, E[x] and range are
    accumulated in place (with ``qmodel``, also the statistics of the quantized model's inputs
    on the same batches). Returns (samples, batches)."""
    import onnxruntime as ort

    graph_inputs = {i.name for i in model.graph.input}
    needed = list(dict.fromkeys(lay.input for lay in layers))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    vinfo = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    del probe.graph.output[:]
    for name in needed:
        if name in graph_inputs:
            continue
        v = vinfo.get(name)
        elem = v.type.tensor_type.elem_type if v is not None and v.type.tensor_type.elem_type else onnx.TensorProto.FLOAT
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    out_names = [o.name for o in probe.graph.output]
    sess = None
    if out_names:
        so = ort.SessionOptions()
        # ORT's idle worker threads spin by default and then fight numpy's BLAS threads for the
        # same cores while we accumulate statistics between runs (measured 5x slower on 2 cores).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del probe
    by_input: dict[str, list[_Layer]] = {}
    for lay in layers:
        by_input.setdefault(lay.input, []).append(lay)
    first_input = model.graph.input[0].name if model.graph.input else None
    qsess, qnames = _quantized_inputs(qmodel, layers) if qmodel is not None and not local else (None, {})
    lq = _input_quantizers(qmodel, layers) if qmodel is not None and local else {}
    q_out = [o.name for o in qsess.get_outputs()] if qsess is not None else []
    samples = nb = 0
    for feed in _batch_iter(batches):
        for sub in _split_feed(feed, _MAX_RUN_BATCH):
            outs = dict(zip(out_names, sess.run(out_names, sub))) if sess is not None else {}
            qouts = dict(zip(q_out, qsess.run(q_out, sub))) if qsess is not None else {}
            for name in needed:
                x = outs.pop(name) if name in outs else np.asarray(sub[name])
                for lay in by_input[name]:
                    xq = (_local_quant(x, lq[lay.node.name]) if lay.node.name in lq
                          else qouts.get(qnames.get(lay.node.name, "")))
                    _accumulate(lay, x, xq)
                del x  # free each activation as soon as its layers are done
            del outs, qouts
        if first_input is not None and first_input in feed:
            samples += int(np.shape(feed[first_input])[0]) if np.ndim(feed[first_input]) else 1
        nb += 1
        if progress is not None:
            progress(nb, n_total)
    return samples, nb


# ----------------------------------------------------------------------------------------------
# Solvers


def _quant(w: np.ndarray, s: np.ndarray, qmax: int) -> np.ndarray:
    return np.clip(np.rint(w / s), -qmax, qmax)


def _out_err(dw: np.ndarray, H: np.ndarray) -> float:
    """sum_g tr(ΔW_g H_g ΔW_gᵀ)."""
    return float(np.einsum("grk,gkl,grl->", dw, H, dw, optimize=True))


def _gptq(W: np.ndarray, H: np.ndarray, s: np.ndarray, qmax: int, *, damp: float = 0.1,
          block: int = 128, act_order: bool = False) -> np.ndarray:
    """Batched GPTQ: W (G, R, K) float64, H (G, K, K) (sum or mean of x xᵀ), s (G, R) fixed
    per-row scales. Returns integer-valued q (G, R, K) with |q| ≤ qmax.

    Columns are rounded one by one; each column's error, scaled by the inverse-Hessian Cholesky
    row, is subtracted from the not-yet-rounded columns (lazy block updates as in the paper)."""
    G, R, K = W.shape
    W0 = W
    W = W.copy()
    H = H.copy()
    diag = np.einsum("gkk->gk", H)  # view
    dead = diag <= 0
    if dead.any():
        diag[dead] = 1.0  # input always 0: no coupling, the column is just rounded to nearest
    if act_order:
        perm = np.argsort(-np.einsum("gkk->gk", H), axis=1, kind="stable")
        W = np.take_along_axis(W, perm[:, None, :], axis=2)
        H = np.take_along_axis(np.take_along_axis(H, perm[:, :, None], axis=1), perm[:, None, :], axis=2)
    lam = damp * np.einsum("gkk->gk", H).mean(axis=1)
    eye = np.eye(K)
    U = None
    for attempt in range(6):
        try:
            Hd = H + (lam * (10.0 ** attempt))[:, None, None] * eye
            L = np.linalg.cholesky(np.linalg.inv(Hd))  # H⁻¹ = L Lᵀ
            U = np.swapaxes(L, 1, 2)  # upper Cholesky factor of H⁻¹
            if np.isfinite(U).all():
                break
        except np.linalg.LinAlgError:
            continue
    if U is None or not np.isfinite(U).all():  # hopeless statistics: round to nearest
        return _quant(W0, s[:, :, None], qmax)
    Q = np.empty_like(W)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, :, i1:i2]  # view: updates land in W
        E = np.empty((G, R, i2 - i1))
        for j in range(i2 - i1):
            w = W1[:, :, j]
            q = np.clip(np.rint(w / s), -qmax, qmax)
            Q[:, :, i1 + j] = q
            d = U[:, i1 + j, i1 + j]
            err = (w - q * s) / d[:, None]
            E[:, :, j] = err
            if j + 1 < i2 - i1:
                W1[:, :, j + 1:] -= err[:, :, None] * U[:, None, i1 + j, i1 + j + 1:i2]
        if i2 < K:
            W[:, :, i2:] -= np.matmul(E, U[:, i1:i2, i2:])
    if act_order:
        Q = np.take_along_axis(Q, np.argsort(perm, axis=1)[:, None, :], axis=2)
    return Q


def _compensated(lay: _Layer, Wg: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Input compensation (see optimize_weight_rounding's ``quantized``): the target weights, the
    Hessian of the quantized inputs and their mean. The normal equations of E||W x - W' x̃||² give
    W' = W C Hq⁻¹ = W + W (C - Hq) Hq⁻¹; damping only the second term keeps W where the
    quantized input carries no information about a direction."""
    n = lay.n
    Hq, C, mu_q = lay.Hq / n, lay.C / n, lay.Sq / n
    K = Hq.shape[1]
    diag = np.einsum("gkk->gk", Hq)
    lam = damp * np.maximum(diag.mean(axis=1), 1e-12)
    Hd = Hq + lam[:, None, None] * np.eye(K)
    corr = np.linalg.solve(Hd, np.swapaxes(C - Hq, 1, 2))          # (G, K, K) = Hd⁻¹ (C - Hq)ᵀ
    Wt = Wg + np.matmul(Wg, np.swapaxes(corr, 1, 2))
    return Wt, Hq, mu_q


def _scales(lay: _Layer, Wg: np.ndarray, bias: np.ndarray | None, qmax: int,
            activation_bits: int) -> tuple[np.ndarray, int]:
    """Per-row symmetric scales (G, R), float32-exact, with a floor that keeps ORT's int32 bias
    check (``input_scale·w_scale ≥ 2|b|/(2³²-2)``) from ever re-scaling a channel, which would
    silently change our integers. The input scale is estimated from the FP32 calibration range
    as an ``activation_bits`` asymmetric quantizer would see it; a ×64 margin covers other
    calibrators (percentile, entropy) and symmetric activations. With 8-bit activations only
    channels with ~zero weights (dead BN channels, max|w| ~ 1e-8) are affected and round to 0;
    with 16-bit activations the floor matches the re-scaling ORT would otherwise do."""
    amax = np.abs(Wg).max(axis=2)
    s = amax / qmax
    floored = 0
    if bias is not None:
        in_scale = (max(lay.xmax, 0.0) - min(lay.xmin, 0.0)) / (2.0 ** activation_bits - 1)
        if in_scale > 0:
            floor = _BIAS_SCALE_MARGIN * 2.0 * np.abs(bias) / (in_scale * _INT32_QRANGE)
            low = s < floor
            floored = int(low.sum())
            s = np.where(low, floor, s)
    s = np.where(s > 0, s, 1.0)  # all-zero channel: any scale; ORT would pick 1.0 too
    return s.astype(np.float32).astype(np.float64), floored


def optimize_weight_rounding(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]]
                             | Callable[[], Iterable[dict[str, np.ndarray]]], *,
                             nodes: Collection[str] | None = None, bits: int = 8, method: str = "gptq",
                             bias_correction: bool = True, damp: float = 0.1, act_order: bool = False,
                             activation_bits: int = 8, progress: Callable[[int, int], None] | None = None,
                             quantized: onnx.ModelProto | None = None, compensation: str = "local",
                             ) -> tuple[onnx.ModelProto, dict[str, list[dict]], RoundingReport]:
    """Choose int weights that minimise each layer's output error on calibration data.

    Args:
        model: float ONNX model, already pre-processed (BN folded into Conv). Not modified.
        batches: feed dicts for the model inputs (a list, any iterable, or a callable returning a
            fresh iterable). Only one pass is made, so a one-shot generator is fine. Batches of
            8-16 images keep memory low; every selected layer's input for one batch is held at once.
        nodes: names of Conv / Gemm / MatMul (constant 2-D B) nodes to optimise; None: all.
        bits: weight bits; integers are kept in [-(2^(bits-1)-1), 2^(bits-1)-1] (int8 container).
        method: "gptq" (error-compensating sequential rounding) or "rtn" (round to nearest; with
            ``bias_correction`` this is plain bias correction).
        bias_correction: fold the mean output shift ``(W - Ŵ)·E[x]`` into the bias (a zero bias is
            added to Conv/Gemm without one; MatMul has no bias and is left uncorrected).
        damp: GPTQ dampening, λ = damp·mean(diag H). 0.1 (rather than the paper's 0.01) measured
            slightly better on held-out images with 100 calibration images (less over-fitting).
        act_order: GPTQ column order by decreasing diag(H) instead of natural order.
        activation_bits: bits of the activations ORT will use (8 or 16); only sets the weight-scale
            floor that keeps ORT's int32-bias adjustment from changing our scales.
        progress: called as ``progress(done, total)``: once per calibration batch, then once per
            layer solved. ``total`` is 0 during the statistics pass when ``batches`` has no len().
        quantized: a QDQ model of the same network (node names kept), e.g. a first pass of this
            function built by ONNX Runtime. With it each layer's rounding targets the FP32 output
            from the input *the INT8 model computes with* (input compensation): minimise
            ``E||W x - Ŵ x̃||²``, x̃ the layer's dequantized input in that model, run unfused on the
            same batches. The target weights become ``W + W E[(x - x̃) x̃ᵀ] (E[x̃ x̃ᵀ] + λI)⁻¹``
            (only the correction is damped), GPTQ rounds them with ``E[x̃ x̃ᵀ]``, and bias
            correction removes the mean shift ``W E[x] - Ŵ E[x̃]``, activation-rounding and clipping
            bias included. Why: on EfficientNet-Lite0 most of the INT8 error is activation
            rounding (docs/BENCHMARKS.md), which weight rounding alone never sees.
        compensation: with ``quantized``, what x̃ is: "local" (the FP32 input through the layer's own
            input quantizer from ``quantized``: each layer answers for its own activation rounding
            and clipping, nothing is counted twice) or "network" (the input the whole INT8 model
            computes; every layer then also compensates upstream error that the upstream layers
            compensate themselves, which over-corrects when all layers are solved at once).

    Returns:
        ``(new_model, overrides, report)``. ``new_model`` holds the dequantized weights ``q·s`` (and
        corrected biases). ``overrides`` is ``{weight_name: [{"axis", "scale", "zero_point",
        "quant_type"} per output channel]}`` for ``quantize_static(..., extra_options=
        {"TensorQuantOverrides": overrides})``; with it ORT reproduces exactly the integers ``q``
        (see :func:`check_quantized_weights`). ``report`` holds per-layer output-error figures.
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method must be 'gptq' or 'rtn', got {method!r}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 (int8 container), got {bits}")
    from onnxruntime.quantization import QuantType

    qmax = 2 ** (bits - 1) - 1
    skipped: dict[str, str] = {}
    layers = _find_layers(model, nodes, skipped)
    try:
        n_batches = len(batches)  # type: ignore[arg-type]
    except TypeError:
        n_batches = 0
    n_total = n_batches + len(layers) if n_batches else 0

    t0 = time.perf_counter()
    with _blas_threads(1):
        samples, nb = (_collect(model, layers, batches, progress, n_total, quantized, compensation == "local")
                       if layers else (0, 0))
    t1 = time.perf_counter()

    new = onnx.ModelProto()
    new.CopyFrom(model)
    g = new.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    node_by_name = {id(n): k for k, n in enumerate(model.graph.node)}
    overrides: dict[str, list[dict]] = {}
    if compensation not in ("local", "network"):
        raise ValueError(f"compensation must be 'local' or 'network', got {compensation!r}")
    report = RoundingReport(method + (f"+{compensation}-compensation" if quantized is not None else ""), bits, samples, nb,
                            t1 - t0, 0.0, skipped=skipped)

    for li, lay in enumerate(layers):
        ts = time.perf_counter()
        label = lay.node.name or lay.node.output[0]
        if lay.H is None or lay.n == 0:
            skipped[label] = "no calibration data reached this layer"
            continue
        W = numpy_helper.to_array(inits[lay.weight]).astype(np.float64)
        Wg = lay.weight_grk(W)
        G, R, K = Wg.shape
        H = lay.H / lay.n
        mu = lay.S / lay.n  # (G, K)

        # current float bias as (G, R), in "output units" (Gemm: divided by beta)
        bias_arr = None
        bias_ok = lay.bias != "?"
        if lay.bias not in (None, "?"):
            b = numpy_helper.to_array(inits[lay.bias]).astype(np.float64)
            n_out = G * R
            if b.size == n_out:
                bias_arr = b.reshape(G, R) * (lay.beta if lay.op == "Gemm" else 1.0)
            elif b.size == 1:
                bias_arr = np.full((G, R), float(b.reshape(())) * (lay.beta if lay.op == "Gemm" else 1.0))
            else:
                bias_ok = False  # e.g. a (M, N) Gemm C: not per output channel
        Wt, Hs, mu_q = Wg, H, mu
        if lay.Hq is not None:
            Wt, Hs, mu_q = _compensated(lay, Wg, damp)
        s, floored = _scales(lay, Wt, bias_arr, qmax, activation_bits)

        q_rtn = _quant(Wg, s[:, :, None], qmax)
        if method == "gptq":
            q = _gptq(Wt, Hs, s, qmax, damp=damp, act_order=act_order)
        else:
            q = _quant(Wt, s[:, :, None], qmax)
        Wq = q * s[:, :, None]
        Wq32 = Wq.astype(np.float32)
        wref = float(np.einsum("grk,gkl,grl->", Wg, H, Wg, optimize=True)) or 1.0
        err_rtn = _out_err(Wg - q_rtn * s[:, :, None], H) / wref
        err_opt = _out_err(Wg - Wq32.astype(np.float64), H) / wref

        inits[lay.weight].CopyFrom(numpy_helper.from_array(lay.weight_back(Wq32), lay.weight))

        corrected = False
        if bias_correction and lay.op in ("Conv", "Gemm") and bias_ok:
            shift = (np.einsum("grk,gk->gr", Wg, mu) - np.einsum("grk,gk->gr", Wq32.astype(np.float64), mu_q)) \
                * (lay.alpha if lay.op == "Gemm" else 1.0)
            base = bias_arr if bias_arr is not None else np.zeros((G, R))
            nb_ = (base + shift).reshape(-1)
            if lay.op == "Gemm":
                nb_ = nb_ / (lay.beta if lay.beta != 0 else 1.0)
            node = g.node[node_by_name[id(lay.node)]]
            if lay.op == "Gemm" and lay.beta == 0:
                pass  # C is ignored by the op: nothing to correct through it
            else:
                name = lay.bias if lay.bias is not None and uses.get(lay.bias, 0) == 1 else None
                if name is None:  # missing or shared bias: give this node its own
                    name = f"{lay.weight}_rounding_bias"
                    while name in inits:
                        name += "_"
                    inits[name] = g.initializer.add()  # (append() would store a copy)
                    while len(node.input) < 3:
                        node.input.append("")
                    node.input[2] = name
                inits[name].CopyFrom(numpy_helper.from_array(nb_.astype(np.float32), name))
                corrected = True

        n_ch = G * R
        flat_s = s.reshape(-1)
        overrides[lay.weight] = [
            {"axis": lay.axis, "scale": float(np.float32(flat_s[c])), "zero_point": 0, "quant_type": QuantType.QInt8}
            for c in range(n_ch)]
        report.layers.append(LayerRounding(label, lay.op, lay.weight, lay.w_shape, lay.groups, err_rtn, err_opt,
                                           corrected, floored, time.perf_counter() - ts))
        lay.H = lay.S = lay.Hq = lay.C = lay.Sq = None  # free
        if progress is not None:
            progress(n_batches + li + 1, n_total)
    report.solve_seconds = time.perf_counter() - t1
    return new, overrides, report


def check_quantized_weights(qdq_model: onnx.ModelProto, float_model: onnx.ModelProto,
                            overrides: dict[str, list[dict]]) -> dict[str, int]:
    """Compare the integer weights in an ORT QDQ model with the integers ``round(Ŵ / s)`` implied
    by ``float_model`` (the model returned by :func:`optimize_weight_rounding`) and ``overrides``.

    Returns ``{weight_name: number of mismatching integers}`` for every overridden weight whose
    quantized initializer could not be found (-1) or differs; an empty dict means ORT reproduced
    every integer and every scale. A weight whose scale ORT changed (its int32-bias adjustment)
    counts its channels with a different scale as mismatches too.
    """
    f_inits = {t.name: t for t in float_model.graph.initializer}
    q_inits = {t.name: t for t in qdq_model.graph.initializer}
    # DequantizeLinear(x_q, scale, zp) whose output feeds where the float weight used to go
    dq_for: dict[str, onnx.NodeProto] = {}
    for n in qdq_model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in q_inits:
            dq_for[n.input[0]] = n
    bad: dict[str, int] = {}
    for wname, chans in overrides.items():
        node = dq_for.get(wname + "_quantized")
        if node is None:
            cands = [n for k, n in dq_for.items() if k.startswith(wname)]
            node = cands[0] if len(cands) == 1 else None
        if node is None or wname not in f_inits:
            bad[wname] = -1
            continue
        q = numpy_helper.to_array(q_inits[node.input[0]]).astype(np.int64)
        scale = numpy_helper.to_array(q_inits[node.input[1]]).astype(np.float32).reshape(-1)
        w = numpy_helper.to_array(f_inits[wname]).astype(np.float32)
        axis = chans[0]["axis"]
        want_s = np.array([c["scale"] for c in chans], dtype=np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        want_q = np.rint(w / want_s.reshape(shape)).astype(np.int64)
        mism = int((q != want_q).sum()) + int((scale != want_s).sum()) if q.shape == want_q.shape else -1
        if mism:
            bad[wname] = mism
    return bad
