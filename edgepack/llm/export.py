"""Export a LLaMA-class Hugging Face folder to ONNX with a KV cache, and check it against PyTorch.

Route (offline): transformers + ``gguf`` de-quantize the GGUF into a safetensors folder
(``scripts/llm_assets.py``), then onnxruntime-genai's model builder writes the ONNX decoder:
``input_ids``, an explicit ``attention_mask`` over past + new tokens, explicit ``position_ids``
where the graph takes them (the builder's FP16 CPU graph; its GroupQueryAttention graphs derive
them from the mask), ``past_key_values.N.key/value``
in and ``present.N.key/value`` out, so the same graph runs prefill (empty past) and decode (one
token). Precisions: ``fp32``, ``fp16`` and weight-only ``int8`` / ``int4`` (MatMulNBits; the
builder's options pass through). The model runs on plain ONNX Runtime (:class:`OnnxLM`).

:func:`verify` measures what matters for a deployable decoder: the largest logit error against
the PyTorch model on the same ids, next-token (argmax) agreement, and the same for a token by
token decode through the KV cache, so a cache wiring mistake cannot hide behind a good prefill.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgepackError, ModelError

PRECISIONS = ("fp32", "fp16", "int8", "int4")


class ExportError(EdgepackError):
    exit_code = 2


def build_onnx(hf_dir: str | Path, out_dir: str | Path, precision: str = "fp32",
               extra_options: dict | None = None, *, timeout_s: float = 3600) -> Path:
    """Run onnxruntime-genai's model builder on ``hf_dir``; writes ``out_dir/model.onnx`` atomically.

    The builder runs in a subprocess: its import is heavy and it prints progress bars; a failure
    becomes one :class:`ExportError` line quoting the builder's last line.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise ModelError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise ExportError("exporting an LLM needs the llm extra: pip install -e '.[llm]'") from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    cache = Path(tempfile.mkdtemp(prefix="edgepack-builder-"))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(cache)]
    opts = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (extra_options or {}).items()}
    if opts:
        cmd += ["--extra_options"] + [f"{k}={v}" for k, v in opts.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"the model builder ran past {timeout_s:.0f} s") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if r.returncode != 0 or not (tmp / "model.onnx").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        raise ExportError(f"the model builder failed ({precision}, {opts}): {lines[-1] if lines else r.returncode}")
    if precision == "fp16":
        _strip_value_info(tmp / "model.onnx")
    (tmp / "edgepack-export.json").write_text(json.dumps({
        "source": str(hf_dir), "precision": precision, "extra_options": opts,
        "builder": _builder_version(), "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir / "model.onnx"


def _strip_value_info(path: Path) -> None:
    """The builder's FP16 CPU graph annotates intermediate shapes with a symbolic length that does
    not hold in decode (one new token against the cached ones); ONNX Runtime's memory planner then
    re-uses a buffer of the wrong shape in the inserted FP16 casts and the first decode step fails
    ("Shape mismatch attempting to re-use buffer"). Dropping the annotations (value_info only; the
    weights are untouched) lets ORT infer the shapes itself."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    del m.graph.value_info[:]
    onnx.save(m, str(path))


def _builder_version() -> str:
    try:
        import onnxruntime_genai

        return f"onnxruntime-genai {onnxruntime_genai.__version__}"
    except ImportError:
        return "unknown"


def model_size_bytes(onnx_path: str | Path) -> int:
    """model.onnx plus its external data file(s)."""
    p = Path(onnx_path)
    return sum(f.stat().st_size for f in p.parent.iterdir()
               if f.name == p.name or f.name.startswith(p.name + ".") or f.suffix == ".data")


class OnnxLM:
    """A builder-layout ONNX decoder on plain ONNX Runtime: full-window logits, prefill, decode."""

    def __init__(self, onnx_path: str | Path, threads: int | None = None, config: dict | None = None):
        """``config``: ONNX Runtime session config entries, e.g. ``{"session.disable_quant_qdq": "1"}``
        (run QDQ models as written, without the CPU's fused integer kernels)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        for k, v in (config or {}).items():
            so.add_session_config_entry(k, str(v))
        so.log_severity_level = 3
        self.path = Path(onnx_path)
        self.sess = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in self.sess.get_inputs()}
        self.past_names = sorted((n for n in ins if n.startswith("past_key_values.")),
                                 key=lambda n: (int(n.split(".")[1]), n.endswith("value")))
        if "input_ids" not in ins or "attention_mask" not in ins or not self.past_names:
            raise ModelError(f"{onnx_path} is not a KV-cache decoder (needs input_ids, attention_mask, past_key_values.*)")
        first = ins[self.past_names[0]]
        self.kv_heads, self.head_dim = int(first.shape[1]), first.shape[3]
        self.kv_dtype = np.float16 if "float16" in first.type else np.float32
        if not isinstance(self.head_dim, int):
            # the builder names it symbolically; read it from the model's config beside it
            cfg = json.loads((self.path.parent / "genai_config.json").read_text())["model"]
            self.head_dim = int(cfg["decoder"]["head_size"])
        self.out_names = [o.name for o in self.sess.get_outputs()]
        # the builder's FP16 CPU graph takes explicit position ids; its GQA graphs derive them
        self.position_ids = "position_ids" in ins

    def empty_cache(self, batch: int = 1) -> dict:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        return {n: z for n in self.past_names}

    def step(self, ids: np.ndarray, cache: dict, past_len: int) -> tuple[np.ndarray, dict]:
        """Run ``ids`` [1, T] after ``past_len`` cached tokens; returns logits [1, T, V] and the new cache."""
        ids = np.asarray(ids, np.int64)
        mask = np.ones((ids.shape[0], past_len + ids.shape[1]), np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, **cache}
        if self.position_ids:
            feed["position_ids"] = np.arange(past_len, past_len + ids.shape[1], dtype=np.int64)[None].repeat(ids.shape[0], 0)
        outs = self.sess.run(None, feed)
        named = dict(zip(self.out_names, outs))
        new = {p: named[p.replace("past_key_values.", "present.")] for p in self.past_names}
        return named["logits"].astype(np.float32), new

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Prefill logits for a whole window (what the perplexity protocol scores)."""
        return self.step(ids, self.empty_cache(ids.shape[0]), 0)[0]

    def greedy(self, ids: np.ndarray, n_new: int) -> tuple[list[int], float, float]:
        """Greedy decode ``n_new`` tokens; returns (tokens, prefill s, decode s)."""
        t0 = time.perf_counter()
        lg, cache = self.step(ids, self.empty_cache(), 0)
        t1 = time.perf_counter()
        toks, past = [int(lg[0, -1].argmax())], ids.shape[1]
        for _ in range(n_new - 1):
            lg, cache = self.step(np.array([[toks[-1]]], np.int64), cache, past)
            past += 1
            toks.append(int(lg[0, -1].argmax()))
        return toks, t1 - t0, time.perf_counter() - t1


@dataclass(frozen=True)
class Verification:
    prefill_max_abs_logit_err: float
    prefill_next_token_agreement: float
    decode_max_abs_logit_err: float
    decode_next_token_agreement: float
    logit_scale: float              # max |logit| of the reference, to read the error against
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()


def verify(lm: OnnxLM, torch_model, ids: np.ndarray, decode_from: int | None = None) -> Verification:
    """ONNX vs PyTorch on the same ids: prefill over all ids, then a token-by-token decode of the
    tail (from ``decode_from``, default the middle) through the KV cache."""
    ids = np.asarray(ids, np.int64).reshape(1, -1)
    ref = torch_logits(torch_model, ids)
    got = lm.logits(ids)
    k = decode_from if decode_from is not None else ids.shape[1] // 2
    lg, cache = lm.step(ids[:, :k], lm.empty_cache(), 0)
    dec = [lg[0, -1]]
    for t in range(k, ids.shape[1] - 1):
        lg, cache = lm.step(ids[:, t:t + 1], cache, t)
        dec.append(lg[0, -1])
    dec = np.stack(dec)
    ref_tail = ref[0, k - 1:ids.shape[1] - 1]
    return Verification(
        prefill_max_abs_logit_err=float(np.abs(got - ref).max()),
        prefill_next_token_agreement=float((got.argmax(-1) == ref.argmax(-1)).mean()),
        decode_max_abs_logit_err=float(np.abs(dec - ref_tail).max()),
        decode_next_token_agreement=float((dec.argmax(-1) == ref_tail.argmax(-1)).mean()),
        logit_scale=float(np.abs(ref).max()), tokens=int(ids.shape[1]))
