"""Named errors of the device agent (install, slots, state, runtime, health check).

Bundle/trust errors come from ``errors.py`` (``OtaError``, exit code 5). Everything here is an
``AgentError`` with its own ``exit_code`` so scripts driving a board can branch on the code
without parsing text. The table is in docs/agent.md; keep both in step.
"""
from __future__ import annotations


class AgentError(Exception):
    """Base class of agent-side failures. ``exit_code`` is what ``edgepack-agent`` exits with."""

    exit_code = 1


class UsageError(AgentError):
    """Bad arguments or board configuration (board.json)."""

    exit_code = 2


class NotInitialized(AgentError):
    """The state directory has no board.json/state.json: run ``edgepack-agent init`` first."""

    exit_code = 3


class StateCorrupt(AgentError):
    """state.json cannot be parsed and no previous copy is usable (should never happen: atomic writes)."""

    exit_code = 3


class BudgetExceeded(AgentError):
    """The bundle does not fit the board's storage, free disk or RAM budget. Refused before writing."""

    exit_code = 6


class Incompatible(AgentError):
    """The bundle needs a runtime the board does not have, or a delta's base is not the active release."""

    exit_code = 6


class HealthCheckFailed(AgentError):
    """The trial of a new release failed (load, golden outputs or latency); the agent rolled back."""

    exit_code = 7


class RuntimeUnavailable(AgentError):
    """The requested runtime (onnxruntime, litert, openvino) is not installed on this board."""

    exit_code = 8


class AcceleratorUnavailable(RuntimeUnavailable):
    """A requested execution provider / delegate is not present. Never silently replaced by CPU."""

    exit_code = 8


class ModelLoadError(AgentError):
    """The runtime refused the model file (corrupt, unsupported operator, wrong format)."""

    exit_code = 8


class NoRollbackTarget(AgentError):
    """``rollback`` was asked for but no previous, hash-verified release is kept."""

    exit_code = 9


class ActiveSlotCorrupt(AgentError):
    """The active slot's files do not match their recorded hashes and no good slot is left."""

    exit_code = 9


class DiskFull(AgentError):
    """The disk filled up while writing; the partial slot was removed and the active release kept."""

    exit_code = 10


class Busy(AgentError):
    """Another agent process holds the board's lock (an install or trial is running)."""

    exit_code = 11


__all__ = ["Busy", "AgentError", "UsageError", "NotInitialized", "StateCorrupt", "BudgetExceeded", "Incompatible",
           "HealthCheckFailed", "RuntimeUnavailable", "AcceleratorUnavailable", "ModelLoadError",
           "NoRollbackTarget", "ActiveSlotCorrupt", "DiskFull"]
