"""`edgepack quantize`, `targets`, `analyze`, `qat`: thin shells over edgepack.quantize / analyze / workflows."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._common import JSON_OPT, RichProgress, dump, err, finish, out, output_path, run_guarded


def render_report(r, console: Console) -> None:
    from ..quantize.pipeline import QuantizeReport

    assert isinstance(r, QuantizeReport)
    t = Table(title=f"edgepack quantize -> {r.target}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    mb = lambda b: f"{b / 1e6:.2f} MB"  # noqa: E731
    t.add_row("size", f"{mb(r.fp32_size_bytes)} -> {mb(r.int8_size_bytes)} ({r.size_ratio:.2f}x smaller)")
    if r.fp32_top1 is not None:
        t.add_row("top-1 FP32 / INT8", f"{r.fp32_top1:.2f} % / {r.int8_top1:.2f} %  (drop {r.drop_points:+.2f} points, "
                  f"McNemar p={r.mcnemar_p:.2g})")
    t.add_row("top-1 agreement with FP32", f"{r.agreement:.2f} % over {r.holdout_samples} held-out samples")
    if r.board_confirmation:
        bc = r.board_confirmation
        t.add_row(f"on board {bc['board']}", f"{bc['board_agreement']:.2f} % agreement (host predicted "
                  f"{bc['predicted_agreement']:.2f} %, {bc['mismatch_samples']} sample(s) apart)")
    t.add_row("computed as", f"{r.numerics} (the board's INT8 arithmetic); this host: {r.host_int8}")
    if r.host_kernel_agreement is not None:
        t.add_row("this host's own kernels", f"{r.host_kernel_agreement:.2f} % agreement (not the board's figure)")
    if r.unfused_agreement is not None:
        t.add_row("QDQ graph unfused", f"{r.unfused_agreement:.2f} % agreement (exact products, float requantization)")
    if r.labelled_top1:
        lt = r.labelled_top1
        t.add_row(f"top-1 on {escape(lt['name'])}", f"FP32 {lt['fp32_top1']:.1f} % / INT8 {lt['int8_top1']:.1f} % "
                  f"over {lt['n']} labelled samples (reported, not selected on)")
    ok = "[green]met[/]" if r.budget_met else "[red]NOT met[/]"
    t.add_row("accuracy budget", f"{escape(r.budget_basis) or f'{r.metric} drop <= {r.budget_points:g} points'}: "
              f"{ok} ({r.drop_points:.2f} points)")
    t.add_row("calibration", f"{r.calibration_method} on {r.calibration_samples} samples "
              f"(tried: {', '.join(sorted({c.method for c in r.candidates}))})")
    t.add_row("weights / activations", f"int8 {'per-channel' if r.per_channel else 'per-tensor'}, "
              f"{r.weight_rounding} rounding / {r.activation_dtype}")
    t.add_row("most sensitive layers", "\n".join(f"{s['name']} ({s['op']}, SQNR {s['sqnr_db']} dB)"
                                                 for s in r.sensitive_layers[:5]) or "(not needed)")
    t.add_row("layers kept in float", "\n".join(r.float_layers) or "none")
    if r.float_activations:
        t.add_row("activations kept in float", f"{len(r.float_activations)} (weights INT8): "
                  + ", ".join(r.float_activations[:4]) + (" …" if len(r.float_activations) > 4 else ""))
    t.add_row("remedies run", ", ".join(r.remedies_tried) or "–")
    for row in r.latency:
        t.add_row(f"latency, {row.threads} thread(s)" + (" (host proxy)" if r.latency_source == "host-proxy" else ""), f"FP32 {row.fp32_ms:.2f} ms -> INT8 {row.int8_ms:.2f} ms "
                  f"= {row.ratio:.2f}x (median of {row.runs})")
    t.add_row("evaluations / time / peak RSS", f"{r.evaluations} / {r.seconds:.1f} s / {r.peak_rss_mb:.0f} MB")
    console.print(t)
    c = Table(title="remedies measured (selection split): cost and benefit")
    for col in ("candidate", "drop", "SQNR dB", "size MB", "latency ms", "time s", "NPU-eligible"):
        c.add_column(col, justify="left" if col == "candidate" else "right")
    for cand in r.candidates:
        mark = " *" if (cand.method == r.calibration_method and cand.float_layers == r.float_layers
                        and cand.variant == r.variant and cand.float_activations == r.float_activations) else ""
        c.add_row(escape(cand.name) + mark, f"{cand.search_drop:.2f}", f"{cand.output_sqnr_db:.1f}",
                  f"{cand.size_bytes / 1e6:.2f}", f"{cand.latency_ms:.2f}", f"{cand.seconds:.1f}",
                  "yes" if cand.npu_eligible else f"no ({cand.cpu_islands} CPU island(s), ~{cand.transfer_ms:g} ms)")
    console.print(c)
    for w in r.warnings:
        console.print(f"[yellow]warning:[/] {w}")


def _confirm(board: str, model: Path, output: Path, holdout, ev, r, seed: int, max_mismatch: int,
             as_json: bool) -> dict:
    """``--confirm-on``: the final model's figure on the board itself, beside the host's."""
    from ..fleet.confirm import confirm_on_board
    from ..quantize import split_eval
    hold = holdout if holdout is not None else split_eval(ev, seed)[1]
    if not as_json:
        out.print(f"confirming on board {board} ({len(hold)} held-out samples) ...")
    return confirm_on_board(board, model, output, hold, r.agreement, max_mismatch=max_mismatch).to_dict()


def _source(model: Path, fmt: str, output_given, as_json: bool, finetune: int = 0) -> tuple[Path, Path]:
    """The FP32 ONNX (or float .tflite) model to start from, and the output path for ``fmt``."""
    from ..errors import DataError

    if fmt not in ("onnx", "tflite"):
        raise DataError(f"--format must be onnx or tflite, got {fmt!r}")
    if finetune and fmt != "tflite":
        raise DataError("--finetune goes with --format tflite; for an ONNX model use `edgepack qat`")
    output = output_path(output_given, f"{model.stem}-int8{'.tflite' if fmt == 'tflite' else '.onnx'}")
    return (_from_torch(model, output, as_json) if model.suffix.lower() == ".pt2" else model), output


def _from_torch(model: Path, output: Path, as_json: bool) -> Path:
    """A PyTorch ``.pt2`` becomes ``<stem>.onnx`` beside the output (edgepack.fromtorch), checked
    against PyTorch; every later step, and the report, start from that FP32 ONNX model."""
    from ..fromtorch import export_pt2

    fp32 = output.with_name(f"{model.stem}.onnx")
    if not as_json:
        err.print(f"exporting {model} (PyTorch) to {fp32}", markup=False, highlight=False)
    e = export_pt2(model, fp32)
    if not as_json:
        err.print(f"  ONNX Runtime vs PyTorch: max |error| {e.max_abs_error:.2g} (outputs up to {e.output_scale:.3g}), "
                  f"{e.seconds:.1f} s", markup=False, highlight=False)
    return fp32


def _check_choices(method: list[str], known, rounding: str) -> None:
    from ..errors import DataError
    bad = [m for m in method if m not in known]
    if bad:
        raise DataError(f"unknown calibration method(s) {bad}; choose from {list(known)}")
    if rounding not in ("gptq", "nearest"):
        raise DataError("--rounding must be gptq or nearest")


def _as_tflite(a: dict) -> None:
    """``quantize --format tflite``: the LiteRT path (edgepack/tflite) with the same options."""
    from ._common import QUANTIZE_FORMATS
    keys = ("model", "target", "calib", "eval_", "output", "search", "max_drop", "calib_size", "preprocess",
            "preprocess_hook", "labels", "threads", "max_evals", "as_json", "report", "carry_over", "full_integer", "finetune")
    return QUANTIZE_FORMATS["tflite"](**{k: a[k] for k in keys})


# the LiteRT path's own options (``--format tflite``)
CARRY_OVER_OPT = typer.Option(None, "--carry-over", help="with --format tflite: an edgepack INT8 ONNX model of MODEL "
                              "whose search result is carried over (default: run the ONNX search first)")
FULL_INTEGER_OPT = typer.Option(False, "--full-integer", help="with --format tflite: no float op even where the "
                                "target could run one (the gate then refuses any)")
FINETUNE_OPT = typer.Option(0, "--finetune", help="with --format tflite: also judge the carried-over INT8 model "
                            "fine-tuned N steps on its own grid (distilled on --calib; needs torch; 150: the measured "
                            "recipe; a --search apart from --calib judges it unbiased)")


def quantize(
    model: Path = typer.Argument(..., help="FP32 ONNX model, a PyTorch torch.export program (.pt2), or a float "
                                 ".tflite with --format tflite"),
    target: str = typer.Option(..., "--target", "-t", help="board profile name or TOML path"),
    calib: Path = typer.Option(..., "--calib", help="calibration data: image folder, .npy or .npz"),
    fmt: str = typer.Option("onnx", "--format", help="output format: onnx (QDQ) or tflite (full-integer "
                            "INT8 for LiteRT targets; needs scripts/setup-tflite.sh)"),
    carry_over: Optional[Path] = CARRY_OVER_OPT,
    full_integer: bool = FULL_INTEGER_OPT,
    finetune: int = FINETUNE_OPT,
    eval_: Path = typer.Option(..., "--eval", help="evaluation data (final figures)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="INT8 ONNX model to write (default: "
                                          "MODEL-int8.onnx in the project's out folder)"),
    search: Optional[Path] = typer.Option(None, "--search", help="data for ranking/selection; "
                                          "default: half of --eval, the other half held out"),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="accuracy budget, points (default: target's)"),
    calib_size: Optional[int] = typer.Option(None, "--calib-size", help="use the first N calibration samples"),
    method: list[str] = typer.Option([], "--method", help="calibration method(s) to try: minmax, percentile, entropy, mse"),
    rounding: str = typer.Option("gptq", "--rounding", help="weight rounding: gptq (advanced PTQ) or nearest"),
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="image preprocessing spec, e.g. "
                                             "size=224,resize=256,mean=127,std=128,layout=nchw,color=rgb"),
    preprocess_hook: Optional[str] = typer.Option(None, "--preprocess-hook", help="FILE.py:FUNC mapping an image path to an array"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="labels file (file,label) for --eval"),
    top1_eval: Optional[Path] = typer.Option(None, "--top1-eval", help="labelled data: FP32/INT8 top-1 reported only"),
    threads: list[int] = typer.Option([1, 2], "--threads", help="thread counts for the latency check"),
    require_speedup: bool = typer.Option(False, "--require-speedup", help="refuse when INT8 is not faster"),
    max_evals: int = typer.Option(10, "--max-evals",
                                  help="full evaluations the remedies may spend (the 2 plain baselines come on top)"),
    as_json: bool = JSON_OPT,
    report: Optional[Path] = typer.Option(None, "--report", help="JSON report path (default: OUTPUT with .json)"),
    confirm_on: Optional[str] = typer.Option(None, "--confirm-on", help="board (e.g. rpi4-emu) that runs the final "
                                             "model on the held-out samples; its figure is shown beside the host's"),
    max_mismatch: int = typer.Option(2, "--max-mismatch", help="samples the board's figure may differ by"),
) -> None:
    """Quantize an FP32 ONNX model to INT8 for a target board within an accuracy budget."""
    args = dict(locals())  # every option, for the LiteRT path
    output_given = output

    def go() -> None:
        nonlocal output, model
        from ..data import load_dataset
        from ..modelinfo import load_model
        from ..quantize import QuantizeOptions, quantize as run
        from ..quantize.calibrate import ALL_METHODS, METHODS
        from ..quantize.workflows import resolve_preprocessing, write_report
        from ..targets import load_target

        model, output = _source(model, fmt, output_given, as_json, finetune)
        args["model"] = model
        if fmt == "tflite":
            return _as_tflite(args | {"output": output})
        tgt = load_target(target)
        _check_choices(method, ALL_METHODS, rounding)
        load_model(model)  # fail fast on a bad model, before data is opened
        pp = resolve_preprocessing(model, preprocess, preprocess_hook)
        cal = load_dataset(calib, pp)
        ev = load_dataset(eval_, pp, labels_file=labels)
        se = load_dataset(search, pp) if search else None
        opts = QuantizeOptions(max_drop=max_drop, calib_size=calib_size,
                               methods=tuple(method) or METHODS, weight_rounding=rounding,
                               latency_threads=tuple(threads), require_speedup=require_speedup,
                               max_evals=max_evals)
        with RichProgress(enabled=not as_json) as pg:
            r = run(model, tgt, cal, ev, output, search=se, options=opts, progress=pg,
                    top1_data=load_dataset(top1_eval, pp) if top1_eval else None)
        if confirm_on:
            r.board_confirmation = _confirm(confirm_on, model, output, ev if se is not None else None, ev, r,
                                            opts.seed, max_mismatch, as_json)
        write_report(rp := report or output.with_suffix(".json"), r.to_json())
        if as_json:
            print(r.to_json())
        else:
            render_report(r, out)
            out.print(f"wrote {output} and {rp}", markup=False, highlight=False)
        finish(r)

    run_guarded(go)


def targets(as_json: bool = JSON_OPT) -> None:
    """List the board profiles."""

    def go() -> None:
        from ..targets import list_targets, load_target

        ts = [load_target(n) for n in list_targets()]
        if as_json:
            dump([{"name": t.name, "description": t.description, "ram_mb": t.ram_mb,
                               "ota_budget_mb": t.ota_budget_mb, "float_allowed": t.float_allowed,
                               "max_top1_drop": t.max_top1_drop} for t in ts])
            return
        tb = Table("target", "description", "RAM", "OTA budget", "float", "max drop")
        for t in ts:
            tb.add_row(t.name, t.description, f"{t.ram_mb} MB", f"{t.ota_budget_mb:g} MB",
                       "yes" if t.float_allowed else "no", f"{t.max_top1_drop:g}")
        out.print(tb)

    run_guarded(go)


def analyze(
    model: Path = typer.Argument(..., help="FP32 ONNX model, or any .tflite"),
    target: str = typer.Option(..., "--target", "-t", help="board profile name or TOML path"),
    calib: Path = typer.Option(..., "--calib", help="calibration data: image folder, .npy or .npz"),
    eval_: Path = typer.Option(..., "--eval", help="evaluation data (labels optional)"),
    html: Optional[Path] = typer.Option(None, "--html", "-o", help="write a self-contained HTML page with plots"),
    max_eval: int = typer.Option(256, "--max-eval", help="evaluation samples per measurement"),
    calib_size: Optional[int] = typer.Option(None, "--calib-size", help="use the first N calibration samples"),
    method: str = typer.Option("percentile", "--method", help="calibration method: minmax, percentile, entropy"),
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="image preprocessing spec, e.g. "
                                             "size=224,resize=256,mean=127,std=128"),
    preprocess_hook: Optional[str] = typer.Option(None, "--preprocess-hook",
                                                  help="FILE.py:FUNC mapping an image path to an array"),
    as_json: bool = JSON_OPT,
) -> None:
    """Structured quantization debugging report: calibration, per-layer sensitivity, outliers, placement."""

    def go() -> None:
        from ..data import load_dataset
        from ..errors import DataError
        from ..modelinfo import load_model
        from ..quantize.analyze import analyze as run, to_html
        from ..quantize.calibrate import METHODS
        from ..quantize.workflows import resolve_preprocessing
        from ..targets import load_target

        if model.suffix.lower() == ".tflite":
            from ._common import ANALYZE_SUFFIXES
            return ANALYZE_SUFFIXES[".tflite"](model=model, target=target, calib=calib, eval_=eval_, preprocess=preprocess,
                                      preprocess_hook=preprocess_hook, max_eval=max_eval, as_json=as_json)
        if method not in METHODS:
            raise DataError(f"unknown calibration method {method!r}; choose from {list(METHODS)}")
        tgt = load_target(target)
        load_model(model)
        pp = resolve_preprocessing(model, preprocess, preprocess_hook)
        cal = load_dataset(calib, pp, limit=calib_size)
        ev = load_dataset(eval_, pp)
        page = output_path(html, "analyze.html") if html else None  # its folder exists before the work
        with RichProgress(enabled=not as_json) as pg:
            state = {"d": None}

            def prog(desc: str, i: int, n: int) -> None:
                if state["d"] != desc:
                    pg.done()
                    pg.start(desc, n)
                    state["d"] = desc
                pg.advance(1)

            r = run(model, tgt, cal, ev, method=method, max_eval=max_eval, progress=prog)
            pg.done()
        if page:
            tmp = page.with_name(f".{page.name}.tmp")
            tmp.write_text(to_html(r))
            tmp.replace(page)
        if as_json:
            dump(r.to_dict())
            return
        t = Table(title=f"edgepack analyze -> {r.target}", show_header=False)
        t.add_column(style="bold")
        t.add_column()
        t.add_row("full INT8", f"{r.metric} drop {r.int8_drop:.2f} points, logits SQNR {r.int8_sqnr_db} dB "
                  f"({r.eval_samples} samples)")
        t.add_row("worst layers (alone)", "\n".join(escape(f"{l.name} [{l.role}]") + f" {l.alone_sqnr_db} dB, drop {l.alone_drop}"
                                                    + (f", float gain {l.float_gain}" if l.float_gain is not None else "")
                                                    for l in r.layers[:6]))
        t.add_row("outliers", "\n".join(escape(f"{o.tensor} [{o.role}] {o.ratio}x") for o in r.outliers[:5]))
        t.add_row("calibration size", ", ".join(f"{s['samples']}: {s['drop']}" for s in r.size_sweep))
        t.add_row("calibration coverage", f"mean {r.coverage_mean_outside * 100:.3f} % of eval values outside")
        p = r.placement
        t.add_row("placement", f"{p.int8_nodes} INT8, {p.fallback_nodes} CPU fallback in {p.islands} island(s) "
                  f"(~{p.estimated_transfer_ms} ms); MatMul/Gemm INT8 {p.matmul_gemm_int8}/{p.matmul_gemm_total}")
        out.print(t)
        for f in r.findings:
            out.print(escape(f"- {f}"))
        if page:
            out.print(f"wrote {page}", markup=False, highlight=False)

    run_guarded(go)


def qat(
    checkpoint: Path = typer.Argument(..., help="FP32 state_dict (.pt) of a Hugging Face sequence classifier"),
    hf_dir: Path = typer.Option(..., "--hf-dir", help="model folder (config.json, tokenizer) the checkpoint fits"),
    train: Path = typer.Option(..., "--train", help="tokenized training data .npz (input_ids, attention_mask, labels)"),
    target: str = typer.Option(..., "--target", "-t", help="board profile name or TOML path"),
    calib: Path = typer.Option(..., "--calib", help="tokenized calibration data .npz for the INT8 export"),
    eval_: Path = typer.Option(..., "--eval", help="tokenized held-out data .npz (final figures)"),
    output: Path = typer.Option(..., "-o", "--output", help="INT8 QDQ ONNX model to write"),
    search: Optional[Path] = typer.Option(None, "--search", help="data for selection (default: half of --eval)"),
    epochs: float = typer.Option(1.0, "--epochs", help="fine-tuning epochs (fractions allowed)"),
    lr: float = typer.Option(2e-5, "--lr", help="learning rate of the fine-tuning"),
    calib_size: Optional[int] = typer.Option(128, "--calib-size", help="calibration samples for the export"),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="accuracy budget, points (default: "
                                             "the target's)"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="the FP32 ONNX model the checkpoint "
                                             "came from: the budget is measured against it (default: the "
                                             "fine-tuned export)"),
    as_json: bool = JSON_OPT,
) -> None:
    """Quantization-aware fine-tuning, then INT8 export and held-out evaluation in ONNX Runtime."""

    def go() -> None:
        from ..data import load_dataset
        from ..targets import load_target
        from ..quantize.workflows import QatOptions, qat_then_ptq

        tgt = load_target(target)
        cal, ev = load_dataset(calib), load_dataset(eval_)
        se = load_dataset(search) if search else None
        with RichProgress(enabled=not as_json) as pg:
            pg.start("QAT fine-tune", 1)
            res = qat_then_ptq(checkpoint, hf_dir, train, tgt, cal, ev, output, search=se, progress=pg,
                               on_qat_step=lambda i, n: pg.update(i, n),
                               options=QatOptions(epochs=epochs, lr=lr, calib_size=calib_size, max_drop=max_drop,
                                                  reference=reference))
        if as_json:
            dump(res.to_dict())
        else:
            qr = res.qat
            out.print(f"QAT: {qr.steps} steps in {qr.seconds:.0f} s, loss {qr.train_loss_first:.3f} -> "
                      f"{qr.train_loss_last:.3f}")
            render_report(res.ptq, out)
        finish(res)

    run_guarded(go)


def register(app: typer.Typer) -> None:
    for name, fn in (("quantize", quantize), ("targets", targets), ("analyze", analyze), ("qat", qat)):
        app.command(name)(fn)
