"""Compositions of library steps that a command runs as one: declared preprocessing, QAT then PTQ,
and writing a report next to its model.

They live in the library (not the CLI) so a notebook, a script and the CLI run the same thing;
the CLI only parses flags and renders what these return.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..data import Dataset, ImagePreprocess, load_hook
from ..modelinfo import load_model


def resolve_preprocessing(model: str | Path, spec: Optional[str] = None, hook: Optional[str] = None):
    """The model's declared preprocessing: a hook, else a spec string, else the model's own
    ``edgepack.preprocess`` metadata when it is an image spec; None when nothing is declared
    (array data needs none)."""
    if hook:
        return load_hook(hook)
    if spec:
        return ImagePreprocess.parse(spec)
    try:
        declared = load_model(model, allow_quantized=True).metadata.get("edgepack.preprocess", "")
    except Exception:
        return None  # the model error is reported by the pipeline itself
    if declared.startswith("size="):  # an image spec; other models declare tokenizers etc. in prose
        return ImagePreprocess.parse(declared)
    return None


def write_report(path: str | Path, data: str | dict[str, Any]) -> Path:
    """Write a JSON report atomically (temp file + rename): a crash never leaves half a report."""
    p = Path(path)
    text = data if isinstance(data, str) else json.dumps(data, indent=2, default=float)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text if text.endswith("\n") else text + "\n")
    tmp.replace(p)
    return p


@dataclass(frozen=True, kw_only=True)
class QatOptions:
    epochs: float = 1.0
    lr: float = 2e-5
    calib_size: Optional[int] = 128
    max_drop: Optional[float] = None
    reference: Optional[Path] = None     # the user's FP32 ONNX: the budget is against it, not the QAT export


@dataclass
class QatResult:
    qat: Any        # edgepack.quantize.qat.QATReport
    ptq: Any        # edgepack.quantize.QuantizeReport

    @property
    def exit_code(self) -> int:
        return self.ptq.exit_code

    def to_dict(self) -> dict[str, Any]:
        return {**self.ptq.to_dict(), "qat": dict(self.qat.__dict__)}


def qat_then_ptq(checkpoint: str | Path, hf_dir: str | Path, train: str | Path, target: Any, calib: Dataset,
                 evaluation: Dataset, output: str | Path, *, search: Dataset | None = None,
                 options: QatOptions = QatOptions(), progress: Any = None,
                 on_qat_step: Callable[[int, int], None] | None = None) -> QatResult:
    """Quantization-aware fine-tuning of a Hugging Face sequence classifier, exported to FP32 ONNX,
    then the full-INT8 PTQ pipeline on that export; the report is written next to ``output``."""
    from .qat import qat_sequence_classifier
    from .pipeline import QuantizeOptions, quantize

    with tempfile.TemporaryDirectory(prefix="edgepack-qat-") as td:
        onnx_path = Path(td) / "qat.onnx"
        qr = qat_sequence_classifier(hf_dir, checkpoint, Path(train), onnx_path, epochs=options.epochs,
                                     lr=options.lr, progress=on_qat_step)
        if progress is not None and hasattr(progress, "done"):
            progress.done()
        r = quantize(onnx_path, target, calib, evaluation, output, search=search, progress=progress,
                     options=QuantizeOptions(max_drop=options.max_drop, calib_size=options.calib_size,
                                             latency_threads=(1,), reference=options.reference))
    res = QatResult(qat=qr, ptq=r)
    write_report(Path(output).with_suffix(".json"), res.to_dict())
    return res




def stable_model_names(models: list[Path], name: str, folder: Path) -> list[Path]:
    """One model is carried in the bundle as ``NAME.onnx`` whatever its file is called here, so the
    next release's delta finds its base (boards match a delta's base file by its path in the bundle;
    ``model-v2.onnx`` against ``model.onnx`` would otherwise be sent whole). The file is linked (or
    copied) into ``folder`` under that name."""
    import os
    import shutil
    if len(models) != 1 or Path(models[0]).stem == name or not Path(models[0]).is_file():
        return list(models)
    src = Path(models[0])
    dst = Path(folder) / f"{name}{src.suffix}"
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return [dst]


__all__ = ["resolve_preprocessing", "write_report", "QatOptions", "QatResult", "qat_then_ptq", "stable_model_names"]
