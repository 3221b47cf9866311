"""Building QDQ models with ONNX Runtime's quantizer from one calibration.

Pre-processing (shape inference, BatchNorm folding) happens once; every candidate (per
calibration method, per set of float layers, per single quantized layer) is then built from the
same pre-processed model and the same ranges, handed over as ONNX Runtime's calibration cache.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx

from .calibrate import Calibration
from .compact import dedupe_file
from ..errors import ModelError
from ..modelinfo import ModelInfo
from ..targets import Target


def preprocess_model(info: ModelInfo, work: Path) -> onnx.ModelProto:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "pre.onnx"
    try:
        # the file, not the loaded proto: from a proto ORT's optimizer pass cannot read the model's
        # small constant inputs (opset-18 ReduceMean axes from PyTorch's exporter) and the pass fails
        quant_pre_process(str(info.path), str(out), skip_symbolic_shape=True)
    except Exception as e:
        raise ModelError(f"{info.path}: ONNX Runtime pre-processing failed ({e.__class__.__name__}: {e})") from None
    m = onnx.load(str(out))
    for i, n in enumerate(m.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    onnx.save(m, str(out))
    return m


@contextlib.contextmanager
def quiet_ort():
    """ONNX Runtime's quantizer logs advice through the root logger (pre-processing hints, axis
    notes on LayerNorm weights); edgepack reports what matters itself."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class QDQBuilder:
    """Builds QDQ candidates from one pre-processed model and one calibration."""

    def __init__(self, pre_path: Path, calib: Calibration, target: Target, work: Path,
                 overrides: dict | None, *, per_channel: bool | None = None):
        self.pre_path, self.calib, self.target, self.work = pre_path, calib, target, work
        self.overrides = overrides or {}
        # None: the target's choice; False/True: the plain per-tensor/per-channel baselines
        self.per_channel = target.quant.per_channel if per_channel is None else per_channel
        self.n = 0

    def build_dynamic(self) -> Path:
        """Weights INT8 ahead of time, activations quantized at run time (float in/out)."""
        from onnxruntime.quantization import QuantType, quantize_dynamic

        self.n += 1
        out = self.work / f"cand-{self.n}.onnx"
        with quiet_ort():
            quantize_dynamic(str(self.pre_path), str(out), per_channel=self.per_channel,
                             reduce_range=self.target.weight_bits < 8,
                             weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        dedupe_file(out)
        return out

    def build(self, method: str, float_layers: list[str], only: list[str] | None = None,
              op_types: list[str] | None = None) -> Path:
        """A QDQ model with ranges from ``method``; ``float_layers`` stay float; with ``only``,
        just those nodes are quantized (one-layer-at-a-time sensitivity); with ``op_types``,
        only ops of those types (e.g. MatMul/Gemm: the accelerator's share of a transformer)."""
        if method == "dynamic":
            return self.build_dynamic()
        from onnxruntime.quantization import QuantType

        self.n += 1
        cache = self.work / f"ranges-{method}.json"
        if not cache.exists():
            self.calib.write_ort_cache(method, cache)
        out = self.work / f"cand-{self.n}.onnx"
        act = QuantType.QUInt8 if self.target.quant.activation_dtype == "uint8" else QuantType.QInt8
        extra: dict = {}
        if self.overrides:
            extra["TensorQuantOverrides"] = {k: v for k, v in self.overrides.items()}
        with quiet_ort():
            self._static(out, cache, act, float_layers, only, extra, op_types)
        dedupe_file(out)   # one copy of each repeated zero point and scale (compact.py): same values, fewer bytes
        return out

    def _static(self, out, cache, act, float_layers, only, extra, op_types) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        quantize_static(str(self.pre_path), str(out), calibration_data_reader=None,
                        quant_format=QuantFormat.QDQ, per_channel=self.per_channel,
                        reduce_range=self.target.weight_bits < 8,  # 7-bit weights: no u8 x s8 saturation
                        activation_type=act, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(float_layers), nodes_to_quantize=list(only or []),
                        op_types_to_quantize=list(op_types or []) or None,
                        calibration_cache_path=str(cache),
                        extra_options=extra)
