"""Host-side control of a deployment: ``edgepack abort`` (stop a running push before its next
wave) and ``edgepack rollback`` (switch boards back to their kept previous release).

An abort is a small file beside the fleet's store (``fleet.db.abort``) holding the reason: the push
that runs from another terminal, cron or CI checks it before each wave, halts and reports it like
any halt. No daemon, no lock: the file is the request, the push removes it when it starts.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import AgentCommandFailed, FleetError
from .inventory import Board, Fleet
from .store import Store


def abort_file(store_path: str | Path) -> Path:
    p = Path(store_path)
    return p.with_name(p.name + ".abort")


def request_abort(store_path: str | Path, reason: str = "aborted by the operator") -> Path:
    """Ask the push using this store to stop before its next wave."""
    f = abort_file(store_path)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(reason.strip()[:500] + "\n")
    tmp.replace(f)
    return f


def abort_requested(store_path: str | Path) -> str | None:
    """The reason of a pending abort, or None."""
    f = abort_file(store_path)
    try:
        return f.read_text().strip() or "aborted by the operator"
    except OSError:
        return None


def clear_abort(store_path: str | Path) -> None:
    abort_file(store_path).unlink(missing_ok=True)


@dataclass
class RollbackResult:
    board: str
    ok: bool = False
    release_before: int | None = None
    release_after: int | None = None
    error: str | None = None
    exit_code: int = 0
    seconds: float = 0.0


def _rollback_one(b: Board, fleet: Fleet, reason: str, store: Store | None) -> RollbackResult:
    from .transport import open_transport
    r = RollbackResult(board=b.name)
    t0 = time.perf_counter()
    try:
        with open_transport(b, fleet) as t:
            st = t.agent("status", "--history", "0").json()
            a = st.get("active") if isinstance(st.get("active"), dict) else {}
            r.release_before = a.get("release") if isinstance(a.get("release"), int) else None
            res = t.agent("rollback", "--reason", f"edgepack rollback: {reason}")
            j = res.json()
            if store is not None:
                store.add(b.name, "rollback", j, ok=res.rc == 0)
            if res.rc != 0 or j.get("ok") is not True:
                e = j.get("error") if isinstance(j.get("error"), dict) else {}
                raise AgentCommandFailed(f"board {b.name}: rollback refused ({e.get('type')}): {e.get('message')}", j)
            act = j.get("active") if isinstance(j.get("active"), dict) else {}
            r.release_after = act.get("release") if isinstance(act.get("release"), int) else None
            r.ok = True
    except FleetError as e:
        r.error, r.exit_code = str(e), e.exit_code
    finally:
        r.seconds = round(time.perf_counter() - t0, 3)
    return r


def rollback(fleet: Fleet, boards: list[Board] | None = None, *, reason: str = "operator rollback",
             store: Store | None = None, concurrency: int = 8) -> list[RollbackResult]:
    """Switch each board back to the release it kept in its other slot (the agent's ``rollback``)."""
    boards = list(boards if boards is not None else fleet.boards)
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(boards)))) as ex:
        return list(ex.map(lambda b: _rollback_one(b, fleet, reason, store), boards))


def rollback_exit_code(results: list[RollbackResult]) -> int:
    codes = {r.exit_code or FleetError.exit_code for r in results if not r.ok}
    return 0 if not codes else (codes.pop() if len(codes) == 1 else FleetError.exit_code)


def to_json(results: list[RollbackResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]


__all__ = ["abort_file", "request_abort", "abort_requested", "clear_abort", "RollbackResult", "rollback",
           "rollback_exit_code"]
