"""Named fleet failures. Each message says what is wrong and what to do; ``exit_code`` is the CLI's.

| code | error |
|---|---|
| 2  | ``InventoryError`` (bad fleet file / arguments) |
| 20 | ``FleetError`` (other) |
| 21 | ``UnreachableBoard`` |
| 22 | ``AuthFailed`` |
| 23 | ``HostKeyRejected`` |
| 24 | ``TransferFailed`` / ``AgentCommandFailed`` (some boards failed, rollout not halted) |
| 25 | ``RolloutHalted`` |
| 26 | ``RegressionFound`` (``fleet check``) |
"""
from __future__ import annotations

from typing import Any

from ..errors import EdgepackError


class FleetError(EdgepackError):
    exit_code = 20


class InventoryError(FleetError):
    """The fleet file or a board entry is invalid."""

    exit_code = 2


class UnreachableBoard(FleetError):
    exit_code = 21


class AuthFailed(FleetError):
    exit_code = 22


class HostKeyRejected(FleetError):
    exit_code = 23


class TransferFailed(FleetError):
    exit_code = 24


class AgentCommandFailed(FleetError):
    """``edgepack-agent`` on the board exited non-zero; ``result`` holds its JSON and
    ``agent_error_type`` the agent's error type (e.g. ``HealthCheckFailed``)."""

    exit_code = 24

    def __init__(self, message: str, result: Any = None, agent_error_type: str | None = None):
        super().__init__(message)
        self.result = result
        self.agent_error_type = agent_error_type


class RolloutHalted(FleetError):
    exit_code = 25

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report


class RegressionFound(FleetError):
    exit_code = 26


__all__ = ["FleetError", "InventoryError", "UnreachableBoard", "AuthFailed", "HostKeyRejected", "TransferFailed",
           "AgentCommandFailed", "RolloutHalted", "RegressionFound"]
