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

from .calibrate import METHODS
from ..data import Dataset
from ..errors import BudgetNotMet, DataError, ModelError
from .evaluate import Comparison, compare, predict, session
from .latency import compare_latency
from ..modelinfo import ModelInfo, check_same_dtypes, check_samples, load_model
from .numerics import host_int8, host_session, unfused_session
from .qdq import preprocess_model
from .remedies import CandidateResult, Search, run as run_remedies
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
    reference: str | Path | None = None    # the FP32 model the budget is measured against (default: the model
    #                                        itself; QAT passes the user's original, not its fine-tuned export)
    methods: tuple[str, ...] = METHODS
    calib_size: int | None = None          # None: every calibration sample
    weight_rounding: str = "gptq"          # "gptq" (advanced PTQ) or "nearest"
    max_evals: int = 10                    # full evaluations, the final held-out one included (+ the baselines)
    plain_baselines: bool = True           # also judge plain ORT per-tensor and per-channel INT8 (2 more)
    latency_threads: tuple[int, ...] = (1, 2)
    require_speedup: bool = False          # refuse (BudgetNotMet) when INT8 is not faster
    batch_size: int = 16
    sensitivity_samples: int = 16
    smooth_alpha: float = 0.5
    allow_cpu_fallback: bool = False       # INT8-only boards: accept layers placed on the CPU
    seed: int = 0
    golden_samples: int = 16               # held-out samples carried in the bundle for the health check
    max_float_activations: int = 64        # most activations the float-activations remedy ranks (0: off)
    float_activations_start: int = 4       # its first candidate keeps this many float; then doubles
    float_activations_early: float = 0.25  # then the earliest quarter of the rest float too (0: off)
    activation_rank_samples: int = 8       # search samples the activation ranking runs on
    selection_margin: float = 1.0          # standard errors a label-free candidate must clear the floor by
    split_activations: int = 1             # INT8-only boards: most sensitive ReLU6 outputs split (0: off)
    split_pieces: tuple[int, ...] = (2, 4)  # one candidate per piece count


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
    split_activations: list[str] = field(default_factory=list)  # ReLU6 outputs split into pieces (actsplit)
    split_pieces: int = 0
    unfused_agreement: float | None = None  # the held-out agreement of the QDQ graph run unfused (exact products,
    #                                         float requantization: the first approximation, ~1 point optimistic)
    latency_source: str = "host"            # "host-proxy" when the target is not this kind of CPU
    board_confirmation: dict | None = None  # edgepack.fleet.confirm: the board's own figure (--confirm-on)
    remedies_tried: list[str] = field(default_factory=list)   # edgepack.quantize.remedies, in the order run
    float_activations: list[str] = field(default_factory=list)  # activations kept float (weights INT8)
    budget_basis: str = ""                  # which budget applied and why (Target.accuracy_budget)
    labelled_top1: dict | None = None       # top-1 on a separate labelled set (``top1_data``), FP32 and INT8

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
             options: QuantizeOptions | None = None, progress: Progress | None = None,
             top1_data: Dataset | None = None) -> QuantizeReport:
    """Quantize ``model_path`` for ``target`` and write the INT8 model to ``output``.

    ``evaluation`` gives the final figures; ranking and selection use ``search`` or, without one,
    half of ``evaluation`` (the other half is held out). The accuracy budget is the target's
    (:meth:`Target.accuracy_budget`: top-1 drop with labels, the agreement floor without) unless
    ``options.max_drop`` is given. ``top1_data``, a labelled set, only adds FP32 and INT8 top-1 to
    the report (never selection, never the budget). Nothing is written to ``output`` unless the
    whole run succeeds.
    """
    opt = options or QuantizeOptions()
    pg = progress or _NoProgress()
    t0 = time.perf_counter()
    output = _check_output(output)
    info, calib, search, holdout = _check_inputs(model_path, calib, evaluation, search, opt)
    if top1_data is not None:
        if top1_data.labels is None or len(top1_data) == 0:
            raise DataError(f"top-1 set {top1_data.name!r} needs labelled samples (class subfolders or labels.csv)")
        check_samples(info, top1_data, "top-1")
    reference = _reference(info, opt.reference)   # checked before any work, like the data
    work = Path(tempfile.mkdtemp(prefix="edgepack-q-"))
    try:
        pre = preprocess_model(info, work)
        fp32 = session(reference)
        pg.start("FP32 reference", len(search) + len(holdout))
        ref_search = predict(fp32, search, batch_size=opt.batch_size, progress=pg.advance)
        ref_hold = predict(fp32, holdout, batch_size=opt.batch_size, progress=pg.advance)
        pg.done()
        del fp32
        budget, basis = target.accuracy_budget(holdout.labels is not None, opt.max_drop)
        s = Search(info=info, target=target, opt=opt, budget=budget, calib=calib,
                   data=search, ref=ref_search, work=work, pg=pg, sample=holdout.loader(0))
        s.prepare(pre, "base")
        run_remedies(s)
        chosen = s.choose()
        s.evals += 1   # the held-out figure
        final, host_final, unfused = _held_out(s, s.paths[chosen.name], holdout, ref_hold)
        lat, speed_ok = _latency(info, s.paths[chosen.name], s.sample, opt, pg, s.warnings)
        top1 = _labelled_top1(s, info, s.paths[chosen.name], top1_data) if top1_data is not None else None
        _write_output(output, s, chosen, holdout)
        r = _report(s, chosen, output, final, host_final, lat, speed_ok, t0)
        r.unfused_agreement = round(unfused.agreement, 3)   # beside the board's figure, never chosen on
        r.budget_basis, r.labelled_top1 = basis, top1
        return r
    except BaseException:
        golden = output.with_suffix(".golden.npz")
        if golden.exists() and not output.exists():
            golden.unlink()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for tmp in (output.with_name(f".{output.name}.tmp"), output.with_name(f".{output.stem}.golden.npz.tmp.npz")):
            if tmp.exists():
                tmp.unlink()


def _check_output(output: str | Path) -> Path:
    output = Path(output)
    if output.suffix != ".onnx":
        raise DataError(f"output {output} must end in .onnx")
    if not output.parent.exists():
        raise DataError(f"output folder {output.parent} does not exist")
    return output


def _reference(info: ModelInfo, reference: str | Path | None) -> Path:
    """The model whose outputs every candidate is compared with; it must take the same inputs."""
    if reference is None:
        return info.path
    ref = load_model(reference)
    if ref.input_names != info.input_names:
        raise ModelError(f"reference model {ref.path} takes inputs {ref.input_names}, the model to quantize "
                         f"{info.input_names}: give the FP32 model this one was fine-tuned from")
    return ref.path


def _check_inputs(model_path: str | Path, calib: Dataset, evaluation: Dataset, search: Dataset | None,
                  opt: QuantizeOptions) -> tuple[ModelInfo, Dataset, Dataset, Dataset]:
    """The model and the three splits, checked before any work: (info, calib, search, holdout)."""
    info = load_model(model_path)
    if opt.calib_size is not None:
        if opt.calib_size <= 0:
            raise DataError("calibration size must be positive")
        calib = calib.subset(np.arange(min(opt.calib_size, len(calib))), calib.name)
    if len(calib) == 0:
        raise DataError("calibration set is empty")
    dtypes = {}
    for ds, what in ((calib, "calibration"), (evaluation, "evaluation"), (search, "search")):
        if ds is not None:
            if len(ds) == 0:
                raise DataError(f"{what} set is empty")
            dtypes[what] = check_samples(info, ds, what)
    check_same_dtypes(dtypes)
    if search is None:
        search, holdout = split_eval(evaluation, opt.seed)
    else:
        holdout = evaluation
    return info, calib, search, holdout


def _held_out(s: Search, path: Path, holdout: Dataset,
              ref_hold: np.ndarray) -> tuple[Comparison, Comparison, Comparison]:
    """The final figure as the board computes, and beside it this host's own kernels' figure and
    the unfused QDQ graph's."""
    bs = s.opt.batch_size
    s.pg.start("held-out evaluation", len(holdout))
    final = compare(ref_hold, predict(s.judge(path), holdout, batch_size=bs, progress=s.pg.advance), holdout.labels)
    host_final = compare(ref_hold, predict(host_session(path), holdout, batch_size=bs), holdout.labels)
    unfused = compare(ref_hold, predict(unfused_session(path), holdout, batch_size=bs), holdout.labels)
    s.pg.done()
    host = host_int8()
    if host.arithmetic != s.target.int8_arithmetic:
        s.warnings.append(f"this host ({host.label}) computes INT8 unlike {s.target.name} "
                          f"({s.target.int8_arithmetic}): figures are the board's arithmetic; this host's own "
                          f"kernels give {host_final.agreement:.1f} % agreement; its latency is a host proxy, "
                          f"not {s.target.name}'s")
    elif s.target.arch != host.machine:
        s.warnings.append(f"latency was measured on this {host.machine} host: a host proxy, not {s.target.name}'s "
                          f"({s.target.arch}) figure")
    if final.drop > s.budget:
        got = (f"{final.metric} drop {final.drop:.2f} points > {s.budget:g} allowed" if final.fp32_top1 is not None
               else f"agreement {final.agreement:.2f} % < {100 - s.budget:g} % required")
        s.warnings.append(f"accuracy budget not met: held-out {got}")
        if not (s.target.float_allowed or s.opt.allow_cpu_fallback):
            s.warnings.append(f"target {s.target.name} runs INT8 only: no layer may leave the accelerator, "
                              "so the remaining drop needs quantization-aware training (edgepack qat)")
    return final, host_final, unfused


def _labelled_top1(s: Search, info: ModelInfo, path: Path, data: Dataset) -> dict:
    """FP32 and INT8 (the board's arithmetic) top-1 on a labelled set, for the report only."""
    bs = s.opt.batch_size
    c = compare(predict(session(info.path), data, batch_size=bs), predict(s.judge(path), data, batch_size=bs),
                data.labels)
    return {"name": data.name, "n": c.n, "fp32_top1": round(c.fp32_top1, 3), "int8_top1": round(c.int8_top1, 3),
            "drop_points": round(c.drop, 3), "agreement": round(c.agreement, 3), "mcnemar_p": c.mcnemar_p}


def _latency(info: ModelInfo, path: Path, sample, opt: QuantizeOptions, pg: Progress,
             warnings: list[str]) -> tuple[list[LatencyRow], bool]:
    """FP32 vs INT8 on this CPU per thread count; BudgetNotMet with ``require_speedup``."""
    lat = []
    pg.start("latency FP32 vs INT8", len(opt.latency_threads))
    for th in opt.latency_threads:
        a, b = compare_latency(info.path, path, sample, threads=th)
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
    return lat, speed_ok


def _write_output(output: Path, s: Search, chosen: CandidateResult, holdout: Dataset) -> None:
    """Golden data, then the model with its provenance metadata, each written atomically."""
    path = s.paths[chosen.name]
    _write_golden(output.with_suffix(".golden.npz"), path, s.info, holdout, s.opt.golden_samples, s.judge)
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.copyfile(path, tmp)
    m = onnx.load(str(tmp))
    split = s.splits.get(chosen.variant)
    for k, v in (("edgepack.quantized_for", s.target.name), ("edgepack.calibration", chosen.method),
                 ("edgepack.float_layers", ",".join(chosen.float_layers)),
                 ("edgepack.float_activations", ",".join(chosen.float_activations)),
                 ("edgepack.split_activations", f"{','.join(split.tensors)} x{split.pieces}" if split else "")):
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(tmp))
    os.replace(tmp, output)


def _report(s: Search, chosen: CandidateResult, output: Path, final: Comparison, host_final: Comparison,
            lat: list[LatencyRow], speed_ok: bool, t0: float) -> QuantizeReport:
    host, target = host_int8(), s.target
    return QuantizeReport(
        model=str(s.info.path), output=str(output), target=target.name, metric=final.metric,
        budget_points=s.budget, budget_met=final.drop <= s.budget, fp32_size_bytes=s.info.size_bytes,
        int8_size_bytes=output.stat().st_size, fp32_top1=final.fp32_top1, int8_top1=final.int8_top1,
        drop_points=round(final.drop, 3), agreement=round(final.agreement, 3),
        output_sqnr_db=round(final.output_sqnr_db, 2), mcnemar_p=final.mcnemar_p,
        holdout_samples=final.n, search_samples=len(s.data), calibration_method=chosen.method,
        calibration_samples=len(s.calib), variant=chosen.variant,
        weight_rounding="nearest" if chosen.variant.startswith("plain") else s.opt.weight_rounding,
        npu_eligible=chosen.npu_eligible,
        activation_dtype=target.quant.activation_dtype, per_channel=s.variants[chosen.variant][0].per_channel,
        candidates=s.candidates,
        sensitive_layers=[{"name": r.name, "op": r.op, "injected_nsr": r.score, "sqnr_db": round(r.sqnr_db, 2)}
                          for r in s.ranking[:10]],
        float_layers=chosen.float_layers, evaluations=s.evals, latency=lat, speedup_ok=speed_ok,
        seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=round(_peak_rss_mb(), 1),
        warnings=s.warnings, numerics=target.int8_arithmetic, host_int8=host.label,
        host_kernel_agreement=round(host_final.agreement, 3),
        latency_source="host" if target.arch == host.machine and target.int8_arithmetic == host.arithmetic
        else "host-proxy",
        remedies_tried=list(s.tried), float_activations=list(chosen.float_activations),
        split_activations=list(s.splits[chosen.variant].tensors) if chosen.variant in s.splits else [],
        split_pieces=s.splits[chosen.variant].pieces if chosen.variant in s.splits else 0)


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
