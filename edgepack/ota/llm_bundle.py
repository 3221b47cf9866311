"""What an LLM release carries besides its graph, so ``edgepack bundle`` can package it.

A KV-cache decoder exported by the builder (``edgepack.llm.export``) or quantized weight-only
(``edgepack.llm.weightonly``) is three files: ``model.onnx`` (the graph, kilobytes), its external
data file (``model.onnx.data``, the weights: 100-300 MB) and ``genai_config.json`` (the board
reads ``decoder.head_size`` from it when the KV-cache shape is symbolic). A bundle of only the
graph would install a model that cannot load, so the extra files are found here and carried as
role ``extra`` under their own names (the graph names its data file; renaming it would break the
graph). The golden prompts (``make_golden``'s arrays) replace the tensor golden data, and the
board's LLM health thresholds travel in the runtime settings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


from ..errors import DataError, ModelError, UsageError

GENAI_CONFIG = "genai_config.json"
KV_INPUT_PREFIX = "past_key_values"
_GRAPH_PEEK_LIMIT = 64 << 20   # a graph without external data bigger than this is not parsed just to peek


@dataclass(frozen=True, kw_only=True)
class LLMBundleOptions:
    """How an LLM bundle is judged on the board. ``detect``: None finds out from the model
    (a KV-cache decoder), True insists (the model must be one), False bundles the graph as any model."""

    detect: bool | None = None
    min_token_agreement: float = 0.9
    max_ppl_ratio: float = 1.1

    def health(self) -> dict[str, float]:
        return {"min_token_agreement": float(self.min_token_agreement), "max_ppl_ratio": float(self.max_ppl_ratio)}


def _graph(model: Path):
    """The graph without its weights (external data is not read), or None if it is not cheap to peek."""
    import onnx
    if model.suffix.lower() != ".onnx" or model.stat().st_size > _GRAPH_PEEK_LIMIT:
        return None
    try:
        return onnx.load(str(model), load_external_data=False)
    except Exception as e:  # protobuf's errors have no common base; the message names the file
        raise ModelError(f"{model} is not a readable ONNX model ({str(e)[:120]})") from None


def is_kv_decoder(model: str | Path) -> bool:
    """Whether ``model`` is a KV-cache decoder: graph inputs ``past_key_values.*`` (builder
    naming), or, for a graph too large to peek cheaply, a genai_config.json beside it."""
    p = Path(model)
    g = _graph(p)
    if g is None:
        return p.suffix.lower() == ".onnx" and (p.parent / GENAI_CONFIG).is_file()
    return any(i.name.startswith(KV_INPUT_PREFIX) for i in g.graph.input)


def external_data_files(model: str | Path) -> list[Path]:
    """The external data files the graph names, in first-use order; each must sit beside it."""
    p = Path(model)
    g = _graph(p)
    if g is None:
        return []
    names: list[str] = []
    for t in list(g.graph.initializer):
        for e in t.external_data:
            if e.key == "location" and e.value not in names:
                names.append(e.value)
    out = []
    for n in names:
        if Path(n).name != n:
            raise ModelError(f"{p} keeps weights in {n!r}, outside its folder; re-save it with the data file "
                             "beside the graph (bundles carry plain file names)")
        f = p.parent / n
        if not f.is_file():
            raise ModelError(f"{p} names external data {n!r} that is not in {p.parent}; copy it beside the model")
        out.append(f)
    return out


def llm_extras(model: str | Path) -> list[tuple[str, str, Path]]:
    """(name, role, path) of the files an LLM graph needs on the board: external data, genai config."""
    p = Path(model)
    items = [(f.name, "extra", f) for f in external_data_files(p)]
    cfg = p.parent / GENAI_CONFIG
    if cfg.is_file():
        try:
            json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{cfg} is not readable JSON ({e}); re-export the model") from None
        items.append((GENAI_CONFIG, "extra", cfg))
    return items


def wants_llm(models: list[Path], options: LLMBundleOptions | None) -> bool:
    """Whether the bundle is an LLM's (one ONNX decoder), by the option or by detection."""
    detect = None if options is None else options.detect
    if detect is False:
        return False
    try:
        found = len(models) == 1 and is_kv_decoder(models[0])
    except ModelError:
        if detect:
            raise
        found = False    # detecting only: a file ONNX cannot parse is bundled as it is, as before
    if detect and not found:
        raise UsageError(f"--llm: {', '.join(map(str, models))} is not one KV-cache decoder (no past_key_values "
                         "inputs); bundle the builder's model.onnx")
    return found


def check_llm_golden(p: Path) -> None:
    """LLM golden data is ``make_golden``'s arrays, validated by the board's own loader."""
    from device_agent.llm import GoldenDataError, load_llm_golden
    try:
        load_llm_golden(p)
    except GoldenDataError as e:
        raise DataError(f"{e}") from None


def llm_settings(settings: Mapping[str, Any] | None, model_name: str, options: LLMBundleOptions | None) -> dict:
    """Runtime settings of an LLM bundle: the caller's, plus the model file and the health thresholds."""
    s = dict(settings or {"runtime": "onnxruntime"})
    s.setdefault("model", model_name)
    health = dict(s.get("health") or {})
    for k, v in (options or LLMBundleOptions()).health().items():
        health.setdefault(k, v)
    s["health"] = health
    return s


__all__ = ["LLMBundleOptions", "is_kv_decoder", "external_data_files", "llm_extras", "wants_llm",
           "check_llm_golden", "llm_settings", "GENAI_CONFIG"]
