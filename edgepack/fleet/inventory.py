"""The fleet file (TOML): which boards exist, how to reach them, what they may spend.

```toml
[fleet]
known_hosts = "~/.ssh/known_hosts"   # host keys are checked against this file
trust_on_first_use = false           # true: accept and record an UNKNOWN host key (a changed one is always refused)
ssh_config = "~/.ssh/config"         # HostName / Port / User / IdentityFile / ProxyCommand are honoured
store = "fleet.db"                   # SQLite reports (relative to this file)

[defaults]                           # any board key
user = "pi"
key = "~/.ssh/id_ed25519"
target = "rpi4-2gb"
python = "python3"                   # the board's interpreter (it runs the agent zipapp)

[[boards]]
name = "cam-01"
host = "cam-01.lan"                  # or an alias from ~/.ssh/config
groups = ["canary", "site-a"]
tags = { site = "a" }
latency_budget_ms = 40
ram_budget_mb = 256
```

A board with ``transport = "local"`` is the agent as a subprocess on this machine with its own
state directory (``state``); ``Fleet.default()`` is one such board, the embedded default.
"""
from __future__ import annotations

import os
import re
import sys
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import InventoryError

DEFAULT_HOME = ".edgepack"  # per project: local boards and the default store live here
REMOTE_BASE = ".edgepack"  # on a board, relative to the login directory


@dataclass
class Board:
    name: str
    host: str = ""
    transport: str = "ssh"  # ssh | local
    kind: str = "board"  # board | emulated-aarch64 (the agent under qemu-user here; see fleet/emulated.py)
    port: int | None = None
    user: str | None = None
    key: str | None = None
    target: str = "rpi4-2gb"  # the shipped default board profile (targets/rpi4-2gb.toml)
    groups: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    python: str = "python3"
    agent: str | None = None  # full remote agent command; default: "{python} {agent_path}"
    agent_path: str = f"{REMOTE_BASE}/edgepack-agent.pyz"
    state: str = f"{REMOTE_BASE}/state"
    incoming: str = f"{REMOTE_BASE}/incoming"
    env: dict[str, str] = field(default_factory=dict)  # extra environment for agent commands
    latency_budget_ms: float | None = None
    ram_budget_mb: float | None = None
    storage_mb: float | None = None
    threads: int | None = None
    runtimes: list[str] = field(default_factory=list)
    trial_runs: int | None = None
    trial_in_process: bool = False
    connect_timeout: float = 10.0

    def agent_argv(self) -> list[str]:
        """The agent command as argv (before ``--state``)."""
        import shlex
        if self.transport == "local" and not self.agent and self.kind == "board":
            return [sys.executable, "-m", "device_agent"]
        return shlex.split(self.agent) if self.agent else [self.python, self.agent_path]

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Fleet:
    boards: list[Board]
    path: Path | None = None
    known_hosts: Path = Path("~/.ssh/known_hosts")
    trust_on_first_use: bool = False
    ssh_config: Path | None = Path("~/.ssh/config")
    store: Path = Path(DEFAULT_HOME) / "fleet.db"

    def board(self, name: str) -> Board:
        for b in self.boards:
            if b.name == name:
                return b
        raise InventoryError(f"no board named {name!r} in the fleet ({', '.join(b.name for b in self.boards)})")

    def select(self, group: str | None = None, names: list[str] | None = None) -> list[Board]:
        """Boards in ``group`` (a group name, a tag ``key=value`` or ``all``), optionally by name."""
        out = list(self.boards)
        if group and group != "all":
            if "=" in group:
                k, v = group.split("=", 1)
                out = [b for b in out if b.tags.get(k) == v]
            else:
                out = [b for b in out if group in b.groups]
            if not out:
                raise InventoryError(f"no board is in group {group!r}; groups in the fleet file: "
                                     f"{sorted({g for b in self.boards for g in b.groups}) or 'none'}")
        if names:
            out = [self.board(n) for n in names]
        return out

    @classmethod
    def default(cls, home: str | Path | None = None) -> "Fleet":
        """The embedded default: one local board (the agent as a subprocess, own state dir), and the
        emulated Raspberry Pi 4 ``rpi4-emu`` when its emulator is installed (``EDGEPACK_EMULATED_BOARD=0``
        leaves it out)."""
        h = Path(home or os.environ.get("EDGEPACK_FLEET_HOME") or DEFAULT_HOME)
        b = Board(name="local", host="localhost", transport="local", state=str(h / "boards" / "local" / "state"),
                  incoming=str(h / "boards" / "local" / "incoming"), trial_in_process=True,
                  # it stands in for the shipped boards, which compute INT8 exactly: not this host's
                  # kernels (which saturate u8 x s8 pair sums on AVX2 without VNNI); device_agent.runtime
                  env={"EDGEPACK_AGENT_INT8": "exact"})
        from .emulated import default_emulated_boards  # the emulated Pi 4, when scripts/arm-board.sh built it
        return cls(boards=[b, *(Board(**d) for d in default_emulated_boards(h))], path=None, store=h / "fleet.db", ssh_config=None)


_BOARD_KEYS = {f.name for f in fields(Board)}
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def valid_env_key(k: object) -> bool:
    """An environment variable name (full match: no `;`, spaces, `=` or newline can ride along)."""
    return isinstance(k, str) and _ENV_KEY.fullmatch(k) is not None
_FLEET_KEYS = {"known_hosts", "trust_on_first_use", "ssh_config", "store"}


def _expand(p: str | Path, base: Path) -> Path:
    q = Path(os.path.expanduser(str(p)))
    return q if q.is_absolute() else base / q


def load_fleet(path: str | Path) -> Fleet:
    """Parse and validate a fleet file. Errors name the board and the key."""
    p = Path(path)
    if not p.is_file():
        raise InventoryError(f"fleet file {p} not found; write one (see docs/fleet.md) or omit --fleet for the local board")
    try:
        doc = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InventoryError(f"fleet file {p} is not valid TOML: {e}") from None
    base = p.resolve().parent
    unknown = set(doc) - {"fleet", "defaults", "boards"}
    if unknown:
        raise InventoryError(f"{p}: unknown section(s) {sorted(unknown)}; expected [fleet], [defaults], [[boards]]")
    fl = doc.get("fleet", {})
    bad = set(fl) - _FLEET_KEYS
    if bad:
        raise InventoryError(f"{p}: unknown key(s) in [fleet]: {sorted(bad)} (known: {sorted(_FLEET_KEYS)})")
    defaults = doc.get("defaults", {})
    bad = set(defaults) - _BOARD_KEYS
    if bad:
        raise InventoryError(f"{p}: unknown key(s) in [defaults]: {sorted(bad)}")
    rows = doc.get("boards", [])
    if not isinstance(rows, list) or not rows:
        raise InventoryError(f"{p}: no boards; add at least one [[boards]] table with name and host")
    boards: list[Board] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        d = {**defaults, **row}
        where = f"{p}: board #{i + 1} ({d.get('name', '?')})"
        bad = set(d) - _BOARD_KEYS
        if bad:
            raise InventoryError(f"{where}: unknown key(s) {sorted(bad)}")
        if not isinstance(d.get("name"), str) or not d["name"]:
            raise InventoryError(f"{where}: every board needs a name")
        if d["name"] in seen:
            raise InventoryError(f"{where}: board name {d['name']!r} appears twice")
        seen.add(d["name"])
        if d.get("kind", "board") != "board":
            from .emulated import board_from_fleet_row  # an emulated board: local files, qemu python
            d = board_from_fleet_row(d, where, base, DEFAULT_HOME)
        d.setdefault("transport", "ssh")
        if d["transport"] not in ("ssh", "local"):
            raise InventoryError(f"{where}: transport must be 'ssh' or 'local', not {d['transport']!r}")
        if d["transport"] == "ssh" and not d.get("host"):
            raise InventoryError(f"{where}: an ssh board needs a host")
        if d["transport"] == "local":
            d.setdefault("state", str(Path(DEFAULT_HOME) / "boards" / d["name"] / "state"))
            d.setdefault("incoming", str(Path(DEFAULT_HOME) / "boards" / d["name"] / "incoming"))
            d["state"] = str(_expand(d["state"], base))
            d["incoming"] = str(_expand(d["incoming"], base))
        if d.get("key"):
            d["key"] = str(_expand(d["key"], base))
        for k, typ in (("port", int), ("groups", list), ("tags", dict), ("env", dict), ("runtimes", list)):
            if k in d and d[k] is not None and not isinstance(d[k], typ):
                raise InventoryError(f"{where}: {k} must be a {typ.__name__}")
        for k in ("latency_budget_ms", "ram_budget_mb", "storage_mb", "connect_timeout"):
            if k in d and d[k] is not None and not isinstance(d[k], (int, float)):
                raise InventoryError(f"{where}: {k} must be a number")
        d["tags"] = {str(k): str(v) for k, v in d.get("tags", {}).items()}
        bad_env = [k for k in d.get("env", {}) if not valid_env_key(k)]
        if bad_env:
            raise InventoryError(f"{where}: env key {str(bad_env[0])[:60]!r} is not a variable name "
                                 "([A-Za-z_][A-Za-z0-9_]*); it would reach the board's shell")
        if not all(isinstance(v, (str, int, float, bool)) for v in d.get("env", {}).values()):
            raise InventoryError(f"{where}: env values must be strings or numbers")
        d["env"] = {str(k): str(v) for k, v in d.get("env", {}).items()}
        boards.append(Board(**d))
    tofu = fl.get("trust_on_first_use", False)
    if not isinstance(tofu, bool):
        raise InventoryError(f"{p}: [fleet] trust_on_first_use must be true or false")
    sc = fl.get("ssh_config", "~/.ssh/config")
    return Fleet(boards=boards, path=p, known_hosts=_expand(fl.get("known_hosts", "~/.ssh/known_hosts"), base),
                 trust_on_first_use=tofu, ssh_config=_expand(sc, base) if sc else None,
                 store=_expand(fl.get("store", p.stem + ".db"), base))


@dataclass
class SshTarget:
    """Where and how to connect, after ~/.ssh/config (fleet-file values win, as on ssh's command line)."""

    hostname: str
    port: int
    user: str
    key_files: list[str]
    known_hosts: list[Path]
    proxy_command: str | None
    timeout: float
    accept_new: bool  # StrictHostKeyChecking accept-new in ssh config: an explicit TOFU opt-in


def resolve_ssh(board: Board, fleet: Fleet) -> SshTarget:
    import getpass

    import paramiko
    cfg: dict[str, Any] = {}
    if fleet.ssh_config is not None:
        sc = Path(os.path.expanduser(str(fleet.ssh_config)))
        if sc.is_file():
            try:
                cfg = dict(paramiko.SSHConfig.from_path(str(sc)).lookup(board.host))
            except Exception as e:  # paramiko raises plain exceptions for bad config lines
                raise InventoryError(f"cannot parse ssh config {sc}: {e}; fix it or set [fleet] ssh_config = \"\"") from None
    hostname = cfg.get("hostname", board.host)
    port = board.port or int(cfg.get("port", 22))
    user = board.user or cfg.get("user") or getpass.getuser()
    keys = [board.key] if board.key else [os.path.expanduser(k) for k in cfg.get("identityfile", [])]
    kh = [Path(os.path.expanduser(str(fleet.known_hosts)))]
    for extra in str(cfg.get("userknownhostsfile", "")).split():
        q = Path(os.path.expanduser(extra))
        if q not in kh:
            kh.append(q)
    to = float(cfg.get("connecttimeout", board.connect_timeout))
    return SshTarget(hostname=hostname, port=port, user=user, key_files=keys, known_hosts=kh,
                     proxy_command=cfg.get("proxycommand"), timeout=to,
                     accept_new=str(cfg.get("stricthostkeychecking", "")).lower() == "accept-new")


def with_overrides(board: Board, **kw: Any) -> Board:
    return replace(board, **kw)


__all__ = ["Board", "Fleet", "load_fleet", "resolve_ssh", "SshTarget"]
