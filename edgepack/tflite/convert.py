"""Float ``.tflite`` -> full-integer INT8 ``.tflite`` with LiteRT's quantizer, as a subprocess tool.

LiteRT's quantizer (``ai-edge-quantizer``, renamed ``litert-quantizer``) and the converters
(litert-torch, onnx2tf) pin their own ai-edge-litert / TensorFlow / numpy, so they live in their
own environment, ``.venv-tflite`` made by ``scripts/setup-tflite.sh`` (or the Python named by
``$EDGEPACK_TFLITE_PYTHON``), never in edgepack's default install. edgepack runs
``_aeq_tool.py`` there with a JSON request and reads one JSON line back; a missing environment
is one line naming the script.

After the quantizer: int32 biases are brought back in range (:mod:`.biasfix`), because the
quantizer lets them wrap on near-zero weight channels.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgepackError, ModelError
from .biasfix import fit_bias_scales

ROOT = Path(__file__).resolve().parents[2]
TOOL = Path(__file__).with_name("_aeq_tool.py")
SETUP = "bash scripts/setup-tflite.sh"
CALIBRATIONS = ("minmax", "moving-average")


class ConverterMissing(EdgepackError):
    """The optional LiteRT converter environment is not installed."""

    exit_code = 3


class ConverterFailed(EdgepackError):
    exit_code = 1


def converter_python() -> Path:
    """The converter environment's Python; ConverterMissing (one line naming the script) if absent."""
    env = os.environ.get("EDGEPACK_TFLITE_PYTHON")
    py = Path(env) if env else ROOT / ".venv-tflite" / "bin" / "python"
    if not py.is_file():
        raise ConverterMissing(f"the LiteRT quantizer is not installed ({py} not found): run `{SETUP}` "
                               "(or set EDGEPACK_TFLITE_PYTHON to a Python with ai-edge-quantizer)")
    return py


def _scope_regex(tensor: str) -> str:
    """LiteRT's quantizer matches an op by its scope, its output names joined as ``a;b;``."""
    import re
    return "(?:^|;)" + re.escape(tensor) + ";"


@dataclass(frozen=True)
class QuantizerRun:
    seconds: float
    quantizer: str
    bias_fixes: int              # layers whose weight scales were widened so the int32 bias fits
    bias_channels: int


def quantize_float_tflite(float_tflite: str | Path, calib: np.ndarray, out: str | Path, *,
                          calibration: str = "minmax", keep_float: tuple[str, ...] = (),
                          threads: int = 1, timeout_s: float = 3600) -> QuantizerRun:
    """Full-integer (int8 I/O, int8 per-channel weights, int32 biases) quantization of ``float_tflite``.

    ``calib`` holds the representative samples in the model's input layout, batch axis first.
    ``keep_float`` names the output tensors of the ops left in float.
    """
    return quantize_variants(float_tflite, calib, [(Path(out), tuple(keep_float))], calibration=calibration,
                             threads=threads, timeout_s=timeout_s)[0]


def quantize_variants(float_tflite: str | Path, calib: np.ndarray, variants: list[tuple[Path, tuple[str, ...]]], *,
                      calibration: str = "minmax", threads: int = 1, timeout_s: float = 3600,
                      float_mode: str = "float") -> list[QuantizerRun]:
    """Several quantizations of ``float_tflite`` from one calibration: each ``(out, keep_float)`` is
    written with those ops left in float (calibration is most of the quantizer's time).
    ``float_mode="weight-only"`` keeps their weights int8, dequantized in the graph: float compute
    at INT8's size."""
    from .inspect import read_tflite
    from ai_edge_litert import interpreter as tfl

    if calibration not in CALIBRATIONS:
        raise ModelError(f"unknown calibration {calibration!r}; choose from {', '.join(CALIBRATIONS)}")
    py = converter_python()
    sig = tfl.Interpreter(model_path=str(float_tflite)).get_signature_list()
    if not sig:
        raise ModelError(f"{float_tflite} has no signature; LiteRT's quantizer calibrates through one")
    key = next(iter(sig))
    if len(sig[key]["inputs"]) != 1:
        raise ModelError(f"{float_tflite}: full-integer quantization here takes single-input models")
    with tempfile.TemporaryDirectory(prefix="edgepack-aeq-") as td:
        np.save(Path(td) / "calib.npy", np.ascontiguousarray(calib, np.float32))
        raws = [Path(td) / f"raw{i}.tflite" for i in range(len(variants))]
        vs = [{"out": str(r), "keep_float": [_scope_regex(k) for k in keep], "mode": float_mode}
              for r, (_, keep) in zip(raws, variants)]
        req = {"float": str(float_tflite), "calib": str(Path(td) / "calib.npy"), "out": vs[0]["out"],
               "signature": key, "input": sig[key]["inputs"][0], "calibration": calibration,
               "keep_float": vs[0]["keep_float"], "variants": vs,
               "threads": threads}
        (Path(td) / "req.json").write_text(json.dumps(req))
        try:
            # -P: the tool sits beside inspect.py, which must not shadow the stdlib module there
            r = subprocess.run([str(py), "-P", str(TOOL), str(Path(td) / "req.json")], capture_output=True, text=True,
                               timeout=timeout_s, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        except subprocess.TimeoutExpired:
            raise ConverterFailed(f"LiteRT's quantizer did not finish in {timeout_s:.0f} s") from None
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1][:400]
            raise ConverterFailed(f"LiteRT's quantizer failed on {Path(float_tflite).name}: {last}")
        try:
            rep = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise ConverterFailed("LiteRT's quantizer gave no report (is .venv-tflite complete? "
                                  f"re-run `{SETUP}`)") from None
        runs = []
        for raw, (out, _) in zip(raws, variants):
            fixes = fit_bias_scales(raw, float_tflite, out)
            read_tflite(out)  # what was written parses
            runs.append(QuantizerRun(seconds=float(rep.get("seconds", 0)), quantizer=str(rep.get("quantizer", "")),
                                     bias_fixes=len(fixes), bias_channels=sum(f.channels for f in fixes)))
    return runs


__all__ = ["quantize_float_tflite", "quantize_variants", "converter_python", "ConverterMissing", "ConverterFailed", "QuantizerRun",
           "CALIBRATIONS"]
