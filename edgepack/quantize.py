"""Accuracy-aware INT8 post-training quantization of an ONNX model for a named board.

The pipeline (each step measured, not assumed):

1. check the model and the data (ONNX, not already quantized, sample shapes fit);
2. ONNX Runtime pre-processing (shape inference, BatchNorm folding);
3. one streaming calibration pass set -> MinMax, Percentile and Entropy ranges (calibrate.py);
4. optional advanced PTQ: output-error-minimizing weight rounding (rounding.py, GPTQ);
5. one QDQ candidate per calibration method, per-channel weights, the board's activation dtype;
   the best on the *search* split wins;
6. if the accuracy budget is missed and the board allows float: rank layers by injected noise
   (sensitivity.py) and keep the fewest most sensitive ones in float, confirmed by evaluation;
7. final figures on the *held-out* split, the size, and FP32-vs-INT8 latency on this CPU.

At most ``max_evals`` full evaluations; the best model found is always written, and the report
says plainly whether the budget was met.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import onnx

from .calibrate import METHODS, Calibration, collect
from .data import Dataset
from .errors import BudgetNotMet, DataError, ModelError
from .evaluate import Comparison, compare, predict, session
from .latency import compare_latency
from .modelinfo import ModelInfo, check_sample_shape, load_model
from .sensitivity import rank_layers
from .targets import Target

log = logging.getLogger("edgepack.quantize")


class Progress(Protocol):
    """What the pipeline reports progress to (the CLI passes rich bars; notebooks may pass None)."""

    def start(self, description: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def done(self) -> None: ...


class _NoProgress:
    def start(self, description: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def done(self) -> None: ...


@dataclass
class QuantizeOptions:
    max_drop: float | None = None          # percentage points; None: the target's budget
    methods: tuple[str, ...] = METHODS
    calib_size: int | None = None          # None: every calibration sample
    weight_rounding: str = "gptq"          # "gptq" (advanced PTQ) or "nearest"
    max_evals: int = 10                    # full evaluations, the final held-out one included
    latency_threads: tuple[int, ...] = (1, 2)
    require_speedup: bool = False          # refuse (BudgetNotMet) when INT8 is not faster
    batch_size: int = 16
    sensitivity_samples: int = 16
    seed: int = 0


@dataclass
class CandidateResult:
    name: str
    method: str
    float_layers: list[str]
    search_drop: float
    search_agreement: float
    output_sqnr_db: float


@dataclass
class LatencyRow:
    threads: int
    fp32_ms: float
    int8_ms: float
    fp32_p90_ms: float
    int8_p90_ms: float
    runs: int

    @property
    def ratio(self) -> float:
        return self.int8_ms / self.fp32_ms


@dataclass
class QuantizeReport:
    model: str
    output: str
    target: str
    metric: str
    budget_points: float
    budget_met: bool
    fp32_size_bytes: int
    int8_size_bytes: int
    fp32_top1: float | None
    int8_top1: float | None
    drop_points: float
    agreement: float
    output_sqnr_db: float
    mcnemar_p: float | None
    holdout_samples: int
    search_samples: int
    calibration_method: str
    calibration_samples: int
    weight_rounding: str
    activation_dtype: str
    per_channel: bool
    candidates: list[CandidateResult]
    sensitive_layers: list[dict]
    float_layers: list[str]
    evaluations: int
    latency: list[LatencyRow]
    speedup_ok: bool
    seconds: float
    peak_rss_mb: float
    warnings: list[str] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        return self.fp32_size_bytes / max(self.int8_size_bytes, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size_ratio"] = round(self.size_ratio, 3)
        for row, obj in zip(d["latency"], self.latency):
            row["ratio"] = round(obj.ratio, 3)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def split_eval(data: Dataset, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic halves of the evaluation set: one ranks candidates, the other is held out."""
    if len(data) < 4:
        raise DataError(f"evaluation set {data.name!r} has {len(data)} samples; need at least 4 "
                        "(or pass a separate --search set)")
    perm = np.random.default_rng(seed).permutation(len(data))
    h = len(data) // 2
    return data.subset(np.sort(perm[:h]), f"{data.name}[search]"), data.subset(np.sort(perm[h:]), f"{data.name}[holdout]")


def _preprocess(info: ModelInfo, work: Path) -> onnx.ModelProto:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "pre.onnx"
    try:
        quant_pre_process(info.model, str(out), skip_symbolic_shape=True)
    except Exception as e:
        raise ModelError(f"{info.path}: ONNX Runtime pre-processing failed ({e.__class__.__name__}: {e})") from None
    m = onnx.load(str(out))
    for i, n in enumerate(m.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    onnx.save(m, str(out))
    return m


class _Builder:
    """Builds QDQ candidates from one pre-processed model and one calibration."""

    def __init__(self, pre_path: Path, calib: Calibration, target: Target, work: Path,
                 overrides: dict | None):
        self.pre_path, self.calib, self.target, self.work = pre_path, calib, target, work
        self.overrides = overrides or {}
        self.n = 0

    def build_dynamic(self) -> Path:
        """Weights INT8 ahead of time, activations quantized at run time (float in/out)."""
        from onnxruntime.quantization import QuantType, quantize_dynamic

        self.n += 1
        out = self.work / f"cand-{self.n}.onnx"
        quantize_dynamic(str(self.pre_path), str(out), per_channel=self.target.quant.per_channel,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        return out

    def build(self, method: str, float_layers: list[str]) -> Path:
        if method == "dynamic":
            return self.build_dynamic()
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        self.n += 1
        cache = self.work / f"ranges-{method}.json"
        if not cache.exists():
            self.calib.write_ort_cache(method, cache)
        out = self.work / f"cand-{self.n}.onnx"
        act = QuantType.QUInt8 if self.target.quant.activation_dtype == "uint8" else QuantType.QInt8
        extra: dict = {}
        if self.overrides:
            extra["TensorQuantOverrides"] = {k: v for k, v in self.overrides.items()}
        quantize_static(str(self.pre_path), str(out), calibration_data_reader=None,
                        quant_format=QuantFormat.QDQ, per_channel=self.target.quant.per_channel,
                        activation_type=act, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(float_layers), calibration_cache_path=str(cache),
                        extra_options=extra)
        return out


def quantize(model_path: str | Path, target: Target, calib: Dataset, evaluation: Dataset,
             output: str | Path, *, search: Dataset | None = None,
             options: QuantizeOptions | None = None, progress: Progress | None = None) -> QuantizeReport:
    """Quantize ``model_path`` for ``target`` and write the INT8 model to ``output``.

    ``evaluation`` gives the final figures; ranking and selection use ``search`` or, without one,
    half of ``evaluation`` (the other half is held out). Nothing is written to ``output`` unless
    the whole run succeeds.
    """
    opt = options or QuantizeOptions()
    pg = progress or _NoProgress()
    t0 = time.perf_counter()
    warnings: list[str] = []
    budget = target.max_top1_drop if opt.max_drop is None else opt.max_drop
    output = Path(output)
    if output.suffix != ".onnx":
        raise DataError(f"output {output} must end in .onnx")
    if not output.parent.exists():
        raise DataError(f"output folder {output.parent} does not exist")

    info = load_model(model_path)
    if opt.calib_size is not None:
        if opt.calib_size <= 0:
            raise DataError("calibration size must be positive")
        calib = calib.subset(np.arange(min(opt.calib_size, len(calib))), calib.name)
    if len(calib) == 0:
        raise DataError("calibration set is empty")
    for ds, what in ((calib, "calibration"), (evaluation, "evaluation"), (search, "search")):
        if ds is not None:
            if len(ds) == 0:
                raise DataError(f"{what} set is empty")
            check_sample_shape(info, ds.loader(0), what)
    if search is None:
        search, holdout = split_eval(evaluation, opt.seed)
    else:
        holdout = evaluation

    work = Path(tempfile.mkdtemp(prefix="edgepack-q-"))
    try:
        pre = _preprocess(info, work)
        pre_path = work / "pre.onnx"
        fp32 = session(info.path)
        pg.start("FP32 reference", len(search) + len(holdout))
        ref_search = predict(fp32, search, batch_size=opt.batch_size, progress=pg.advance)
        ref_hold = predict(fp32, holdout, batch_size=opt.batch_size, progress=pg.advance)
        pg.done()
        del fp32

        pg.start(f"calibrating on {len(calib)} samples", 2 * len(calib))
        cal = collect(pre, calib, info.input_names, batch_size=8,
                      progress=lambda d, t: pg.advance(d - getattr(pg, "_last", 0)) or setattr(pg, "_last", d))
        pg.done()
        if hasattr(pg, "_last"):
            delattr(pg, "_last")

        base_path, overrides, rounding = pre_path, None, "nearest"
        if opt.weight_rounding == "gptq":
            base_path, overrides, rounding = _advanced_rounding(pre, calib, info, work, pg, warnings)
        builder = _Builder(base_path, cal, target, work, overrides)

        evals = 0
        candidates: list[CandidateResult] = []
        best: tuple[float, float, Path, CandidateResult] | None = None

        def evaluate(path: Path, name: str, method: str, floats: list[str]) -> Comparison:
            nonlocal evals, best
            evals += 1
            pg.start(f"evaluating {name}", len(search))
            c = compare(ref_search, predict(session(path), search, batch_size=opt.batch_size,
                                            progress=pg.advance), search.labels)
            pg.done()
            cr = CandidateResult(name, method, list(floats), round(c.drop, 3), round(c.agreement, 3),
                                 round(c.output_sqnr_db, 2))
            candidates.append(cr)
            key = (c.drop, -c.output_sqnr_db)
            if best is None or key < best[:2]:
                best = (c.drop, -c.output_sqnr_db, path, cr)
            return c

        search_budget = max(1, opt.max_evals - 1)
        for method in opt.methods:
            if evals >= search_budget:
                break
            evaluate(builder.build(method, []), f"int8/{method}", method, [])
        if _dynamic_worth_trying(info, target) and evals < search_budget:
            evaluate(builder.build_dynamic(), "int8/dynamic", "dynamic", [])
        assert best is not None
        method = best[3].method

        ranking = []
        if best[0] > budget and target.float_allowed and evals < search_budget:
            n_s = min(opt.sensitivity_samples, len(search))
            _, feeds = next(search.feeds(n_s, info.input_names))
            ranking = rank_layers(onnx.load(str(base_path)), onnx.load(str(best[2])), feeds)
            lo, hi = 0, None  # largest k known to miss, smallest k known to meet
            k = 1
            while evals < search_budget and k <= len(ranking):
                floats = [r.name for r in ranking[:k]]
                c = evaluate(builder.build(method, floats), f"int8/{method}+{k} float", method, floats)
                if c.drop <= budget:
                    hi = k
                else:
                    lo = k
                if hi is None:
                    k = min(k * 2, len(ranking)) if k < len(ranking) else k + 1
                elif hi - lo <= 1:
                    break
                else:
                    k = (lo + hi) // 2

        # Of the candidates that meet the budget prefer the fewest float layers; else the best.
        meeting = [c for c in candidates if c.search_drop <= budget]
        chosen = min(meeting, key=lambda c: (len(c.float_layers), c.search_drop)) if meeting else best[3]
        chosen_path = builder.build(chosen.method, chosen.float_layers)

        evals += 1
        pg.start("held-out evaluation", len(holdout))
        final = compare(ref_hold, predict(session(chosen_path), holdout, batch_size=opt.batch_size,
                                          progress=pg.advance), holdout.labels)
        pg.done()
        met = final.drop <= budget
        if not met:
            warnings.append(f"accuracy budget not met: held-out {final.metric} drop {final.drop:.2f} "
                            f"points > {budget:g} allowed")
            if not target.float_allowed:
                warnings.append(f"target {target.name} runs INT8 only: no layer may stay in float, "
                                "so the remaining drop cannot be bought back with mixed precision")

        lat = []
        sample = holdout.loader(0)
        pg.start("latency FP32 vs INT8", len(opt.latency_threads))
        for th in opt.latency_threads:
            a, b = compare_latency(info.path, chosen_path, sample, threads=th)
            lat.append(LatencyRow(th, round(a.median_ms, 3), round(b.median_ms, 3), round(a.p90_ms, 3),
                                  round(b.p90_ms, 3), a.runs))
            pg.advance()
        pg.done()
        speed_ok = all(r.ratio < 1.0 for r in lat)
        if not speed_ok:
            slow = ", ".join(f"{r.threads} thread(s): {r.ratio:.2f}x" for r in lat if r.ratio >= 1)
            msg = f"INT8 is not faster than FP32 on this CPU ({slow})"
            if opt.require_speedup:
                raise BudgetNotMet(msg + "; nothing written (drop --require-speedup to keep it)")
            warnings.append(msg)

        tmp = output.with_name(f".{output.name}.tmp")
        shutil.copyfile(chosen_path, tmp)
        m = onnx.load(str(tmp))
        for k, v in (("edgepack.quantized_for", target.name), ("edgepack.calibration", chosen.method),
                     ("edgepack.float_layers", ",".join(chosen.float_layers))):
            p = m.metadata_props.add()
            p.key, p.value = k, v
        onnx.save(m, str(tmp))
        os.replace(tmp, output)

        return QuantizeReport(
            model=str(info.path), output=str(output), target=target.name, metric=final.metric,
            budget_points=budget, budget_met=met, fp32_size_bytes=info.size_bytes,
            int8_size_bytes=output.stat().st_size, fp32_top1=final.fp32_top1, int8_top1=final.int8_top1,
            drop_points=round(final.drop, 3), agreement=round(final.agreement, 3),
            output_sqnr_db=round(final.output_sqnr_db, 2), mcnemar_p=final.mcnemar_p,
            holdout_samples=final.n, search_samples=len(search), calibration_method=chosen.method,
            calibration_samples=len(calib), weight_rounding=rounding,
            activation_dtype=target.quant.activation_dtype, per_channel=target.quant.per_channel,
            candidates=candidates,
            sensitive_layers=[{"name": r.name, "op": r.op, "injected_nsr": r.score, "sqnr_db": round(r.sqnr_db, 2)}
                              for r in ranking[:10]],
            float_layers=chosen.float_layers, evaluations=evals, latency=lat, speedup_ok=speed_ok,
            seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=round(_peak_rss_mb(), 1),
            warnings=warnings)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        tmp = output.with_name(f".{output.name}.tmp")
        if tmp.exists():
            tmp.unlink()


def _dynamic_worth_trying(info: ModelInfo, target: Target) -> bool:
    """Dynamic quantization only pays where MatMul/Gemm dominate (transformers, MLPs): it keeps
    activations in float, so convolutions stay float and it is slower than FP32 on CNNs
    (8x on EfficientNet-Lite0, see ../shared/ASSETS.md). And only where the board runs float."""
    mm = info.ops.get("MatMul", 0) + info.ops.get("Gemm", 0)
    return target.quant.allow_dynamic and target.float_allowed and mm > info.ops.get("Conv", 0)


def _advanced_rounding(pre: onnx.ModelProto, calib: Dataset, info: ModelInfo, work: Path,
                       pg: Progress, warnings: list[str]):
    """GPTQ weight rounding (rounding.py); returns the model to quantize and ORT overrides."""
    try:
        from .rounding import optimize_weight_rounding
    except ImportError:
        warnings.append("advanced weight rounding unavailable; used round-to-nearest")
        return work / "pre.onnx", None, "nearest"
    batches = lambda: (f for _, f in calib.feeds(8, info.input_names))  # noqa: E731
    pg.start("advanced PTQ: weight rounding", 1)
    model, overrides, _report = optimize_weight_rounding(pre, batches)
    pg.advance()
    pg.done()
    path = work / "rounded.onnx"
    onnx.save(model, str(path))
    return path, overrides, "gptq"
