"""LiteRT (TFLite) support on the host: read any ``.tflite`` through LiteRT's own flatbuffer schema
(:mod:`.inspect`), refuse float ops where a board runs INT8 only (:mod:`.gate`), translate a float
ONNX model to a float ``.tflite`` (:mod:`.from_onnx`) and quantize it to full integer with LiteRT's
quantizer run as a subprocess tool from its own environment (:mod:`.convert`).
"""
from __future__ import annotations

from .inspect import OpInfo, TensorInfo, TfliteInfo, read_tflite

__all__ = ["OpInfo", "TensorInfo", "TfliteInfo", "read_tflite"]
