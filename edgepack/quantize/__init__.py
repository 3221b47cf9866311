"""The quantization room: FP32 ONNX -> INT8 for a named board, judged as the board computes.

The pipeline (``pipeline.quantize``) composes the steps, each a module of its own:
calibration (``calibrate``), weight rounding (``rounding``: GPTQ / AdaRound-class), SmoothQuant
(``smoothquant``), sensitivity (``sensitivity``), QDQ building (``qdq``), evaluation
(``evaluate``) in the board's arithmetic (``numerics``), latency (``latency``), analysis
(``analyze``), QAT (``qat``) and confirmation on a real or emulated board (``confirm``).

It may import the shared modules below it (``edgepack.data``, ``modelinfo``, ``targets``,
``errors``, ``assets``, ``plots``), never the OTA writer, the fleet or the CLI
(docs/architecture.md; tests/test_layering.py).
"""
from __future__ import annotations

from .pipeline import QuantizeOptions, QuantizeReport, quantize, split_eval

__all__ = ["quantize", "QuantizeOptions", "QuantizeReport", "split_eval"]
