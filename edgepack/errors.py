"""Every failure edgepack reports has a named exception; the CLI prints it as one line.

Messages say what is wrong and, where there is one, what to do about it.
"""
from __future__ import annotations


class EdgepackError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(EdgepackError):
    exit_code = 2


class AssetMissing(EdgepackError):
    exit_code = 3


class TargetError(EdgepackError):
    """A board profile is unknown or invalid."""

    exit_code = 2


class ModelError(EdgepackError):
    """The model file is not what the operation needs (not ONNX, already quantized, ...)."""

    exit_code = 2


class DataError(EdgepackError):
    """Calibration or evaluation data is missing, empty or does not fit the model."""

    exit_code = 2


class BudgetNotMet(EdgepackError):
    """The accuracy or latency budget could not be met (raised only when asked to refuse)."""

    exit_code = 4


class BoardMismatch(EdgepackError):
    """The board's own figure (``quantize --confirm-on``) differs from the host's prediction of it
    by more than the allowed number of samples: the host-side numerics model is wrong for it."""

    exit_code = 5
