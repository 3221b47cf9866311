"""``edgepack fleet bootstrap``: copy the agent (zipapp) and the trust root onto boards, check it
runs there (``version``), and initialise the board (``init`` with the fleet file's budgets)."""
from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agent_client import agent_error
from .errors import AuthFailed, FleetError, HostKeyRejected, InventoryError, TransferFailed, UnreachableBoard
from .inventory import Board, Fleet
from .store import Store
from .transport import Transport, open_transport


@dataclass
class BootstrapResult:
    board: str
    ok: bool = False
    copied_agent: bool = False
    agent_bytes: int = 0
    agent_version: str | None = None
    python: str | None = None
    runtimes: dict[str, Any] = field(default_factory=dict)
    initialised: bool = False
    seconds: float = 0.0
    error: str | None = None
    exit_code: int = 0  # the failure's own code (23: unknown host key, 21: unreachable, ...)


def _put(t: Transport, local: Path, remote: str) -> int:
    d = remote.rsplit("/", 1)[0] if "/" in remote else "."
    t.makedirs(d)
    n = t.put(local, remote + ".part")
    t.rename(remote + ".part", remote)
    return n


def _init_args(b: Board, root_remote: str, rk_remote: str | None, force: bool) -> list[str]:
    a = ["init", "--target", b.target, "--trust-root", root_remote]
    if rk_remote:
        a += ["--release-keys", rk_remote]
    for flag, v in (("--ram-mb", b.ram_budget_mb), ("--storage-mb", b.storage_mb), ("--threads", b.threads),
                    ("--latency-budget-ms", b.latency_budget_ms), ("--trial-runs", b.trial_runs)):
        if v is not None:
            a += [flag, str(v)]
    for r in b.runtimes:
        a += ["--runtime", r]
    if b.trial_in_process:
        a.append("--trial-in-process")
    if force:
        a.append("--force")
    return a


def bootstrap(fleet: Fleet, boards: list[Board] | None = None, *, trust_root: str | Path,
              release_keys: str | Path | None = None, force: bool = False, concurrency: int = 8,
              store: Store | None = None) -> list[BootstrapResult]:
    from .agent_zipapp import build_zipapp
    trust_root = Path(trust_root)
    if not trust_root.is_file():
        raise InventoryError(f"trust root {trust_root} not found; it is the root.json made by `edgepack keys init`")
    if release_keys is not None and not Path(release_keys).is_file():
        raise InventoryError(f"release keys {release_keys} not found")
    boards = list(boards if boards is not None else fleet.boards)
    with tempfile.TemporaryDirectory(prefix="edgepack-bootstrap-") as td:
        pyz = build_zipapp(Path(td) / "edgepack-agent.pyz").path

        def one(b: Board) -> BootstrapResult:
            r = BootstrapResult(board=b.name)
            t0 = time.perf_counter()
            t = open_transport(b, fleet)
            try:
                t.connect()
                if (b.transport == "ssh" or b.kind != "board") and not b.agent:  # emulated: the real zipapp too
                    r.agent_bytes = _put(t, pyz, b.agent_path)
                    r.copied_agent = True
                t.makedirs(b.incoming)
                root_remote = f"{b.incoming.rstrip('/')}/root.json"
                _put(t, trust_root, root_remote)
                rk_remote = None
                if release_keys is not None:
                    rk_remote = f"{b.incoming.rstrip('/')}/release-keys.json"
                    _put(t, Path(release_keys), rk_remote)
                v = t.agent("version")
                vj = v.json()
                if v.rc != 0 or not vj.get("ok"):
                    raise FleetError(f"board {b.name}: the agent does not run there (exit {v.rc}): "
                                     f"{agent_error(vj).message or v.stderr.strip()[-300:]}; "
                                     f"check `python` in the fleet file (the board needs Python 3.10+, numpy, "
                                     f"cryptography, backports.zstd and a runtime)")
                r.agent_version, r.python, r.runtimes = vj.get("agent_version"), vj.get("python"), vj.get("runtimes", {})
                if store is not None:
                    store.add(b.name, "version", vj)
                i = t.agent(*_init_args(b, root_remote, rk_remote, force))
                ij = i.json()
                if i.rc != 0:
                    raise FleetError(f"board {b.name}: agent init failed: {agent_error(ij).message}")
                r.initialised = True
                r.ok = True
            except (FleetError, UnreachableBoard, AuthFailed, HostKeyRejected, TransferFailed) as e:
                r.error, r.exit_code = str(e), e.exit_code
            finally:
                t.close()
                r.seconds = round(time.perf_counter() - t0, 3)
            return r

        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(boards)))) as ex:
            return list(ex.map(one, boards))


def exit_code(results: list[BootstrapResult]) -> int:
    """0 when every board is ready; the failures' own code when they agree (23 for an unknown host
    key, as documented), else FleetError's 20."""
    codes = {r.exit_code or FleetError.exit_code for r in results if not r.ok}
    return 0 if not codes else (codes.pop() if len(codes) == 1 else FleetError.exit_code)


__all__ = ["bootstrap", "BootstrapResult", "exit_code"]
