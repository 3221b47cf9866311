"""CLI for LiteRT models: `edgepack tflite-info`, and the `.tflite` branches of `quantize` and `analyze`.

`quantize --format tflite` and `analyze MODEL.tflite` call into here (edgepack/cli/quantize.py
keeps one line per branch); the library does the work (edgepack.tflite).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

out = Console()


def _preprocessing(spec: Optional[str], hook: Optional[str]):
    from ..data import ImagePreprocess, load_hook

    if hook:
        return load_hook(hook)
    if spec:
        return ImagePreprocess.parse(spec)
    return None


def render_tflite_report(r, console: Console) -> None:
    t = Table(title=f"edgepack quantize --format tflite -> {r.target}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    mb = lambda b: f"{b / 1e6:.2f} MB"  # noqa: E731
    t.add_row("size", f"{mb(r.fp32_size_bytes)} -> {mb(r.int8_size_bytes)} ({r.size_ratio:.2f}x smaller)")
    if r.fp32_top1 is not None:
        t.add_row("top-1 FP32 / INT8", f"{r.fp32_top1:.2f} % / {r.int8_top1:.2f} % (drop {r.drop_points:+.2f} points)")
    t.add_row("top-1 agreement with FP32", f"{r.agreement:.2f} % over {r.holdout_samples} held-out samples")
    t.add_row("float .tflite vs source", f"{r.float_tflite_agreement:.2f} % agreement")
    t.add_row("computed as", r.numerics)
    ok = "[green]met[/]" if r.budget_met else "[red]NOT met[/]"
    t.add_row("accuracy budget", f"{r.metric} drop <= {r.budget_points:g} points: {ok} ({r.drop_points:.2f})")
    io_in, io_out = r.io["input"], r.io["output"]
    t.add_row("full integer", ("yes" if r.full_integer else "no") + f": input {io_in['dtype']} (scale {io_in['scales'][0]:.6g}, "
              f"zero point {io_in['zero_points'][0]}), output {io_out['dtype']}" if io_in["scales"] else
              ("yes" if r.full_integer else "no"))
    t.add_row("ops kept in float", escape("\n".join(r.float_ops)) or "none")
    t.add_row("calibration", f"{r.calibration} on {r.calibration_samples} samples ({r.quantizer}); "
              f"{r.bias_fixes} layer(s) with int32 bias range repaired")
    for row in r.latency:
        t.add_row(f"LiteRT latency, {row['threads']} thread(s)", f"float {row['float_ms']:.2f} ms -> INT8 "
                  f"{row['int8_ms']:.2f} ms = {row['ratio']:.2f}x (median of {row['runs']}, this host)")
    t.add_row("time / peak RSS", f"{r.seconds:.1f} s / {r.peak_rss_mb:.0f} MB")
    console.print(t)
    c = Table(title="candidates (selection split)")
    for col in ("candidate", "drop", "agreement %", "size MB", "time s"):
        c.add_column(col, justify="left" if col == "candidate" else "right")
    for cand in r.candidates:
        c.add_row(escape(cand.name), f"{cand.search_drop:.2f}", f"{cand.search_agreement:.2f}",
                  f"{cand.size_bytes / 1e6:.2f}", f"{cand.seconds:.1f}")
    console.print(c)
    for w in r.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")


def quantize_tflite_cmd(*, model: Path, target: str, calib: Path, eval_: Path, output: Path, search: Optional[Path],
                        max_drop: Optional[float], calib_size: Optional[int], preprocess: Optional[str],
                        preprocess_hook: Optional[str], labels: Optional[Path], threads: list[int], max_evals: int,
                        as_json: bool, report: Optional[Path], carry_over: Optional[Path] = None,
                        full_integer: bool = False, finetune: int = 0) -> None:
    """`edgepack quantize --format tflite`: raises EdgepackError (the caller prints one line)."""
    from ..data import load_dataset
    from ..errors import ModelError
    from ..targets import load_target
    from ..tflite.pipeline import TfliteOptions, quantize_tflite

    tgt = load_target(target)
    if model.suffix.lower() not in (".onnx", ".tflite"):
        raise ModelError(f"{model}: --format tflite takes an FP32 .onnx or a float .tflite")
    if model.suffix.lower() == ".onnx":
        from ..modelinfo import load_model
        load_model(model)  # fail fast: not ONNX, already quantized
    pp = _preprocessing(preprocess, preprocess_hook)
    if pp is None and model.suffix.lower() == ".onnx":
        from ..quantize.workflows import resolve_preprocessing
        pp = resolve_preprocessing(model)
    cal = load_dataset(calib, pp)
    ev = load_dataset(eval_, pp, labels_file=labels)
    se = load_dataset(search, pp) if search else None
    if carry_over is not None:
        from ..modelinfo import load_model
        load_model(carry_over, allow_quantized=True)
    if finetune > 0:
        from ..quantize.qat import _torch
        _torch()  # a missing torch is said before any work
    opts = TfliteOptions(max_drop=max_drop, calib_size=calib_size, latency_threads=tuple(threads), max_evals=max_evals,
                         qdq_model=str(carry_over) if carry_over else None, full_integer=full_integer,
                         finetune_steps=finetune)
    log = (lambda m: None) if as_json else (lambda m: Console(stderr=True).print(f"[dim]{escape(m)} ...[/]"))
    r = quantize_tflite(model, tgt, cal, ev, output, search=se, options=opts, log=log)
    rp = report or output.with_suffix(".json")
    rp.write_text(r.to_json())
    if as_json:
        print(r.to_json())
    else:
        render_tflite_report(r, out)
        out.print(f"wrote {output}, {output.with_suffix('.golden.npz')} and {rp}")
    if not r.budget_met:
        raise typer.Exit(4)


def analyze_tflite_cmd(*, model: Path, target: str, calib: Optional[Path], eval_: Optional[Path],
                       preprocess: Optional[str], preprocess_hook: Optional[str], max_eval: int, as_json: bool) -> None:
    from ..data import load_dataset
    from ..targets import load_target
    from ..tflite.analyze import analyze_tflite

    tgt = load_target(target)
    pp = _preprocessing(preprocess, preprocess_hook)
    cal = load_dataset(calib, pp) if calib else None
    ev = load_dataset(eval_, pp) if eval_ else None
    r = analyze_tflite(model, tgt, calib=cal, evaluation=ev, max_eval=max_eval)
    if as_json:
        print(json.dumps(r, indent=2, default=float))
        return
    t = Table(title=f"edgepack analyze {model.name} -> {tgt.name}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    info = r["model"]
    t.add_row("ops", ", ".join(f"{k} x{v}" for k, v in sorted(info["op_counts"].items())))
    t.add_row("tensor dtypes", ", ".join(f"{k} x{v}" for k, v in sorted(info["dtype_counts"].items())))
    t.add_row("full integer", "yes" if info["full_integer"] else f"no: {len(info['float_ops'])} float op(s)")
    t.add_row("gate for target", escape(r["gate"]))
    t.add_row("placement", escape(r["placement"]))
    if r.get("int8_agreement") is not None:
        t.add_row("INT8 agreement", f"{r['int8_agreement']:.2f} % over {r['eval_samples']} samples (LiteRT XNNPACK, exact)")
    if r.get("op_loss"):
        t.add_row("ops losing most signal", escape("\n".join(f"{o['tensor']} ({o['loss_db']:.1f} dB)" for o in r["op_loss"][:6])))
    out.print(t)
    for f in r.get("findings", []):
        out.print(escape(f"- {f}"))


def register(app: typer.Typer) -> None:
    from ._common import ANALYZE_SUFFIXES, QUANTIZE_FORMATS, run_guarded
    QUANTIZE_FORMATS["tflite"] = quantize_tflite_cmd
    ANALYZE_SUFFIXES[".tflite"] = analyze_tflite_cmd

    @app.command("tflite-info")
    def tflite_info(model: Path = typer.Argument(..., help=".tflite model"),
                    target: Optional[str] = typer.Option(None, "--target", "-t", help="also run the full-integer gate for this board"),
                    tensors: bool = typer.Option(False, "--tensors", help="every tensor's scales and zero points"),
                    as_json: bool = typer.Option(False, "--json", help="print the parameters as JSON")) -> None:
        """Quantization parameters (scales, zero points, axis), op dtypes and float ops of any .tflite,
        read through LiteRT's own flatbuffer schema. With --target, exit 4 if that board runs INT8
        only and a float op remains."""

        def go() -> None:
            from ..targets import load_target
            from ..tflite import read_tflite
            from ..tflite.gate import check_full_integer

            info = read_tflite(model)
            d = info.to_dict(tensors=tensors)
            if as_json:
                print(json.dumps(d, indent=2, default=float))
            else:
                t = Table(title=f"{model.name}: {info.size_bytes / 1e6:.2f} MB, schema version {info.version}",
                          show_header=False)
                t.add_column(style="bold")
                t.add_column()
                for label, ts in (("input", info.inputs), ("output", info.outputs)):
                    for x in ts:
                        q = f", scale {x.scales[0]:.6g}, zero point {x.zero_points[0]}" if x.scales else ""
                        t.add_row(label, escape(f"{x.name} {x.dtype} {list(x.shape)}{q}"))
                t.add_row("ops", ", ".join(f"{k} x{v}" for k, v in sorted(info.op_counts.items())))
                t.add_row("tensor dtypes", ", ".join(f"{k} x{v}" for k, v in sorted(d["dtype_counts"].items())))
                t.add_row("per-channel tensors", str(d["per_channel_tensors"]))
                t.add_row("full integer", "yes" if info.full_integer else
                          escape(f"no: float ops {', '.join(d['float_ops'][:8])}" + (" ..." if len(d["float_ops"]) > 8 else "")))
                out.print(t)
                if tensors:
                    tt = Table("#", "tensor", "dtype", "shape", "scale(s)", "zero point(s)", "axis")
                    for x in info.tensors:
                        sc = (f"{x.scales[0]:.4g}" if len(x.scales) == 1 else
                              f"{len(x.scales)} ch, {min(x.scales):.3g}..{max(x.scales):.3g}" if x.scales else "")
                        zp = (str(x.zero_points[0]) if len(set(x.zero_points)) == 1 else "per-channel") if x.zero_points else ""
                        tt.add_row(str(x.index), escape(x.name[:60]), x.dtype, str(list(x.shape)), sc, zp,
                                   str(x.quantized_dimension) if x.per_channel else "")
                    out.print(tt)
            if target:
                check_full_integer(info, load_target(target))

        run_guarded(go)
