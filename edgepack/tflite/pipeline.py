"""``edgepack quantize --format tflite``: a full-integer INT8 ``.tflite`` for a LiteRT board.

The steps, each measured:

1. the FP32 model becomes a float ``.tflite`` (an ONNX model through :mod:`.from_onnx`; a float
   ``.tflite`` is taken as it is) and its float outputs are checked against the source's;
2. LiteRT's quantizer (:mod:`.convert`, a subprocess tool) makes full-integer candidates, one per
   calibration rule (its min/max and moving average; percentile and MSE ranges re-gridded by
   :mod:`.ranges`; edgepack's ONNX search carried over, :mod:`.transplant`), each judged on the selection split in LiteRT with XNNPACK, whose int8 kernels
   are exact (int32 accumulation), so the host's figure is the board's;
   with ``finetune_steps``, the carried-over QDQ model is also fine-tuned on its own INT8 grid
   (weights and activation scales, distilled from the FP32 model on the calibration samples:
   :mod:`edgepack.quantize.qat_grid`) and carried over as one more candidate;
3. if the best one still misses the budget and the target allows float, the tensors written by
   the ops that lose the most signal (per-op SQNR on a few selection samples) are kept in float
   with their producer and readers (:mod:`.floatacts`: keeping one op float still quantizes its
   output), in growing sets from one quantizer calibration, each judged in LiteRT;
   the choice is the ONNX search's rule (:mod:`edgepack.quantize.selection`): the fewest float ops
   among the candidates that meet the budget by its margin, else the most accurate (output SQNR
   first on a label-free floor);
4. the full-integer gate (:mod:`.gate`) refuses float ops where the target runs INT8 only;
5. final figures on held-out data never used for selection; size; latency against the float
   ``.tflite`` at each thread count (interleaved medians); golden data for the board's health check.

Nothing is written to ``output`` unless every step passed; the report always says whether the
budget was met.
"""
from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Dataset
from ..errors import DataError, ModelError, TargetError
from ..quantize import selection
from ..quantize.evaluate import compare


@dataclass(frozen=True, kw_only=True)
class TfliteOptions:
    max_drop: float | None = None            # points; None: the target's budget
    calibrations: tuple[str, ...] = ("minmax", "moving-average", "percentile", "mse")  # see CALIBRATION_RULES
    calib_size: int | None = None
    max_evals: int = 12                      # candidates judged on the selection split
    float_steps: tuple[int, ...] = (1, 2, 4, 8)  # islands kept float per step of the float search
    max_float_bytes: int = 250_000           # what float islands may add over INT8 in all (a quarter MB)
    latency_threads: tuple[int, ...] = (1, 2)
    latency_rounds: int = 5
    sensitivity_samples: int = 4
    golden_samples: int = 16
    seed: int = 0
    onnx_search: bool = True                 # also run edgepack's ONNX search and carry its result over
    qdq_model: str | None = None             # ...or carry over this edgepack INT8 QDQ model of the source
    full_integer: bool = False               # no float op even where the target could run one
    selection_margin: float = 1.0            # as QuantizeOptions: standard errors a label-free candidate clears the floor by
    finetune_steps: int = 0                  # > 0: also fine-tune the carried-over INT8 model on its own grid
    #                                          (edgepack.quantize.qat_grid, needs torch) and judge that too


@dataclass
class TfliteCandidate:
    name: str
    calibration: str
    float_ops: list[str]
    search_drop: float
    search_agreement: float
    size_bytes: int
    seconds: float
    output_sqnr_db: float = 0.0              # on the selection split (the ONNX search's rule: .quantize.selection)
    search_se: float = 0.0                   # standard error of search_drop on the split, points


@dataclass
class TfliteQuantizeReport:
    target: str
    source: str
    output: str
    format: str
    metric: str
    budget_points: float
    budget_met: bool
    full_integer: bool
    float_ops: list[str]
    calibration: str
    fp32_size_bytes: int
    int8_size_bytes: int
    float_tflite_agreement: float            # float .tflite against the source, held-out, percent
    agreement: float                         # INT8 .tflite against the FP32 source, held-out
    drop_points: float
    fp32_top1: float | None
    int8_top1: float | None
    output_sqnr_db: float
    holdout_samples: int
    calibration_samples: int
    numerics: str
    quantizer: str
    bias_fixes: int
    io: dict[str, Any]
    latency: list[dict[str, Any]]
    candidates: list[TfliteCandidate]
    seconds: float
    peak_rss_mb: float
    warnings: list[str] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        return self.fp32_size_bytes / max(self.int8_size_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size_ratio"] = round(self.size_ratio, 3)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float)


# LiteRT's quantizer's own calibration, or its min/max model re-gridded by edgepack (.ranges)
CALIBRATION_RULES = {"minmax": ("minmax", None), "moving-average": ("moving-average", None),
                     "percentile": ("minmax", "percentile"), "mse": ("minmax", "mse")}


def litert_capable(target) -> bool:
    return "litert" in target.runtimes


def _reference(model: Path, data: Dataset) -> np.ndarray:
    if model.suffix.lower() == ".tflite":
        from .run import predict_tflite
        return predict_tflite(model, data)
    from ..quantize.evaluate import predict, session
    return predict(session(model), data)


def _op_sensitivity(float_tfl: Path, int8_tfl: Path, data: Dataset, n: int) -> list[tuple[str, float]]:
    """(op output tensor, SQNR lost across the op in dB), worst first, from LiteRT's builtin kernels
    with every intermediate kept: the loss an op adds is its output's SQNR against the float model
    minus the worst SQNR among its activation inputs."""
    from ai_edge_litert import interpreter as tfl

    from .inspect import read_tflite
    from .run import TfliteRunner

    def tensors(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
        it = tfl.Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                             experimental_op_resolver_type=tfl.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        it.allocate_tensors()
        r = TfliteRunner(path, xnnpack=False)
        it.set_tensor(it.get_input_details()[0]["index"], r.prepare(x))
        it.invoke()
        out = {}
        for t in it.get_tensor_details():
            try:
                a = it.get_tensor(t["index"])
            except ValueError:
                continue
            if np.dtype(t["dtype"]).kind in "iu":
                s, z = t["quantization"]
                if not s:
                    continue
                a = (a.astype(np.float32) - z) * s
            out[t["name"]] = np.asarray(a, np.float64)
        return out

    info = read_tflite(int8_tfl)
    sig = np.zeros(len(info.tensors))
    err = np.zeros(len(info.tensors))
    byname = {t.name: t.index for t in info.tensors}
    for i in range(min(n, len(data))):
        s = data.loader(i)
        s = next(iter(s.values())) if isinstance(s, dict) else s
        f, q = tensors(float_tfl, s), tensors(int8_tfl, s)
        for name, a in f.items():
            if name in q and name in byname and q[name].shape == a.shape:
                sig[byname[name]] += float((a ** 2).sum())
                err[byname[name]] += float(((a - q[name]) ** 2).sum())
    sqnr = 10 * np.log10(np.maximum(sig, 1e-30) / np.maximum(err, 1e-30))
    measured = err > 0
    losses = []
    for o in info.ops:
        if not o.outputs or not measured[o.outputs[0]]:
            continue
        ins = [sqnr[x] for x in o.inputs if x >= 0 and not info.tensors[x].constant and measured[x]]
        losses.append((info.tensors[o.outputs[0]].name, float((min(ins) if ins else 60.0) - sqnr[o.outputs[0]])))
    return sorted(losses, key=lambda t: -t[1])


def quantize_tflite(model: str | Path, target, calib: Dataset, evaluation: Dataset, output: str | Path, *,
                    search: Dataset | None = None, options: TfliteOptions | None = None,
                    log=lambda m: None) -> TfliteQuantizeReport:
    """Quantize ``model`` (FP32 ONNX or float .tflite) to a full-integer ``.tflite`` for ``target``."""
    from ..quantize.pipeline import split_eval
    from .convert import quantize_variants
    from .floatacts import islands, within_cost
    from .from_onnx import onnx_to_float_tflite
    from .gate import check_full_integer, float_findings
    from .inspect import read_tflite
    from .ranges import activation_samples, choose_ranges, regrid
    from .run import calibration_array, interleaved_any, predict_tflite
    from .transplant import float_layer_tensors, transplant

    o = options or TfliteOptions()
    t0 = time.perf_counter()
    model, output = Path(model), Path(output)
    if not litert_capable(target):
        raise TargetError(f"target {target.name} runs {', '.join(target.runtimes)}, not LiteRT: a .tflite cannot "
                          "run there (drop --format tflite, or pick a target whose runtimes include litert)")
    if output.suffix.lower() != ".tflite":
        raise ModelError(f"output {output} must end in .tflite with --format tflite")
    if o.finetune_steps < 0:
        raise DataError(f"--finetune takes a number of steps >= 0, got {o.finetune_steps}")
    if o.finetune_steps and (model.suffix.lower() == ".tflite" or not (o.qdq_model or o.onnx_search)):
        raise ModelError("--finetune fine-tunes edgepack's INT8 ONNX model of the source: give the FP32 .onnx "
                         "(not a .tflite) and keep the ONNX search or --carry-over")
    from .convert import converter_python
    converter_python()  # a missing converter is said before any work
    if len(calib) == 0 or len(evaluation) == 0:
        raise DataError("calibration and evaluation data must not be empty")
    budget = target.max_top1_drop if o.max_drop is None else float(o.max_drop)
    if search is None:
        search, hold = split_eval(evaluation, o.seed)
    else:
        hold = evaluation
    cal = calib.subset(np.arange(min(len(calib), o.calib_size or len(calib))))
    warnings: list[str] = []
    allow_float = target.float_allowed and not o.full_integer
    with tempfile.TemporaryDirectory(prefix="edgepack-tflite-") as td:
        work = Path(td)
        if model.suffix.lower() == ".tflite":
            src = read_tflite(model)
            if not src.float_tensors:
                raise ModelError(f"{model} is already integer; pass the float model")
            float_tfl = model
        else:
            log("translating the FP32 ONNX model to a float .tflite")
            float_tfl = onnx_to_float_tflite(model, work / "float.tflite")
        finfo = read_tflite(float_tfl)
        in_shape = tuple(finfo.inputs[0].shape[1:])
        log("reference outputs")
        ref_s, ref_h = _reference(model, search), _reference(model, hold)
        if model.suffix.lower() != ".tflite":
            fl = compare(ref_h, predict_tflite(float_tfl, hold), hold.labels)
            if fl.agreement < 99.0:
                warnings.append(f"the float .tflite agrees with the ONNX model on only {fl.agreement:.1f} % of "
                                "held-out samples: the translation is not faithful for this model")
            float_agree = fl.agreement
        else:
            float_agree = 100.0
        try:
            x = calibration_array(cal, in_shape)
        except ValueError as e:
            raise DataError(f"calibration samples do not fit the model input {in_shape}: {e}") from None
        cands: list[TfliteCandidate] = []
        files: dict[str, Path] = {}
        runs: dict[str, Any] = {}

        qdq, carry_src = None, (model, float_tfl)
        if model.suffix.lower() == ".onnx" and (o.qdq_model or o.onnx_search):
            qdq = Path(o.qdq_model) if o.qdq_model else _onnx_search(
                model, target if allow_float else target.integer_only(), cal, search, hold, work, budget, log)
            qdq_float = _qdq_float_layers(qdq)
            # a QDQ model of split activations (edgepack.quantize.actsplit) is carried into the
            # .tflite of the same split network: translated again, same float function
            carry_src = _split_source(model, qdq, work, log) or (model, float_tfl)
            # a float layer of the ONNX model reads and writes float there: in a .tflite, its island,
            # float weights included, so within the same float-bytes cap as the islands found here
            qdq_keep = list(islands(finfo, within_cost(finfo, float_layer_tensors(model, qdq_float), o.max_float_bytes))
                            ) if allow_float else []
        qdq_ft = _finetune(model, qdq, cal, work, o.finetune_steps, log) if qdq is not None and o.finetune_steps else None
        carried: dict[str, Path] = {}            # candidate name -> the QDQ model carried into it

        samples: dict = {}
        raw: dict[tuple[Path, str, tuple[str, ...]], tuple[Path, Any]] = {}

        def attempt_many(calibration: str, keeps: list[list[str]], carry: Path | None = None, note: str = ""
                         ) -> list[TfliteCandidate]:
            """One quantizer calibration, one candidate per float set in ``keeps``, each judged in LiteRT;
            ``carry``: the QDQ model whose grids each candidate takes over."""
            qcal, rule = CALIBRATION_RULES[calibration]
            paths = [work / f"cand{len(cands) + i}.tflite" for i in range(len(keeps))]
            t = time.perf_counter()
            log(f"candidates {calibration}{' (carried over)' if carry is not None else ''}: {len(keeps)}")
            src_onnx, src_tfl = carry_src if carry is not None else (model, float_tfl)
            todo = [tuple(k) for k in dict.fromkeys(map(tuple, keeps)) if (src_tfl, qcal, tuple(k)) not in raw]
            if todo:  # the quantizer's own output, kept: other rules re-grid or carry over from it
                outs = [work / f"raw{len(raw) + i}.tflite" for i in range(len(todo))]
                for k, pth, run in zip(todo, outs, quantize_variants(src_tfl, x, list(zip(outs, todo)),
                                                                     calibration=qcal, threads=2)):
                    raw[(src_tfl, qcal, k)] = (pth, run)
            rs = []
            for pth, k in zip(paths, keeps):
                shutil.copyfile(raw[(src_tfl, qcal, tuple(k))][0], pth)
                rs.append(raw[(src_tfl, qcal, tuple(k))][1])
            if rule and not samples:
                samples.update(activation_samples(float_tfl, x))
            out = []
            for path, keep, run in zip(paths, keeps, rs):
                if carry is not None:
                    tr = transplant(path, src_onnx, carry, path, float_tflite=src_tfl)
                    lost = [k for k in tr.kept if "float in the ONNX model" not in k]
                    if lost:
                        warnings.append(f"carried over from the ONNX model except: {'; '.join(lost[:4])}")
                elif rule:
                    regrid(path, float_tfl, choose_ranges(samples, rule), path)
                name = ("edgepack ONNX search, carried over" if carry is not None else calibration) + (
                    f" + {len(keep)} float op(s)" if keep else "") + note
                try:
                    c = compare(ref_s, predict_tflite(path, search), search.labels)
                except (RuntimeError, ValueError) as e:  # LiteRT refused this candidate: say so, judge the rest
                    warnings.append(f"candidate {name} does not run in LiteRT: {str(e).splitlines()[0][:200]}")
                    continue
                cand = TfliteCandidate(name=name, calibration=calibration, float_ops=list(keep),
                                       search_drop=round(c.drop, 3), search_agreement=round(c.agreement, 2),
                                       size_bytes=path.stat().st_size,
                                       seconds=round((time.perf_counter() - t) / len(keeps), 1),
                                       output_sqnr_db=round(c.output_sqnr_db, 2), search_se=round(c.drop_se, 3))
                cands.append(cand)
                files[name], runs[name] = path, run
                if carry is not None:
                    carried[name] = carry
                out.append(cand)
            return out

        for cm in o.calibrations[:o.max_evals]:
            if cm not in CALIBRATION_RULES:
                raise ModelError(f"unknown calibration {cm!r}; choose from {', '.join(CALIBRATION_RULES)}")
            attempt_many(cm, [[]])
        if qdq is not None:
            keeps = [[]] + ([qdq_keep] if qdq_keep else [])
            attempt_many("minmax", keeps, carry=qdq, note=" (its float layers quantized)" if qdq_float else "")
        if qdq_ft is not None:
            attempt_many("minmax", [[]], carry=qdq_ft, note=f", fine-tuned on its grid ({o.finetune_steps} steps)")
        labelled = search.labels is not None
        meets = lambda c: selection.meets(c, budget, labelled=labelled, margin=o.selection_margin)  # noqa: E731
        rank = lambda c: (*selection.accuracy_rank(c, labelled=labelled), c.size_bytes)  # noqa: E731
        best = min(cands, key=rank)
        if not meets(best) and allow_float and len(cands) < o.max_evals:
            log("ranking ops by the signal they lose")
            ranked = [n for n, _ in _op_sensitivity(float_tfl, files[best.name], search, o.sensitivity_samples)
                      if n not in best.float_ops]
            # one cap for all float weights: the ops the best candidate already keeps float count;
            # they stay as they are (an island's outputs are not islanded again)
            ranked = within_cost(finfo, ranked, o.max_float_bytes, already=tuple(best.float_ops))
            steps = [k for k in o.float_steps if k <= len(ranked)][:o.max_evals - len(cands)]
            keeps = [list(dict.fromkeys([*best.float_ops, *islands(finfo, ranked[:k])])) for k in steps]
            if keeps:
                attempt_many(best.calibration, keeps, carry=carried.get(best.name))
        # the ONNX search's rule: the fewest float ops among those that meet the budget by the
        # margin (the most accurate of them), else the most accurate candidate
        fits, met, oversize = selection.meeting_within_ota(cands, target, meets)
        if oversize:
            warnings.append(oversize)
        best = min(met, key=lambda c: (len(c.float_ops), *rank(c))) if met else min(
            fits, key=lambda c: (*rank(c), len(c.float_ops)))
        chosen = files[best.name]
        info = read_tflite(chosen)
        check_full_integer(info, target, required=o.full_integer)  # INT8-only board: refuse, nothing written
        log("held-out evaluation")
        q = predict_tflite(chosen, hold)
        fin = compare(ref_h, q, hold.labels)
        met = fin.drop <= budget
        lat = []
        sample = hold.loader(0)
        sample = next(iter(sample.values())) if isinstance(sample, dict) else sample
        for th in o.latency_threads:
            st = interleaved_any({"float": float_tfl, "int8": chosen}, sample, threads=th, rounds=o.latency_rounds)
            lat.append({"threads": th, "float_ms": round(st["float"].median_ms, 3), "int8_ms": round(st["int8"].median_ms, 3),
                        "ratio": round(st["int8"].median_ms / st["float"].median_ms, 3), "runs": st["int8"].runs})
            if st["int8"].median_ms >= st["float"].median_ms:
                warnings.append(f"INT8 is not faster than float in LiteRT at {th} thread(s) on this host")
        if not met:
            warnings.append(f"accuracy budget missed: {fin.metric} drop {fin.drop:.2f} > {budget:g} points")
        golden = _golden(chosen, hold, o.golden_samples)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp")
        shutil.copyfile(chosen, tmp)
        np.savez(output.with_suffix(".golden.npz"), **golden)
        tmp.replace(output)
    run = runs[best.name]
    return TfliteQuantizeReport(
        target=target.name, source=str(model), output=str(output), format="tflite", metric=fin.metric,
        budget_points=budget, budget_met=met, full_integer=info.full_integer,
        float_ops=float_findings(info), calibration=best.calibration,
        fp32_size_bytes=model.stat().st_size, int8_size_bytes=output.stat().st_size,
        float_tflite_agreement=round(float_agree, 2), agreement=round(fin.agreement, 2), drop_points=round(fin.drop, 3),
        fp32_top1=fin.fp32_top1, int8_top1=fin.int8_top1, output_sqnr_db=round(fin.output_sqnr_db, 2),
        holdout_samples=len(hold), calibration_samples=len(cal),
        numerics="exact (LiteRT XNNPACK int8: int32 accumulation, as on the board)",
        quantizer=run.quantizer, bias_fixes=run.bias_fixes,
        io={"input": asdict(info.inputs[0]), "output": asdict(info.outputs[0])}, latency=lat, candidates=cands,
        seconds=round(time.perf_counter() - t0, 1),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), warnings=warnings)


def _onnx_search(model: Path, target, cal: Dataset, search: Dataset, hold: Dataset, work: Path, budget: float,
                 log) -> Path:
    """edgepack's ONNX quantization search (edgepack.quantize) on the same data: its QDQ model."""
    from ..quantize.pipeline import QuantizeOptions, quantize

    log("edgepack ONNX search (calibration rules, GPTQ rounding, float layers; exact int8 arithmetic)")
    out = work / "edgepack-int8.onnx"
    quantize(model, target, cal, hold, out, search=search,
             options=QuantizeOptions(max_drop=budget, latency_threads=(1,), golden_samples=1))
    return out


def _finetune(model: Path, qdq: Path, cal: Dataset, work: Path, steps: int, log) -> Path:
    """The QDQ model fine-tuned on its own INT8 grid (weights and activation scales, distilled
    from ``model`` on the calibration samples; :mod:`edgepack.quantize.qat_grid`'s defaults are
    the recipe measured best on EfficientNet-Lite0). Same graph (each learned grid a scale of its
    own); its metadata (a split network, float layers) stays, so it is carried over like the
    model it came from."""
    from ..quantize.qat_grid import GridQatOptions, finetune_on_grid, write_back

    log(f"fine-tuning the INT8 model on its grid ({steps} steps on {len(cal)} calibration samples)")
    mod, _ = finetune_on_grid(qdq, model, cal, options=GridQatOptions(steps=steps), progress=log)
    return write_back(mod, work / "edgepack-int8-finetuned.onnx")


def _split_source(model: Path, qdq: Path, work: Path, log) -> tuple[Path, Path] | None:
    """The split FP32 network (ONNX, float .tflite) a QDQ model of split activations was made
    from, per its ``edgepack.split_activations`` metadata ("t1,t2 xK"); None when it has none."""
    import onnx

    from ..quantize.actsplit import split_activations
    from .from_onnx import fold_for_tflite, onnx_to_float_tflite

    meta = {p.key: p.value for p in onnx.load(str(qdq), load_external_data=False).metadata_props}
    spec = meta.get("edgepack.split_activations", "")
    if not spec:
        return None
    names, _, k = spec.rpartition(" x")
    if not names or not k.isdigit():
        raise ModelError(f"{qdq.name}: unreadable edgepack.split_activations metadata {spec[:80]!r}")
    log(f"the ONNX model splits {len(names.split(','))} activation(s) into {k} pieces: translating that network")
    folded = fold_for_tflite(model, work / "split-folded.onnx")
    m, _ = split_activations(onnx.load(str(folded)), names.split(","), pieces=int(k))
    onnx.save(m, str(work / "split.onnx"))
    return work / "split.onnx", onnx_to_float_tflite(work / "split.onnx", work / "split-float.tflite")


def _qdq_float_layers(qdq: Path) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes of a QDQ model whose weights are float (no DequantizeLinear)."""
    import onnx

    m = onnx.load(str(qdq), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [n.name for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1
            and n.input[1] in inits]


def _golden(model: Path, data: Dataset, n: int) -> dict[str, np.ndarray]:
    """Held-out inputs as the board feeds them (the model's own dtype and layout) and this
    model's own outputs: LiteRT's int8 kernels are exact, so the board reproduces them."""
    from .run import TfliteRunner

    r = TfliteRunner(model)
    xs, ys = [], []
    for i in range(min(n, len(data))):
        s = data.loader(i)
        s = next(iter(s.values())) if isinstance(s, dict) else s
        x = r.prepare(s)
        r.it.set_tensor(r.inp["index"], x)
        r.it.invoke()
        xs.append(x)
        ys.append(r.it.get_tensor(r.out["index"]).copy())
    return {"inputs": np.stack(xs), "outputs": np.stack(ys)}


__all__ = ["quantize_tflite", "TfliteOptions", "TfliteQuantizeReport", "TfliteCandidate", "litert_capable"]
