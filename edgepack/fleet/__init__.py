"""Fleet over SSH: inventory, transports, staged rollouts, SQLite reports, monitoring, HTML report.

Public API::

    from edgepack.fleet import load_fleet, Fleet, push, Policy, Store, check, CheckPolicy, render_html, bootstrap
    fleet = load_fleet("fleet.toml")                 # or Fleet.default(): one local board
    with Store(fleet.store) as st:
        rep = push("r7.bundle", fleet, policy=Policy(canary=2, wave_size="25%"), store=st)
        print(rep.exit_code, rep.bytes_sent, [b.result for b in rep.boards])
"""
from .bootstrap import BootstrapResult, bootstrap
from .errors import (AgentCommandFailed, AuthFailed, FleetError, HostKeyRejected, InventoryError, RegressionFound,
                     RolloutHalted, TransferFailed, UnreachableBoard)
from .inventory import Board, Fleet, load_fleet
from .monitor import BoardCheck, CheckPolicy, CheckReport, Flag, check
from .push import BoardResult, Policy, PushReport, Release, load_release, plan_waves, push
from .report import render_html
from .status import BoardStatus, status
from .store import Store
from .transport import LocalTransport, SSHTransport, Transport, open_transport, send_file

__all__ = ["Board", "Fleet", "load_fleet", "Transport", "LocalTransport", "SSHTransport", "open_transport", "send_file",
           "Policy", "Release", "load_release", "plan_waves", "push", "PushReport", "BoardResult", "Store", "check",
           "CheckPolicy", "CheckReport", "BoardCheck", "Flag", "render_html", "bootstrap", "BootstrapResult", "status", "BoardStatus",
           "FleetError", "InventoryError", "UnreachableBoard", "AuthFailed", "HostKeyRejected", "TransferFailed",
           "AgentCommandFailed", "RolloutHalted", "RegressionFound"]
