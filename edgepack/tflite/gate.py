"""The full-integer gate: a board that runs INT8 only gets no float tensor and no float op.

A LiteRT NPU delegate (NNAPI, QNN, ...) takes an op only when all its tensors are integer; a
float op falls back to the CPU (or, on an INT8-only board, is not run at all). So the gate reads
the file itself (:func:`edgepack.tflite.read_tflite`) and names each float op and where it sits,
instead of trusting the converter's settings.
"""
from __future__ import annotations

from ..errors import ModelError
from .inspect import TfliteInfo


class FloatOpsRefused(ModelError):
    """A .tflite for an INT8-only target still computes in float somewhere."""

    exit_code = 4


def requires_full_integer(target) -> bool:
    """Whether ``target`` runs INT8 only: no float fallback in its policy."""
    return not target.float_allowed


def float_findings(info: TfliteInfo) -> list[str]:
    """Every float op (``OP#index (in dtypes -> out dtypes)``), then float I/O tensors, in graph order."""
    found = [f"{o.op}#{o.index} ({'/'.join(o.input_dtypes) or '-'} -> {'/'.join(o.output_dtypes) or '-'}, "
             f"output {info.tensors[o.outputs[0]].name if o.outputs else '?'})" for o in info.float_ops]
    for t in info.inputs + info.outputs:
        if t.dtype not in ("int8", "uint8", "int16", "int32"):
            found.append(f"{t.dtype} model {'input' if t in info.inputs else 'output'} {t.name}")
    return found


def check_full_integer(info: TfliteInfo, target, *, required: bool = False) -> None:
    """Raise FloatOpsRefused naming the float ops when ``target`` runs INT8 only (or ``required``)."""
    if not (required or requires_full_integer(target)):
        return
    bad = float_findings(info)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        why = f"target {target.name} runs INT8 only" if requires_full_integer(target) else "full integer was required"
        raise FloatOpsRefused(f"{info.path}: {why}, but {len(bad)} float op(s)/tensor(s) "
                              f"remain: {'; '.join(bad[:5])}{more}; quantize them (edgepack quantize --format tflite) "
                              "or choose a target that allows float")


__all__ = ["check_full_integer", "float_findings", "requires_full_integer", "FloatOpsRefused"]
