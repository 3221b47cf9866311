"""The host's one owner of the host-to-agent protocol: typed calls, validated replies, one error.

Every ``edgepack-agent`` command prints one JSON object (``{"ok": true, ...}`` or
``{"ok": false, "error": {"type", "message", "exit_code"}}``; device_agent/cli.py). A board is
outside the trust boundary, so its reply is checked here against the fields the host relies
on, per command, before anything reads it: a wrong-typed field makes the reply a ``BadReply``
error, never a KeyError three modules away. Callers get an :class:`AgentReply` (the exit code,
the object, the parsed :class:`AgentError`) or, with ``require()``, ``AgentCommandFailed``
carrying the agent's error type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from device_agent.wire.encoding import safe_text

from .errors import AgentCommandFailed
from .store import figures
from .transport import Transport

_NONE = type(None)
# command -> {field: allowed types} that an ok reply must carry
REPLY_SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "version": {"agent_version": (str,)},
    "init": {},
    "status": {"active": (dict, _NONE)},
    "install": {"status": (str,), "release": (int,)},
    "rollback": {"active": (dict, _NONE)},
    "eval": {"comparison": (dict, _NONE)},
    "bench": {"latency": (dict,)},
    "recover": {},
}


@dataclass(frozen=True)
class AgentError:
    """The agent's error object, made safe: bounded, control characters escaped."""

    type: str
    message: str
    exit_code: int | None = None

    @classmethod
    def from_reply(cls, obj: Any) -> "AgentError":
        e = obj.get("error") if isinstance(obj, dict) else None
        e = e if isinstance(e, dict) else {}
        code = e.get("exit_code")
        return cls(type=safe_text(e.get("type") or "UnknownError", 60), message=safe_text(e.get("message") or ""),
                   exit_code=code if isinstance(code, int) and not isinstance(code, bool) else None)


def agent_error(obj: Any) -> AgentError:
    """The error in an agent reply (``UnknownError`` with an empty message when there is none)."""
    return AgentError.from_reply(obj)


@dataclass(frozen=True)
class AgentReply:
    command: str
    rc: int
    data: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.data.get("ok") is True

    @property
    def error(self) -> AgentError:
        return AgentError.from_reply(self.data)

    def figures(self) -> dict[str, Any]:
        """Release, p90, drift, top-1, peak RSS (store.figures: each None when missing or mistyped)."""
        return figures(self.command, self.data)


def validate(command: str, rc: int, obj: Any) -> dict[str, Any]:
    """The reply as a dict the host may read; a malformed one becomes a ``BadReply`` error object."""
    if not isinstance(obj, dict):
        return {"ok": False, "error": {"type": "BadReply", "message": f"reply is not a JSON object: {str(obj)[:200]}"}}
    if rc == 0 and obj.get("ok") is True:
        for field, types in REPLY_SCHEMAS.get(command, {}).items():
            v = obj.get(field)
            if not isinstance(v, types) or isinstance(v, bool) and bool not in types:
                return {"ok": False, "command": command,
                        "error": {"type": "BadReply", "message": f"agent {command} reply has no valid {field!r}"}}
    return obj


class AgentClient:
    """Typed calls to ``edgepack-agent`` over any Transport (SSH, local, emulated)."""

    def __init__(self, transport: Transport, *, timeout: float | None = None,
                 record: Callable[[str, dict[str, Any], bool], None] | None = None):
        self.t = transport
        self.timeout = timeout
        self.record = record  # called with (kind, reply data, ok) for the store

    def call(self, command: str, *args: str, timeout: float | None = None) -> AgentReply:
        res = self.t.agent(command, *args, timeout=timeout or self.timeout)
        data = validate(command, res.rc, res.json())
        reply = AgentReply(command, res.rc, data)
        if self.record is not None and command in ("status", "install", "rollback", "eval", "bench"):
            self.record(command, data, reply.ok)
        return reply

    def require(self, reply: AgentReply, what: str = "") -> AgentReply:
        """The reply if ok, else AgentCommandFailed naming the board, the command and the agent's error."""
        if reply.ok:
            return reply
        e = reply.error
        raise AgentCommandFailed(f"board {self.t.board.name}: agent {what or reply.command} failed "
                                 f"({e.type}, exit {reply.rc}): {e.message}", reply.data, agent_error_type=e.type)

    # the commands the host uses
    def version(self) -> AgentReply:
        return self.call("version")

    def status(self, history: int = 0) -> AgentReply:
        return self.call("status", "--history", str(history))

    def install(self, remote_bundle: str) -> AgentReply:
        return self.call("install", remote_bundle)

    def rollback(self, reason: str) -> AgentReply:
        return self.call("rollback", "--reason", reason)

    def eval(self, *args: str) -> AgentReply:
        return self.call("eval", *args)

    def bench(self, runs: int, warmup: int) -> AgentReply:
        return self.call("bench", "--runs", str(runs), "--warmup", str(warmup))

    def init(self, *args: str) -> AgentReply:
        return self.call("init", *args)


__all__ = ["AgentClient", "AgentReply", "AgentError", "agent_error", "validate", "REPLY_SCHEMAS"]
