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
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx

from .calibrate import METHODS, collect
from ..data import Dataset
from ..errors import BudgetNotMet, DataError
from .evaluate import compare, predict, session
from .latency import compare_latency
from ..modelinfo import ModelInfo, check_samples, load_model
from .numerics import board_session, host_int8, host_session
from .analyze import placement_of
from .qdq import QDQBuilder, preprocess_model
from .smoothquant import smooth
from .sensitivity import rank_layers
from ..targets import Target



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
    smooth_alpha: float = 0.5
    allow_cpu_fallback: bool = False       # INT8-only boards: accept layers placed on the CPU
    seed: int = 0
    golden_samples: int = 16               # held-out samples carried in the bundle for the health check


@dataclass
class CandidateResult:
    """One measured remedy: the cost-benefit table's row."""

    name: str
    method: str
    float_layers: list[str]
    search_drop: float
    search_agreement: float
    output_sqnr_db: float
    variant: str = "base"            # base | smoothquant
    size_bytes: int = 0
    latency_ms: float = 0.0          # batch 1, 1 thread, this CPU (quick median)
    seconds: float = 0.0             # time spent producing and measuring it
    npu_eligible: bool = True        # every op INT8 on the target's accelerator
    cpu_islands: int = 0
    transfer_ms: float = 0.0         # estimated accelerator<->CPU transfer cost of the islands


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
    variant: str
    npu_eligible: bool
    evaluations: int
    latency: list[LatencyRow]
    speedup_ok: bool
    seconds: float
    peak_rss_mb: float
    warnings: list[str] = field(default_factory=list)
    numerics: str = "exact"                 # the target's INT8 arithmetic every figure is computed in
    host_int8: str = ""                     # this host's INT8 instructions (edgepack.quantize.numerics.host_int8)
    host_kernel_agreement: float | None = None  # the held-out agreement on this host's own fused kernels
    latency_source: str = "host"            # "host-proxy" when the target is not this kind of CPU
    board_confirmation: dict | None = None  # edgepack.fleet.confirm: the board's own figure (--confirm-on)

    @property
    def size_ratio(self) -> float:
        return self.fp32_size_bytes / max(self.int8_size_bytes, 1)

    @property
    def exit_code(self) -> int:
        """What the CLI exits with: 0, or BudgetNotMet's 4 when the accuracy budget was missed."""
        return 0 if self.budget_met else BudgetNotMet.exit_code

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
            check_samples(info, ds, what)
    if search is None:
        search, holdout = split_eval(evaluation, opt.seed)
    else:
        holdout = evaluation

    work = Path(tempfile.mkdtemp(prefix="edgepack-q-"))
    try:
        pre = preprocess_model(info, work)
        fp32 = session(info.path)
        pg.start("FP32 reference", len(search) + len(holdout))
        ref_search = predict(fp32, search, batch_size=opt.batch_size, progress=pg.advance)
        ref_hold = predict(fp32, holdout, batch_size=opt.batch_size, progress=pg.advance)
        pg.done()
        del fp32

        def judge(path: Path):
            """The board's arithmetic on this host (edgepack.quantize.numerics), never this laptop's kernels."""
            return board_session(path, target.int8_arithmetic, weight_bits=target.weight_bits)

        def prepare(model: onnx.ModelProto, label: str) -> QDQBuilder:
            """Calibrate (and round weights for) one variant of the float model."""
            vdir = work / label
            vdir.mkdir()
            path = vdir / "model.onnx"
            onnx.save(model, str(path))
            pg.start(f"calibrating {label} on {len(calib)} samples", 2 * len(calib))
            last = [0]

            def adv(d: int, t: int) -> None:
                pg.advance(d - last[0])
                last[0] = d

            cal = collect(model, calib, info.input_names, batch_size=8, progress=adv)
            pg.done()
            overrides = None
            if opt.weight_rounding == "gptq":
                path, overrides = _advanced_rounding(model, calib, info, vdir, pg, bits=target.weight_bits)
            return QDQBuilder(path, cal, target, vdir, overrides)

        t_var = time.perf_counter()
        base = prepare(pre, "base")
        variants = {"base": (base, time.perf_counter() - t_var)}
        rounding = opt.weight_rounding
        evals = 0
        candidates: list[CandidateResult] = []
        paths: dict[str, Path] = {}
        best: CandidateResult | None = None
        sample = holdout.loader(0)

        def evaluate(variant: str, method: str, floats: list[str], name: str) -> CandidateResult:
            nonlocal evals, best
            evals += 1
            t = time.perf_counter()
            b = variants[variant][0]
            path = b.build(method, floats)
            pg.start(f"evaluating {name}", len(search))
            c = compare(ref_search, predict(judge(path), search, batch_size=opt.batch_size,
                                            progress=pg.advance), search.labels)
            pg.done()
            pl = placement_of(onnx.load(str(path)), target)
            _, lat = compare_latency(info.path, path, sample, threads=1, rounds=3, per_round=5, warmup=2)
            cr = CandidateResult(name, method, list(floats), round(c.drop, 3), round(c.agreement, 3),
                                 round(c.output_sqnr_db, 2), variant=variant, size_bytes=path.stat().st_size,
                                 latency_ms=round(lat.median_ms, 3),
                                 seconds=round(time.perf_counter() - t + (variants[variant][1] if not any(
                                     x.variant == variant for x in candidates) else 0), 2),
                                 npu_eligible=pl.fallback_nodes == 0 and method != "dynamic",
                                 cpu_islands=pl.islands, transfer_ms=pl.estimated_transfer_ms)
            candidates.append(cr)
            paths[name] = path
            if _allowed(cr, target, opt) and (best is None or (cr.search_drop, -cr.output_sqnr_db)
                                              < (best.search_drop, -best.output_sqnr_db)):
                best = cr
            return cr

        search_budget = max(1, opt.max_evals - 1)
        for method in opt.methods:
            if evals >= search_budget:
                break
            evaluate("base", method, [], f"int8/{method}")
        if _dynamic_worth_trying(info, target) and evals < search_budget:
            evaluate("base", "dynamic", [], "int8/dynamic")
        if best is None:  # nothing allowed (cannot happen with static methods); keep the first
            best = candidates[0]
        method = best.method if best.method != "dynamic" else "percentile"

        # SmoothQuant-style scale migration, for models whose LayerNorm outputs feed MatMuls
        if best.search_drop > budget and evals < search_budget and _has_layernorm_matmul(pre):
            t_var = time.perf_counter()
            sm, srep = smooth(pre, calib, info.input_names, alpha=opt.smooth_alpha)
            if srep.matmuls:
                variants["smoothquant"] = (prepare(sm, "smoothquant"), time.perf_counter() - t_var)
                evaluate("smoothquant", method, [], f"int8/{method}+smoothquant")
                if best.variant == "smoothquant":
                    warnings_info = (f"SmoothQuant migrated scales on {srep.tensors} tensor(s): worst channel ratio "
                                     f"{srep.max_ratio_before}x -> {srep.max_ratio_after}x")
                    warnings.append(warnings_info)

        ranking = []
        variant = best.variant
        floats_allowed = target.float_allowed or opt.allow_cpu_fallback
        if best.search_drop > budget and evals < search_budget:
            # Mixed precision. On an INT8-only board float means a CPU placement: those
            # candidates are measured and costed for the table, chosen only if allowed.
            n_s = min(opt.sensitivity_samples, len(search))
            _, feeds = next(search.feeds(n_s, info.input_names))
            ranking = rank_layers(onnx.load(str(variants[variant][0].pre_path)),
                                  onnx.load(str(paths[best.name])), feeds)
            lo, hi = 0, None  # largest k known to miss, smallest k known to meet
            k = 1
            while evals < search_budget and k <= len(ranking):
                floats = [r.name for r in ranking[:k]]
                where = "float" if target.float_allowed else "on CPU"
                c = evaluate(variant, method, floats, f"int8/{method}{'+smoothquant' if variant != 'base' else ''}"
                             f"+{k} {where}")
                if c.search_drop <= budget:
                    hi = k
                else:
                    lo = k
                if hi is None:
                    k = min(k * 2, len(ranking)) if k < len(ranking) else k + 1
                elif hi - lo <= 1:
                    break
                else:
                    k = (lo + hi) // 2
            if not floats_allowed:
                warnings.append(f"{target.name} runs INT8 only: candidates with layers on the CPU are costed in the "
                                "table but not chosen (pass allow_cpu_fallback / --allow-cpu-fallback to accept them)")

        # Of the candidates that meet the budget prefer the fewest float layers; else the best.
        # Candidates larger than the board's OTA budget are chosen only when nothing else is allowed.
        allowed = [c for c in candidates if _allowed(c, target, opt)]
        fits = [c for c in allowed if c.size_bytes <= target.ota_budget_mb * 1e6] or allowed
        meeting = [c for c in fits if c.search_drop <= budget]
        chosen = (min(meeting, key=lambda c: (len(c.float_layers), c.search_drop)) if meeting
                  else min(fits, key=lambda c: (c.search_drop, -c.output_sqnr_db)) if fits else best)
        if not meeting and any(c.search_drop <= budget for c in allowed):
            warnings.append(f"the only candidates within the accuracy budget are larger than {target.name}'s "
                            f"OTA budget ({target.ota_budget_mb:g} MB); the best one that fits was kept")
        chosen_path = paths[chosen.name]

        evals += 1
        pg.start("held-out evaluation", len(holdout))
        final = compare(ref_hold, predict(judge(chosen_path), holdout, batch_size=opt.batch_size,
                                          progress=pg.advance), holdout.labels)
        host_final = compare(ref_hold, predict(host_session(chosen_path), holdout, batch_size=opt.batch_size),
                             holdout.labels)
        pg.done()
        host = host_int8()
        if host.arithmetic != target.int8_arithmetic:
            warnings.append(f"this host ({host.label}) computes INT8 unlike {target.name} "
                            f"({target.int8_arithmetic}): figures are the board's arithmetic; this host's own "
                            f"kernels give {host_final.agreement:.1f} % agreement")
        met = final.drop <= budget
        if not met:
            warnings.append(f"accuracy budget not met: held-out {final.metric} drop {final.drop:.2f} "
                            f"points > {budget:g} allowed")
            if not floats_allowed:
                warnings.append(f"target {target.name} runs INT8 only: no layer may leave the accelerator, "
                                "so the remaining drop needs quantization-aware training (edgepack qat)")

        lat = []
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

        golden = output.with_suffix(".golden.npz")
        _write_golden(golden, chosen_path, info, holdout, opt.golden_samples, judge)
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
            calibration_samples=len(calib), weight_rounding=rounding, variant=chosen.variant,
            npu_eligible=chosen.npu_eligible,
            activation_dtype=target.quant.activation_dtype, per_channel=target.quant.per_channel,
            candidates=candidates,
            sensitive_layers=[{"name": r.name, "op": r.op, "injected_nsr": r.score, "sqnr_db": round(r.sqnr_db, 2)}
                              for r in ranking[:10]],
            float_layers=chosen.float_layers, evaluations=evals, latency=lat, speedup_ok=speed_ok,
            seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=round(_peak_rss_mb(), 1),
            warnings=warnings, numerics=target.int8_arithmetic, host_int8=host.label,
            host_kernel_agreement=round(host_final.agreement, 3),
            latency_source="host" if target.arch == host.machine and target.int8_arithmetic == host.arithmetic
            else "host-proxy")
    except BaseException:
        for p in (output.with_suffix(".golden.npz"),):
            if p.exists() and not output.exists():
                p.unlink()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for tmp in (output.with_name(f".{output.name}.tmp"), output.with_name(f".{output.stem}.golden.npz.tmp.npz")):
            if tmp.exists():
                tmp.unlink()


def _dynamic_worth_trying(info: ModelInfo, target: Target) -> bool:
    """Dynamic quantization only pays where MatMul/Gemm dominate (transformers, MLPs): it keeps
    activations in float, so convolutions stay float and it is slower than FP32 on CNNs
    (8x on EfficientNet-Lite0, see ../shared/ASSETS.md). And only where the board runs float."""
    mm = info.ops.get("MatMul", 0) + info.ops.get("Gemm", 0)
    return target.quant.allow_dynamic and target.float_allowed and mm > info.ops.get("Conv", 0)


def _write_golden(path: Path, model: Path, info: ModelInfo, data: Dataset, n: int, judge) -> None:
    """Golden inputs with the INT8 model's own host outputs (what a healthy board must reproduce)
    and the FP32 outputs (what drift is measured against), for the bundle's health check."""
    n = min(n, len(data))
    _, feed = next(data.feeds(n, info.input_names))
    arrays: dict[str, np.ndarray] = {}
    if len(feed) == 1:
        arrays["inputs"] = next(iter(feed.values()))
    else:
        arrays.update({f"inputs_{k}": v for k, v in feed.items()})
    arrays["outputs"] = judge(model).run(None, feed)[0]  # as the board computes, not this host
    arrays["fp32_outputs"] = session(info.path).run(None, feed)[0]
    if data.labels is not None:
        arrays["labels"] = data.labels[:n]
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _allowed(c: CandidateResult, target: Target, opt: QuantizeOptions) -> bool:
    """May this candidate be chosen for the board? Float layers need a float unit or consent."""
    if c.method == "dynamic" and not target.quant.allow_dynamic:
        return False
    return not c.float_layers or target.float_allowed or opt.allow_cpu_fallback


def _has_layernorm_matmul(m: onnx.ModelProto) -> bool:
    ln = {n.output[0] for n in m.graph.node if n.op_type == "LayerNormalization"}
    return any(n.op_type == "MatMul" and n.input[0] in ln for n in m.graph.node)


def _advanced_rounding(model: onnx.ModelProto, calib: Dataset, info: ModelInfo, work: Path, pg: Progress,
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
