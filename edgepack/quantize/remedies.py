"""The quantize search: a registry of remedies driven by one :class:`Search` that owns the budget.

Why a registry: every way of bringing an INT8 model within a board's accuracy budget has a
price (evaluations, bytes, milliseconds) and a condition (a float unit on the board, LayerNorms
feeding MatMuls, ...). Each :class:`Remedy` says when it applies and what it costs; the search
runs them cheapest first and stops as soon as a candidate meets the budget, so a model is never
made larger or slower than a simpler variant that was already good enough. Adding a remedy is
one class here, not another branch in ``quantize()``.

Cost order (``cost``): trying another calibration method changes nothing but the ranges;
dynamic quantization and SmoothQuant change the graph but not the size; float *activations*
(weights stay INT8, so the size stays) cost latency only on the layers they touch; float
*layers* cost size and latency and come last, as the issue asks ("float layers only as a last
resort, within the size budget").

:meth:`Search.choose` then picks, among the candidates allowed on the board and within its OTA
budget, the smallest (then fastest) one that meets the accuracy budget, else the most accurate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from .analyze import placement_of
from .calibrate import collect
from ..data import Dataset
from .evaluate import compare, predict
from .latency import compare_latency
from ..modelinfo import ModelInfo
from .numerics import board_session, host_int8
from .qdq import QDQBuilder
from . import selection
from ..targets import Target


QUICK_NOISE = 0.05                   # a quick latency within 5 % of FP32's is not slower than it


@dataclass
class CandidateResult:
    """One measured remedy: the cost-benefit table's row."""

    name: str
    method: str
    float_layers: list[str]
    search_drop: float
    search_agreement: float
    output_sqnr_db: float
    variant: str = "base"            # base | smoothquant | plain-per-tensor | plain-per-channel
    size_bytes: int = 0
    latency_ms: float = 0.0          # batch 1, 1 thread, this CPU (quick median)
    seconds: float = 0.0             # time spent producing and measuring it
    npu_eligible: bool = True        # every op INT8 on the target's accelerator
    cpu_islands: int = 0
    transfer_ms: float = 0.0         # estimated accelerator<->CPU transfer cost of the islands
    remedy: str = ""                 # the registry entry that proposed it
    float_activations: list[str] = field(default_factory=list)  # activations left float (weights INT8)
    fp32_latency_ms: float = 0.0     # FP32 in the same interleaved quick rounds (0: not measured)
    search_se: float = 0.0           # standard error of search_drop (the split's sample size), points

    @property
    def not_slower_than_fp32(self) -> bool:
        """Faster than FP32, or within the quick rounds' noise of it (``QUICK_NOISE``).

        Why a tolerance: FP32's own quick median spread 10.35-12.41 ms over the 11 candidates of
        one main-job run (EfficientNet-Lite0, 1 thread, this 2-core host), so a few percent
        either way is not a measurement; the report's latency is the interleaved one."""
        return not self.fp32_latency_ms or self.latency_ms <= self.fp32_latency_ms * (1 + QUICK_NOISE)


@dataclass
class Search:
    """Owns the evaluation budget, the variants of the float model and every measured candidate."""

    info: ModelInfo
    target: Target
    opt: object                          # quantize.QuantizeOptions (kept untyped: no import cycle)
    budget: float
    calib: Dataset
    data: Dataset                        # the search split: ranks candidates
    ref: np.ndarray                      # FP32 outputs on ``data``
    work: Path
    pg: object
    sample: np.ndarray | dict
    evals: int = 0
    candidates: list[CandidateResult] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    variants: dict[str, tuple[QDQBuilder, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    ranking: list = field(default_factory=list)      # sensitivity.LayerScore, worst first
    best: CandidateResult | None = None
    tried: list[str] = field(default_factory=list)   # remedies run, in order
    activation_ranking: list = field(default_factory=list)   # actprec.ActivationScore, worst first
    splits: dict = field(default_factory=dict)       # variant -> actsplit.SplitReport (split-activations)

    # ------------------------------------------------------------------ budget and state
    baseline_evals: int = 0              # the plain per-tensor/per-channel baselines (not in max_evals)

    @property
    def limit(self) -> int:
        """Evaluations the search may spend: one of ``max_evals`` is kept for the held-out figure;
        the plain baselines come on top, so they never take an evaluation from a remedy."""
        return max(1, self.opt.max_evals - 1) + self.baseline_evals

    @property
    def left(self) -> int:
        return self.limit - self.evals

    def met(self) -> bool:
        return self.best is not None and self.meets(self.best)

    @property
    def labelled(self) -> bool:
        return self.data is not None and self.data.labels is not None

    def meets(self, c: CandidateResult) -> bool:
        """Does ``c`` meet the accuracy budget on the search split, by a margin? (:func:`.selection.meets`)"""
        return selection.meets(c, self.budget, labelled=self.labelled, margin=self.opt.selection_margin)

    @property
    def method(self) -> str:
        """The calibration method later remedies build on: the best static one so far."""
        static = [c for c in self.candidates if c.method != "dynamic"]
        if self.best is not None and self.best.method != "dynamic":
            return self.best.method
        return min(static, key=lambda c: c.search_drop).method if static else "percentile"

    def judge(self, path: Path):
        """The board's arithmetic on this host (edgepack.quantize.numerics), never this laptop's kernels."""
        return board_session(path, self.target.int8_arithmetic, weight_bits=self.target.weight_bits)

    # ------------------------------------------------------------------ variants and candidates
    def prepare(self, model: onnx.ModelProto, label: str) -> QDQBuilder:
        """Calibrate (and round weights for) one variant of the float model; keep it as ``label``."""
        t = time.perf_counter()
        vdir = self.work / label
        vdir.mkdir()
        path = vdir / "model.onnx"
        onnx.save(model, str(path))
        self.pg.start(f"calibrating {label} on {len(self.calib)} samples", 2 * len(self.calib))
        last = [0]

        def adv(d: int, _t: int) -> None:
            self.pg.advance(d - last[0])
            last[0] = d

        cal = collect(model, self.calib, self.info.input_names, batch_size=8, progress=adv)
        self.pg.done()
        overrides = None
        if self.opt.weight_rounding == "gptq":
            path, overrides = _advanced_rounding(model, self.calib, self.info, vdir, self.pg,
                                                 bits=self.target.weight_bits)
        b = QDQBuilder(path, cal, self.target, vdir, overrides)
        self.variants[label] = (b, time.perf_counter() - t)
        return b

    def evaluate(self, variant: str, method: str, floats: list[str], name: str, *, remedy: str,
                 float_acts: list[str] | None = None) -> CandidateResult:
        """Build one candidate, judge it on the search split as the board computes, record it."""
        self.evals += 1
        t = time.perf_counter()
        path = self.variants[variant][0].build(method, floats)
        if float_acts:
            from .actprec import keep_float_activations

            path = keep_float_activations(path, float_acts, self.work / f"fa-{self.evals}.onnx")
        self.pg.start(f"evaluating {name}", len(self.data))
        c = compare(self.ref, predict(self.judge(path), self.data, batch_size=self.opt.batch_size,
                                      progress=self.pg.advance), self.data.labels)
        self.pg.done()
        pl = placement_of(onnx.load(str(path)), self.target)
        f_lat, lat = compare_latency(self.info.path, path, self.sample, threads=1, rounds=3, per_round=5, warmup=2)
        first_of_variant = not any(x.variant == variant for x in self.candidates)
        cr = CandidateResult(name, method, list(floats), round(c.drop, 3), round(c.agreement, 3),
                             round(c.output_sqnr_db, 2), variant=variant, size_bytes=path.stat().st_size,
                             latency_ms=round(lat.median_ms, 3),
                             seconds=round(time.perf_counter() - t
                                           + (self.variants[variant][1] if first_of_variant else 0), 2),
                             npu_eligible=pl.fallback_nodes == 0 and method != "dynamic" and not float_acts,
                             cpu_islands=pl.islands, transfer_ms=pl.estimated_transfer_ms, remedy=remedy,
                             float_activations=list(float_acts or []),
                             fp32_latency_ms=round(f_lat.median_ms, 3), search_se=round(c.drop_se, 3))
        self.candidates.append(cr)
        self.paths[name] = path
        if self.allowed(cr) and (self.best is None or (cr.search_drop, -cr.output_sqnr_db)
                                 < (self.best.search_drop, -self.best.output_sqnr_db)):
            self.best = cr
        return cr

    def allowed(self, c: CandidateResult) -> bool:
        """May this candidate be chosen for the board? Float parts need a float unit or consent."""
        if c.method == "dynamic" and not self.target.quant.allow_dynamic:
            return False
        floats = c.float_layers or c.float_activations
        return not floats or self.target.float_allowed or self.opt.allow_cpu_fallback

    def choose(self) -> CandidateResult:
        """The smallest, then fastest, allowed candidate within the OTA budget that meets the
        accuracy budget; else the most accurate one that fits; oversize only if nothing fits.

        Among those that meet the budget, a candidate with float parts is never chosen over a
        simpler one (fewer float layers and activations) that also meets it and is smaller or
        faster (issue 11: "never a variant larger or slower than a simpler one"). Only then is a
        candidate slower than FP32 in its quick rounds (beyond their noise,
        :attr:`CandidateResult.not_slower_than_fp32`) passed over for one that is not: on a tiny
        model every all-INT8 candidate may be slower than FP32, and a float-layer one "faster"
        by noise must not win with 3x the bytes. Without a candidate that meets the budget,
        the most accurate one wins, "most accurate" as :meth:`accuracy_rank` orders them; when
        this host is the board's kind of CPU (:attr:`latency_is_the_boards`), the most accurate
        one not slower than FP32 (float activations can cost more than they save on a CPU)."""
        allowed = [c for c in self.candidates if self.allowed(c)] or self.candidates[:1]
        fits, meeting, oversize = selection.meeting_within_ota(allowed, self.target, self.meets)
        if oversize:
            self.warnings.append(oversize)
        if meeting:
            simplest = [c for c in meeting if not any(_dominates(s, c) for s in meeting)]
            simplest = [c for c in simplest if c.not_slower_than_fp32] or simplest
            smallest = min(c.size_bytes for c in simplest)
            near = [c for c in simplest if c.size_bytes <= smallest * 1.01]   # same size within 1 %
            return min(near, key=lambda c: (_float_parts(c), c.latency_ms))
        if self.latency_is_the_boards:
            fits = [c for c in fits if c.not_slower_than_fp32] or fits
        return min(fits, key=self.accuracy_rank)

    @property
    def latency_is_the_boards(self) -> bool:
        """Is this host the target's kind of CPU (its architecture and INT8 arithmetic)? Else the
        quick rounds time a host proxy, which may report but never trade accuracy away: an ARM
        board's float-versus-INT8 costs are not an x86 host's (on an AVX2 host without VNNI every
        INT8 variant of EfficientNet-Lite0 runs near FP32's speed, 0.94-1.05x; on a VNNI one 0.46x)."""
        host = host_int8()
        return self.target.arch == host.machine and self.target.int8_arithmetic == host.arithmetic

    def accuracy_rank(self, c: CandidateResult) -> tuple[float, float]:
        """Most accurate first, when no candidate is known to meet the budget (:func:`.selection.accuracy_rank`)."""
        return selection.accuracy_rank(c, labelled=self.labelled)


def _float_parts(c: CandidateResult) -> tuple[int, int]:
    """How far from all-INT8: float layers (bytes and milliseconds) weigh before float
    activations (milliseconds only)."""
    return len(c.float_layers), len(c.float_activations)


def _dominates(simple: CandidateResult, c: CandidateResult) -> bool:
    """``simple`` is simpler than ``c`` and ``c`` is larger (beyond 0.1 %) or not faster than it."""
    return (_float_parts(simple) < _float_parts(c)
            and (c.size_bytes > simple.size_bytes * 1.001 or c.latency_ms >= simple.latency_ms))


# ---------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Remedy:
    """One step of the search: when it applies, what it costs (rank), and what it does."""

    name: str
    cost: int                                  # cheaper first; ties keep registration order
    description: str
    applies: Callable[[Search], bool]
    apply: Callable[[Search], None]
    always: bool = False                       # a baseline candidate: run even when the budget is met


REGISTRY: dict[str, Remedy] = {}


def remedy(name: str, cost: int, description: str, applies: Callable[[Search], bool], *, always: bool = False):
    """Register ``apply`` as the remedy ``name`` (decorator)."""
    def deco(fn: Callable[[Search], None]) -> Callable[[Search], None]:
        REGISTRY[name] = Remedy(name, cost, description, applies, fn, always)
        return fn
    return deco


def run(search: Search, registry: dict[str, Remedy] | None = None) -> Search:
    """Run the remedies cheapest first until the budget is met or the evaluations are spent.

    The baseline candidates (``always``: the calibration methods, dynamic quantization where it
    applies) always run; every other remedy only while the best candidate misses the budget."""
    for r in sorted((registry or REGISTRY).values(), key=lambda r: r.cost):
        if search.left <= 0:
            break
        if search.candidates and search.met() and not r.always:
            continue
        if r.applies(search):
            search.tried.append(r.name)
            r.apply(search)
    if search.best is None and search.candidates:
        search.best = search.candidates[0]
    return search


@remedy("calibration", 0, "one INT8 candidate per calibration method (MinMax, Percentile, Entropy)",
        lambda s: True, always=True)
def _calibration(s: Search) -> None:
    for method in s.opt.methods:
        if s.left <= 0:
            break
        s.evaluate("base", method, [], f"int8/{method}", remedy="calibration")


def _plain_applies(s: Search) -> bool:
    return bool(getattr(s.opt, "plain_baselines", True)) and "base" in s.variants


@remedy("plain", 0, "plain ONNX Runtime INT8 as baselines: MinMax ranges, round-to-nearest weights, "
        "per-tensor and per-channel (a simpler variant the search must beat, not only match)",
        _plain_applies, always=True)
def _plain(s: Search) -> None:
    """The recipes a user gets from ``quantize_static`` without edgepack, on the same calibration
    (no second calibration pass): a model that does as well with these must not come out larger
    or slower. They come on top of ``max_evals`` (``Search.baseline_evals``)."""
    base = s.variants["base"][0]
    pre = s.work / "pre.onnx"
    for per_channel, label in ((False, "per-tensor"), (True, "per-channel")):
        variant = f"plain-{label}"
        vdir = s.work / variant
        vdir.mkdir(exist_ok=True)
        s.variants[variant] = (QDQBuilder(pre if pre.exists() else base.pre_path, base.calib, s.target, vdir,
                                          None, per_channel=per_channel), 0.0)
        s.baseline_evals += 1
        s.evaluate(variant, "minmax", [], f"int8/plain {label}", remedy="plain")


def _dynamic_applies(s: Search) -> bool:
    """Dynamic quantization only pays where MatMul/Gemm dominate (transformers, MLPs): it keeps
    activations in float, so convolutions stay float and it is slower than FP32 on CNNs
    (8x on EfficientNet-Lite0, see ../shared/ASSETS.md). And only where the board runs float."""
    ops = s.info.ops
    mm = ops.get("MatMul", 0) + ops.get("Gemm", 0)
    return s.target.quant.allow_dynamic and s.target.float_allowed and mm > ops.get("Conv", 0)


@remedy("dynamic", 1, "weights INT8 ahead of time, activations quantized at run time (MatMul models)",
        _dynamic_applies, always=True)
def _dynamic(s: Search) -> None:
    s.evaluate("base", "dynamic", [], "int8/dynamic", remedy="dynamic")


def _has_layernorm_matmul(s: Search) -> bool:
    m = onnx.load(str(s.variants["base"][0].pre_path)) if "base" in s.variants else None
    if m is None:
        return False
    ln = {n.output[0] for n in m.graph.node if n.op_type == "LayerNormalization"}
    return any(n.op_type == "MatMul" and n.input[0] in ln for n in m.graph.node)


@remedy("smoothquant", 2, "SmoothQuant-style scale migration from LayerNorm outputs into the MatMul weights",
        _has_layernorm_matmul)
def _smoothquant(s: Search) -> None:
    from .smoothquant import smooth

    pre = onnx.load(str(s.work / "pre.onnx"))
    t = time.perf_counter()
    sm, srep = smooth(pre, s.calib, s.info.input_names, alpha=s.opt.smooth_alpha)
    if not srep.matmuls:
        return
    s.prepare(sm, "smoothquant")
    b, prep = s.variants["smoothquant"]
    s.variants["smoothquant"] = (b, prep + time.perf_counter() - t)
    s.evaluate("smoothquant", s.method, [], f"int8/{s.method}+smoothquant", remedy="smoothquant")
    if s.best is not None and s.best.variant == "smoothquant":
        s.warnings.append(f"SmoothQuant migrated scales on {srep.tensors} tensor(s): worst channel ratio "
                          f"{srep.max_ratio_before}x -> {srep.max_ratio_after}x")


def _split_applies(s: Search) -> bool:
    """Only where every activation must be INT8 (a board that runs float keeps a sensitive one
    float instead, cheaper) and the model has ReLU6 outputs read only by convolutions."""
    if s.target.float_allowed or s.opt.allow_cpu_fallback or s.opt.split_activations <= 0 or s.left <= 0:
        return False
    from .actsplit import splittable

    return (s.work / "pre.onnx").exists() and bool(splittable(onnx.load(str(s.work / "pre.onnx"))))


@remedy("split-activations", 2, "INT8-only boards: the most sensitive ReLU6 outputs as k clipped pieces "
        "each on its own INT8 grid (log2 k more bits, same float function, all INT8): a few KB and a few "
        "% of MACs", _split_applies)
def _split_activations(s: Search) -> None:
    """Rank the activation quantizers of the best candidate (actprec.rank_activations), split
    the top ``split_activations`` splittable ones into each of ``split_pieces`` pieces, and
    judge each variant as any other candidate (actsplit.py says why and what it costs)."""
    from .actprec import rank_activations
    from .actsplit import split_activations, splittable

    base = s.best if s.best is not None and s.best.method != "dynamic" else None
    if base is None:
        return
    pre = onnx.load(str(s.work / "pre.onnx"))
    ok = set(splittable(pre))
    _, feeds = next(s.data.feeds(min(s.opt.activation_rank_samples, len(s.data)), s.info.input_names))
    ranked = rank_activations(s.info.path, s.paths[base.name], feeds, limit=s.opt.max_float_activations or 64)
    chosen = [r.tensor for r in ranked if r.tensor in ok][:s.opt.split_activations]
    if not s.activation_ranking:
        s.activation_ranking = ranked
    if not chosen:
        return
    for k in s.opt.split_pieces:
        if s.left <= 0 or s.met():
            break
        m, rep = split_activations(pre, chosen, pieces=k)
        label = f"split{k}"
        s.prepare(m, label)
        s.splits[label] = rep
        s.evaluate(label, base.method, [], f"int8/{base.method}+{len(chosen)} split x{k}", remedy="split-activations")


def _float_activations_applies(s: Search) -> bool:
    """Only where the board runs float (the ops next to a float activation compute in float) and
    with at least two evaluations left, so that float layers keep one."""
    return (s.target.float_allowed or s.opt.allow_cpu_fallback) and s.left >= 2 and s.opt.max_float_activations > 0


@remedy("float-activations", 3, "keep the most sensitive activations in float, weights stay INT8 (small "
        "float convs hold float weights): little size cost, latency measured", _float_activations_applies)
def _float_activations(s: Search) -> None:
    """Rank the activation quantizers by how much output error each adds (actprec.rank_activations,
    a few samples), then evaluate the top k, doubling k; if none meets the budget, the top few
    with every depthwise output (actprec.depthwise_outputs). Two evaluations stay for float layers."""
    from .actprec import depthwise_outputs, rank_activations

    base = s.best if s.best is not None and s.best.method != "dynamic" else None
    if base is None:
        return
    n_s = min(s.opt.activation_rank_samples, len(s.data))
    _, feeds = next(s.data.feeds(n_s, s.info.input_names))
    ranked = rank_activations(s.info.path, s.paths[base.name], feeds, limit=s.opt.max_float_activations)
    if not ranked:
        return
    s.activation_ranking = ranked
    start = min(s.opt.float_activations_start, len(ranked))
    group = depthwise_outputs(onnx.load(str(s.paths[base.name])))
    early = s.opt.float_activations_early > 0
    spend = max(1, s.left - 2 - bool(group) - early)
    k = start
    while spend > 0 and k <= len(ranked):
        c = _with_float_acts(s, base, [r.tensor for r in ranked[:k]], f"{base.name}+{k} float act")
        spend -= 1
        if s.meets(c) or k == len(ranked) or not c.not_slower_than_fp32:
            break    # met, exhausted, or already slower than FP32: more float would be slower still
        k = min(2 * k, len(ranked))
    if group and not s.met() and s.left >= 2:
        acts = list(dict.fromkeys([r.tensor for r in ranked[:start]] + group))
        _with_float_acts(s, base, acts, f"{base.name}+{start} float act+{len(acts) - start} depthwise")
    if early and not s.met() and s.left >= 3:
        _with_earliest_float(s, base)


def _with_earliest_float(s: Search, base: CandidateResult) -> CandidateResult | None:
    """The most accurate float-activation candidate so far, with the earliest of its remaining
    quantized activations float too (the fraction ``float_activations_early`` of them, in graph order).

    Why the earliest: the per-activation ranking scores one quantizer at a time on a few
    samples, and misses what the first layers' noise does downstream. Measured on
    EfficientNet-Lite0 (the main job's model, 19 activations float, 42 still quantized; fused
    exact judge, 136 search / 176 held-out images): making the earliest 7-18 of the 42 float too
    raised the search SQNR from 27.7 to 28.2-28.6 dB and held-out agreement from 96.02 % to
    97.16-98.30 %, at 5.50 MB and 0.89-0.99x FP32 latency (1 thread). On LiteRT the same stage
    (stem to block 3) is what the per-op sensitivity keeps float (docs/BENCHMARKS.md)."""
    from .actprec import activation_quantizers

    done = [c for c in s.candidates if c.remedy == "float-activations" and c.variant == base.variant]
    if not done:
        return None
    top = min(done, key=s.accuracy_rank)
    rest = list(activation_quantizers(onnx.load(str(s.paths[top.name]))))
    if not rest:
        return None
    k = max(1, round(len(rest) * s.opt.float_activations_early))
    acts = list(dict.fromkeys(top.float_activations + rest[:k]))
    return _with_float_acts(s, base, acts, f"{top.name}+{k} earliest")


def _with_float_acts(s: Search, base: CandidateResult, acts: list[str], name: str) -> CandidateResult:
    return s.evaluate(base.variant, base.method, list(base.float_layers), name,
                      remedy="float-activations", float_acts=acts)


@remedy("float-layers", 4, "keep the most sensitive layers in float (on an INT8-only board: on the CPU, "
        "costed only): size and latency cost, the last resort", lambda s: s.left > 0)
def _float_layers(s: Search) -> None:
    """Rank layers by injected noise (sensitivity.py) and bisect the fewest float layers that meet
    the budget. On an INT8-only board float means a CPU placement: measured and costed for the
    table, chosen only if allowed."""
    from .sensitivity import rank_layers

    base = min((c for c in s.candidates if s.allowed(c) and not c.float_activations and c.method != "dynamic"),
               key=lambda c: (c.search_drop, -c.output_sqnr_db), default=None)
    if base is None:
        return
    n_s = min(s.opt.sensitivity_samples, len(s.data))
    _, feeds = next(s.data.feeds(n_s, s.info.input_names))
    s.ranking = rank_layers(onnx.load(str(s.variants[base.variant][0].pre_path)),
                            onnx.load(str(s.paths[base.name])), feeds)
    where = "float" if s.target.float_allowed else "on CPU"
    lo, hi, k = 0, None, 1   # largest k known to miss, smallest k known to meet
    while s.left > 0 and k <= len(s.ranking):
        c = s.evaluate(base.variant, base.method, [r.name for r in s.ranking[:k]],
                       f"{base.name}+{k} {where}", remedy="float-layers")
        if s.meets(c):
            hi = k
        else:
            lo = k
        if hi is None:
            k = min(k * 2, len(s.ranking)) if k < len(s.ranking) else k + 1
        elif hi - lo <= 1:
            break
        else:
            k = (lo + hi) // 2
    if not (s.target.float_allowed or s.opt.allow_cpu_fallback):
        s.warnings.append(f"{s.target.name} runs INT8 only: candidates with layers on the CPU are costed in the "
                          "table but not chosen (pass allow_cpu_fallback / --allow-cpu-fallback to accept them)")


def _advanced_rounding(model: onnx.ModelProto, calib: Dataset, info: ModelInfo, work: Path, pg,
                       bits: int = 8):
    """GPTQ weight rounding with bias correction (rounding.py): the model to quantize and the
    per-channel scale overrides that make ONNX Runtime keep exactly the chosen integers."""
    from .rounding import optimize_weight_rounding

    batches = lambda: (f for _, f in calib.feeds(8, info.input_names))  # noqa: E731
    pg.start("advanced PTQ: GPTQ weight rounding", 1)
    rounded, overrides, _report = optimize_weight_rounding(model, batches, bits=bits)
    pg.advance()
    pg.done()
    path = work / "rounded.onnx"
    onnx.save(rounded, str(path))
    return path, overrides
