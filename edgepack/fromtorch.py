"""PyTorch models in: a ``torch.export`` program (``.pt2``) becomes the FP32 ONNX model every
quantize path starts from, checked against PyTorch's own outputs.

Why ``.pt2`` and ONNX: ``torch.export.save`` is PyTorch's deployable artifact (a graph and its
weights, no Python class needed to load it), and ONNX is what edgepack's search, its judge and
its LiteRT translation read; so ``edgepack quantize model.pt2 --format tflite`` is
PyTorch -> ONNX -> full-integer ``.tflite`` with the same search as an ONNX user gets. The
alternative route, litert-torch's PT2E quantizer, leaves residual ADDs in fp32 (measured on
EfficientNet-Lite0, issue 14) and pins its own torch with CUDA wheels.

The export is checked, not trusted: the ONNX file is run in ONNX Runtime on the program's own
example inputs and its outputs must match PyTorch's within ``tolerance`` (relative to the
outputs' scale); otherwise nothing is written and the error gives the measured difference.
Host-only: torch is the ``torch`` extra (``scripts/setup.sh`` installs it), never on a board.
A ``.pt2`` is loaded by PyTorch: load only models you trust, like any model file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import ModelError, UsageError

__all__ = ["TorchExport", "export_pt2"]

TORCH_EXTRA = "pip install -e '.[torch]' (or bash scripts/setup.sh)"
OPSET = 18


@dataclass(frozen=True)
class TorchExport:
    """What the export did and how closely the ONNX model reproduces PyTorch."""

    source: str
    onnx: str
    torch_version: str
    opset: int
    inputs: list[str]
    max_abs_error: float        # ONNX Runtime vs PyTorch on the program's example inputs
    output_scale: float         # max |PyTorch output| there: the error's yardstick
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _torch():
    try:
        import torch
    except ImportError:
        raise UsageError(f"reading a PyTorch .pt2 model needs PyTorch on this host: {TORCH_EXTRA}") from None
    return torch


@contextlib.contextmanager
def _quiet():
    """PyTorch's loader and exporter log warnings with tracebacks and print progress on stdout;
    edgepack reports what matters in one line (and keeps stdout for --json)."""
    names = ("torch", "torch.export", "torch.onnx", "onnxscript")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lv in zip(names, levels):
            logging.getLogger(n).setLevel(lv)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]


def _load(torch, src: Path):
    if not src.is_file():
        raise ModelError(f"model {src}: no such file")
    try:
        return torch.export.load(str(src))
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign archive: one line, no traceback
        raise ModelError(f"{src} is not a torch.export program (.pt2 from torch.export.save): "
                         f"{_first_line(e)}") from None


def _examples(ep) -> tuple:
    args, kwargs = ep.example_inputs or ((), {})
    if kwargs or not args or not all(hasattr(a, "detach") for a in args):
        raise ModelError("the .pt2 program must take its inputs as tensors, positionally, with example inputs "
                         "saved (torch.export.export(model, (x,)))")
    return tuple(a.detach() for a in args)


def export_pt2(src: str | Path, dst: str | Path, *, tolerance: float = 1e-4, opset: int = OPSET) -> TorchExport:
    """Write ``src`` (a ``torch.export`` program) as an FP32 ONNX model at ``dst``, atomically."""
    import onnx
    import onnxruntime as ort

    torch = _torch()
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    with _quiet():
        ep = _load(torch, src)
    x = _examples(ep)
    names = ["input"] if len(x) == 1 else [f"input_{i}" for i in range(len(x))]
    with torch.no_grad():
        ref = ep.module()(*x)
    ref = [ref] if hasattr(ref, "detach") else list(ref)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.stem}-", suffix=".onnx")
    os.close(fd)
    try:
        try:
            with _quiet():
                torch.onnx.export(ep, x, tmp, dynamo=True, opset_version=opset, input_names=names,
                                  output_names=["logits"] if len(ref) == 1 else None, external_data=False,
                                  verbose=False)
        except Exception as e:  # noqa: BLE001 - the exporter's failures are many; the first line says which
            raise ModelError(f"{src}: PyTorch's ONNX exporter failed: {_first_line(e)}") from None
        m = onnx.load(tmp)
        dims = m.graph.input[0].type.tensor_type.shape.dim
        if not (dims and dims[0].dim_param):
            raise ModelError(f"{src}: the program's batch size is fixed; edgepack evaluates in batches: export it "
                             "with a dynamic batch (example batch of 2, dynamic_shapes={'x': {0: Dim.AUTO}})")
        p = m.metadata_props.add()
        p.key, p.value = "edgepack.source", f"{src.name} (torch.export, torch {torch.__version__})"
        onnx.save(m, tmp)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(tmp, so, providers=["CPUExecutionProvider"])
        got = sess.run(None, {n: a.numpy() for n, a in zip(names, x)})
        want = [r.detach().numpy() for r in ref]
        err = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
        scale = max(float(np.max(np.abs(w))) for w in want)
        if not err <= tolerance * max(scale, 1.0):
            raise ModelError(f"{src}: the ONNX export differs from PyTorch by {err:.3g} (outputs up to {scale:.3g}); "
                             "not written: check the model's export with torch.onnx.export")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return TorchExport(source=str(src), onnx=str(dst), torch_version=torch.__version__, opset=opset, inputs=names,
                       max_abs_error=err, output_scale=scale, seconds=round(time.perf_counter() - t0, 2))
