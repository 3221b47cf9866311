"""CLI: `edgepack llm ...` — scenario 3 (an LLM on an INT8-NPU + FP16-CPU board).

Thin commands over edgepack.llm: export (genai builder + verification against PyTorch),
weight-only quantization, perplexity under the fixed protocol, the placement plan, the memory
model. Heavy figures come from scripts/bench_llm.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ._common import run_guarded

out = Console()
llm_app = typer.Typer(no_args_is_help=True, help="LLM on a hybrid NPU-INT8 + CPU-FP16 board (issue 15).")


def _guard(fn):
    run_guarded(fn)


def _hf(hf_dir: Optional[Path]) -> Path:
    from ..llm.assets import hf_dir as default

    if hf_dir is None:
        return default()
    from ..errors import ModelError

    if not (hf_dir / "config.json").is_file():
        raise ModelError(f"{hf_dir}: not a Hugging Face model folder (no config.json)")
    return hf_dir


def _config(hf: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(hf))


@llm_app.command("export")
def export_cmd(output: Path = typer.Option(..., "-o", help="output folder (model.onnx + genai files)"),
               precision: str = typer.Option("fp32", help="fp32 | fp16 | int8 | int4 (builder's weight-only)"),
               hf_dir: Optional[Path] = typer.Option(None, help="safetensors folder (default: the SmolLM2 asset)"),
               verify_tokens: int = typer.Option(64, help="tokens to verify against PyTorch (0: skip)"),
               json_out: bool = typer.Option(False, "--json", help="print the result as JSON")):
    """Export to ONNX with a KV cache and verify prefill and decode against PyTorch."""
    def go():
        import numpy as np

        from ..llm.export import OnnxLM, build_onnx, verify
        hf = _hf(hf_dir)
        path = build_onnx(hf, output, precision)
        rep = {"model": str(path)}
        if verify_tokens:
            import torch
            from transformers import AutoModelForCausalLM
            m = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
            ids = np.random.default_rng(0).integers(0, m.config.vocab_size, verify_tokens)
            rep["verification"] = verify(OnnxLM(path), m, ids).to_dict()
        out.print_json(json.dumps(rep)) if json_out else out.print(rep)
    _guard(go)


@llm_app.command("quantize-weights")
def weights_cmd(model: Path = typer.Argument(..., help="FP32 model.onnx from `edgepack llm export`"),
                output: Path = typer.Option(..., "-o", help="quantized model.onnx to write"),
                bits: int = typer.Option(4, help="weight bits: 4 or 8"),
                block_size: Optional[int] = typer.Option(None, help="weights per quantization block "
                                                         "(default: chosen per bit width, weightonly.DEFAULT_BLOCK_SIZE)"),
                algo: str = typer.Option("rtn", help="rtn | hqq | k_quant (ONNX Runtime's MatMulNBits quantizers)"),
                head_bits: int = typer.Option(8, help="lm_head bits (0: float)"),
                embed_bits: int = typer.Option(8, help="embedding bits (0: float)")):
    """Weight-only INT8/INT4 (MatMulNBits) with INT8 embeddings and lm_head."""
    def go():
        from ..llm.weightonly import WeightOnlyOptions, quantize_weight_only
        o = WeightOnlyOptions(bits=bits, block_size=block_size, algo=algo, lm_head_bits=head_bits or None,
                              embed_bits=embed_bits or None)
        out.print_json(json.dumps(quantize_weight_only(model, output, o)))
    _guard(go)


@llm_app.command("ppl")
def ppl_cmd(model: Path = typer.Argument(..., help="model.onnx (builder layout)"),
            hf_dir: Optional[Path] = typer.Option(None, help="tokenizer folder (default: the SmolLM2 asset)")):
    """Perplexity under the fixed protocol (edgepack.llm.perplexity.PROTOCOL)."""
    def go():
        from transformers import AutoTokenizer

        from ..llm.assets import text
        from ..llm.export import OnnxLM
        from ..llm.perplexity import PROTOCOL, perplexity, tokenize_corpus
        tok = AutoTokenizer.from_pretrained(str(_hf(hf_dir)))
        ids = tokenize_corpus(tok, text(PROTOCOL.corpus))
        out.print_json(json.dumps(perplexity(OnnxLM(model).logits, ids).to_dict()))
    _guard(go)


@llm_app.command("plan")
def plan_cmd(target: str = typer.Option("hybrid-npu-int8-cpu-fp16", "--target", "-t", help="board profile"),
             hf_dir: Optional[Path] = typer.Option(None, help="model config folder (default: the SmolLM2 asset)"),
             promote: Optional[Path] = typer.Option(None, help="JSON list of matmuls to move off npu-a8w8, "
                                                              "most sensitive first (bench_llm.py writes it)"),
             context: int = typer.Option(512, help="context length the plan is costed at"), output: Optional[Path] = typer.Option(None, "-o", help="plan JSON")):
    """Per-op NPU-INT8 / CPU-FP16 placement with partitions and an estimated board throughput."""
    def go():
        from ..errors import DataError
        from ..llm.placement import board_llm, decoder_ops, format_table, naive_placement, plan
        from ..targets import load_target
        t = load_target(target)
        board = board_llm(t)
        ops = decoder_ops(_config(_hf(hf_dir)), context=context)
        names = []
        if promote is not None:
            try:
                names = json.loads(promote.read_text())
            except (OSError, ValueError) as e:
                raise DataError(f"{promote}: not a JSON list of op names ({e})") from None
            if isinstance(names, dict):
                names = names.get("promoted", [])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DataError(f"{promote}: expected a JSON list of op names")
        p = plan(ops, board, promote=names)
        out.print(format_table(p), highlight=False, markup=False, soft_wrap=True)
        out.print(f"naive per-op dispatch: {naive_placement(ops, board)[1]} partitions", highlight=False)
        if output:
            p.save(output)
    _guard(go)


@llm_app.command("memory")
def memory_cmd(weights_mb: float = typer.Option(..., help="model file size, MB"),
               target: str = typer.Option("hybrid-npu-int8-cpu-fp16", "--target", "-t", help="board profile"),
               hf_dir: Optional[Path] = typer.Option(None, help="model config folder (default: the SmolLM2 asset)"), kv_bytes: int = typer.Option(2, help="2: FP16, 1: INT8 KV"),
               runtime_mb: float = typer.Option(60.0, help="process baseline before the model (measured by bench_llm)")):
    """Which context lengths fit the board's model RAM budget (weights + KV cache + activations)."""
    def go():
        from ..llm.memory import fits
        from ..targets import load_target
        t = load_target(target)
        r = fits(_config(_hf(hf_dir)), int(weights_mb * 1e6), t.model_ram_mb * 2 ** 20, kv_bytes=kv_bytes,
                 runtime_bytes=int(runtime_mb * 1e6))
        for c, v in r.items():
            out.print(f"context {c:>6}: {v['bytes'] / 1e6:8.1f} MB (weights {v['weights'] / 1e6:.0f}, KV {v['kv_cache'] / 1e6:.0f}, "
                      f"activations {v['activations'] / 1e6:.0f}) {'fits' if v['fits'] else 'does NOT fit'} "
                      f"{t.name} ({t.model_ram_mb} MB)", highlight=False, soft_wrap=True)
    _guard(go)


def register(app: typer.Typer) -> None:
    app.add_typer(llm_app, name="llm")
