"""Simulated boards for the fleet tests: one private Debian OpenSSH sshd per board on 127.0.0.1
(own host key, port, PidFile, state directory), a client key, fleet files and known_hosts.

The "board" runs commands as the current user; its agent is this venv's Python running
``-m device_agent`` (or the zipapp after ``fleet bootstrap``) with ``--state`` pointing at the
board's own state directory. Only loopback addresses are used (and, for the slow-link test,
addresses inside our own network namespace).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SSHD = "/usr/sbin/sshd"


def have_sshd() -> bool:
    return Path(SSHD).is_file() and os.access(SSHD, os.X_OK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str = "edgepack-test") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True,
                   capture_output=True)
    return path


@dataclass
class Sshd:
    dir: Path
    port: int
    authorized_keys: Path
    listen: str = "127.0.0.1"
    netns: str | None = None
    proc: subprocess.Popen | None = None
    host_key: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host_key = self.dir / "host_ed25519"
        if not self.host_key.exists():
            keygen(self.host_key, "board-host-key")
        self.config = self.dir / "sshd_config"
        self.config.write_text(f"""Port {self.port}
ListenAddress {self.listen}
HostKey {self.host_key}
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.authorized_keys}
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
LogLevel ERROR
MaxStartups 200:30:400
MaxSessions 64
UseDNS no
""")

    def host_key_line(self) -> str:
        """known_hosts line for this board."""
        kt, b64 = self.host_key.with_suffix(".pub").read_text().split()[:2]
        host = self.listen if self.port == 22 else f"[{self.listen}]:{self.port}"
        return f"{host} {kt} {b64}"

    def start(self, timeout: float = 10.0) -> "Sshd":
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        cmd = [SSHD, "-D", "-e", "-f", str(self.config)]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.dir / "sshd.log", "ab"),
                                     start_new_session=True)
        t_end = time.time() + timeout
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited ({self.proc.returncode}): {(self.dir / 'sshd.log').read_text()[-800:]}")
            try:
                with socket.create_connection((self.listen, self.port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"SSH"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd on port {self.port} did not come up")

    def kill(self) -> None:
        """SIGKILL the listener and every per-connection process it forked (its session group)."""
        if self.proc is None:
            return
        import psutil
        try:  # per-connection sshd processes call setsid(): find them as descendants, not by group
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in [*procs]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.proc = None

    stop = kill

    def restart(self) -> "Sshd":
        self.kill()
        return self.start()


@dataclass
class SimBoard:
    name: str
    sshd: Sshd
    state: Path
    incoming: Path


def agent_cmd() -> str:
    # PYTHONPATH: the board runs this checkout's agent, not whatever the venv has installed
    return f"env PYTHONPATH={shlex.quote(str(Path(__file__).resolve().parents[1]))} {sys.executable} -m device_agent"


def make_boards(root: Path, n: int, client_pub: Path, prefix: str = "b") -> list[SimBoard]:
    out = []
    for i in range(n):
        d = root / f"{prefix}{i}"
        s = Sshd(d / "sshd", free_port(), client_pub)
        out.append(SimBoard(f"{prefix}{i}", s, d / "state", d / "incoming"))
    return out


def write_known_hosts(path: Path, boards: list[SimBoard]) -> Path:
    path.write_text("".join(b.sshd.host_key_line() + "\n" for b in boards))
    return path


def fleet_toml(path: Path, boards: list[SimBoard], *, key: Path, known_hosts: Path, store: Path | None = None,
               tofu: bool = False, extra: dict[str, dict[str, Any]] | None = None, agent: str | None = None,
               python: str | None = None, latency_budget_ms: float | None = None) -> Path:
    import getpass
    lines = ["[fleet]", f'known_hosts = "{known_hosts}"', f"trust_on_first_use = {'true' if tofu else 'false'}",
             'ssh_config = ""', f'store = "{store or path.with_suffix(".db")}"', "", "[defaults]",
             f'user = "{getpass.getuser()}"', f'key = "{key}"', 'target = "rpi4-2gb"', "connect_timeout = 5"]
    if agent is not None or python is None:
        lines.append(f'agent = "{agent or agent_cmd()}"')
    if python:
        lines.append(f'python = "{python}"')
    if latency_budget_ms is not None:
        lines.append(f"latency_budget_ms = {latency_budget_ms}")
    for i, b in enumerate(boards):
        lines += ["", "[[boards]]", f'name = "{b.name}"', f'host = "{b.sshd.listen}"', f"port = {b.sshd.port}",
                  f'state = "{b.state}"', f'incoming = "{b.incoming}"',
                  f'groups = [{", ".join(repr(g) for g in (["canary"] if i < 2 else []) + ["all-boards"])}]'.replace("'", '"'),
                  f'tags = {{ rack = "r{i % 2}" }}']
        for k, v in (extra or {}).get(b.name, {}).items():
            lines.append(f"{k} = {v!r}".replace("'", '"') if not isinstance(v, bool) else f"{k} = {str(v).lower()}")
    path.write_text("\n".join(lines) + "\n")
    return path
