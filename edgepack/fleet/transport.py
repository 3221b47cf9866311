"""How the host talks to a board: run a command, put a file (resumable, at an offset), get a file.

``Transport`` is the small abstract interface (in the spirit of TUF's FetcherInterface); the rest
of the fleet code only uses it, so a new way of reaching boards is one class:

* ``LocalTransport``: the agent as a subprocess on this machine, its own state directory. The
  embedded default board, and what the tests of everything above the transport use.
* ``SSHTransport``: paramiko. Host keys are checked against known_hosts (and ~/.ssh/config's
  UserKnownHostsFile); an unknown key is refused unless trust-on-first-use was explicitly chosen,
  a changed key is always refused.

``send_file`` is the resumable upload on top: the remote file is written as ``NAME.part`` next to a
resume record ``NAME.resume`` (source SHA-256 and size); after a dropped connection it reconnects
and continues at the size of ``NAME.part``. The bundle's signed hashes (checked by the agent on
install) are the end-to-end check; a corrupt resume is re-sent from zero by the caller.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from device_agent.durable import sha256_of_file

from .errors import AuthFailed, HostKeyRejected, InventoryError, TransferFailed, UnreachableBoard
from .inventory import Board, Fleet, resolve_ssh, valid_env_key

CHUNK = 32 * 1024  # one SFTP write request
SYNC_EVERY = 256 * 1024  # at most this many unacknowledged bytes in flight (bounds re-sent bytes after a drop)

Progress = Callable[[int], None]  # called with the bytes sent so far in this put


@dataclass
class CommandResult:
    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> dict[str, Any]:
        """The agent's one JSON object on stdout (``{}`` if there is none)."""
        try:
            d = json.loads(self.stdout) if self.stdout.strip() else {}
        except ValueError:
            return {"ok": False, "error": {"type": "BadOutput", "message": self.stdout[-300:] or self.stderr[-300:],
                                           "exit_code": self.rc}}
        return d if isinstance(d, dict) else {"ok": False, "error": {"type": "BadOutput", "message": str(d)[:300]}}


class PartialTransfer(TransferFailed):
    """A put broke off after ``sent`` bytes."""

    def __init__(self, message: str, sent: int):
        super().__init__(message)
        self.sent = sent


class Transport(ABC):
    """One board's connection. Not thread-safe: one transport per board per thread."""

    board: Board

    def __init__(self, board: Board):
        self.board = board

    @abstractmethod
    def connect(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float | None = None) -> CommandResult:
        """Run a command on the board; raises UnreachableBoard if the connection is lost."""

    @abstractmethod
    def put(self, local: Path, remote: str, *, offset: int = 0, progress: Progress | None = None) -> int:
        """Write ``local[offset:]`` to ``remote`` at ``offset`` (truncating it there). Returns bytes sent;
        raises PartialTransfer (with ``sent``) when the connection drops."""

    @abstractmethod
    def get(self, remote: str, local: Path) -> int: ...

    @abstractmethod
    def size(self, remote: str) -> int | None:
        """Size of a remote file, None if absent."""

    @abstractmethod
    def read_text(self, remote: str) -> str | None: ...

    @abstractmethod
    def write_text(self, remote: str, text: str) -> None: ...

    @abstractmethod
    def rename(self, src: str, dst: str) -> None: ...

    @abstractmethod
    def remove(self, remote: str) -> None: ...

    @abstractmethod
    def makedirs(self, remote: str) -> None: ...

    def __enter__(self) -> "Transport":
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- the agent
    def agent(self, *args: str, timeout: float | None = None) -> CommandResult:
        """``edgepack-agent --state STATE ARGS`` on the board (its JSON via ``.json()``)."""
        b = self.board
        return self.run([*b.agent_argv(), "--state", b.state, *args], env=b.env or None, timeout=timeout)


# --------------------------------------------------------------------------- local
class LocalTransport(Transport):
    """The board is this machine: commands are subprocesses, files are copied."""

    def connect(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _p(self, remote: str) -> Path:
        return Path(os.path.expanduser(remote))

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float | None = None) -> CommandResult:
        t0 = time.perf_counter()
        e = {**os.environ, **(env or {})}
        try:
            r = subprocess.run(list(argv), capture_output=True, text=True, env=e, timeout=timeout)
        except FileNotFoundError as ex:
            raise UnreachableBoard(f"board {self.board.name}: cannot start {argv[0]!r} ({ex}); "
                                   f"check the board's agent/python in the fleet file") from None
        except subprocess.TimeoutExpired:
            raise UnreachableBoard(f"board {self.board.name}: {' '.join(argv[:4])} ... did not finish in {timeout} s") from None
        return CommandResult(list(argv), r.returncode, r.stdout, r.stderr, time.perf_counter() - t0)

    def put(self, local: Path, remote: str, *, offset: int = 0, progress: Progress | None = None) -> int:
        dst = self._p(remote)
        sent = 0
        mode = "r+b" if offset and dst.exists() else "wb"
        with open(local, "rb") as src, open(dst, mode) as out:
            src.seek(offset)
            out.seek(offset)
            out.truncate()
            while b := src.read(1 << 20):
                out.write(b)
                sent += len(b)
                if progress:
                    progress(sent)
        return sent

    def get(self, remote: str, local: Path) -> int:
        shutil.copyfile(self._p(remote), local)
        return Path(local).stat().st_size

    def size(self, remote: str) -> int | None:
        p = self._p(remote)
        return p.stat().st_size if p.is_file() else None

    def read_text(self, remote: str) -> str | None:
        p = self._p(remote)
        return p.read_text() if p.is_file() else None

    def write_text(self, remote: str, text: str) -> None:
        self._p(remote).write_text(text)

    def rename(self, src: str, dst: str) -> None:
        os.replace(self._p(src), self._p(dst))

    def remove(self, remote: str) -> None:
        self._p(remote).unlink(missing_ok=True)

    def makedirs(self, remote: str) -> None:
        self._p(remote).mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- ssh
_KH_LOCK = threading.Lock()


class _Policy:
    """Unknown host key: refused, unless trust-on-first-use was chosen (then recorded)."""

    def __init__(self, board: Board, tofu: bool, known_hosts: Path):
        self.board, self.tofu, self.kh = board, tofu, known_hosts

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        fp = hashlib.sha256(key.asbytes()).digest()
        import base64
        fps = "SHA256:" + base64.b64encode(fp).decode().rstrip("=")
        if not self.tofu:
            host, port = hostname, 22
            if hostname.startswith("[") and "]:" in hostname:  # paramiko's name for a non-22 port
                host, _, p = hostname[1:].partition("]:")
                port = int(p) if p.isdigit() else 22
            scan = f"ssh-keyscan {f'-p {port} ' if port != 22 else ''}-t {key.get_name()} {host} >> {self.kh}"
            raise HostKeyRejected(
                f"board {self.board.name} ({hostname}): host key {key.get_name()} {fps} is not in {self.kh}; "
                f"check that fingerprint on the board (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), then add it: "
                f"`{scan}` (or set trust_on_first_use = true in the fleet file)")
        with _KH_LOCK:
            client.get_host_keys().add(hostname, key.get_name(), key)
            self.kh.parent.mkdir(parents=True, exist_ok=True)
            with open(self.kh, "a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


class SSHTransport(Transport):
    def __init__(self, board: Board, fleet: Fleet):
        super().__init__(board)
        self.fleet = fleet
        self.client: Any = None
        self._sftp: Any = None

    # ---------------------------------------------------------------- connection
    def connect(self) -> None:
        if self.client is not None and self.client.get_transport() and self.client.get_transport().is_active():
            return
        import paramiko
        b = self.board
        tgt = resolve_ssh(b, self.fleet)
        c = paramiko.SSHClient()
        for kh in tgt.known_hosts:
            if kh.is_file():
                try:
                    c.load_host_keys(str(kh)) if kh == tgt.known_hosts[0] else c.get_host_keys().load(str(kh))
                except Exception as e:
                    raise InventoryError(f"cannot read known_hosts {kh}: {e}") from None
        c.set_missing_host_key_policy(_Policy(b, self.fleet.trust_on_first_use or tgt.accept_new, tgt.known_hosts[0]))
        c.save_host_keys = lambda *a, **k: None  # type: ignore[method-assign]  # we append ourselves, never rewrite
        sock = paramiko.ProxyCommand(tgt.proxy_command) if tgt.proxy_command else None
        where = f"board {b.name} ({tgt.user}@{tgt.hostname}:{tgt.port})"
        try:
            c.connect(tgt.hostname, port=tgt.port, username=tgt.user, key_filename=tgt.key_files or None,
                      timeout=tgt.timeout, banner_timeout=tgt.timeout, auth_timeout=tgt.timeout,
                      allow_agent=not tgt.key_files, look_for_keys=not tgt.key_files, sock=sock)
        except HostKeyRejected:
            c.close()
            raise
        except paramiko.BadHostKeyException as e:
            c.close()
            raise HostKeyRejected(f"{where}: host key CHANGED (got {e.key.get_name()}, known_hosts has another); "
                                  f"this may be an attack. If the board was re-flashed, remove the old line with "
                                  f"`ssh-keygen -R '[{tgt.hostname}]:{tgt.port}'` and verify the new key") from None
        except paramiko.AuthenticationException as e:
            c.close()
            raise AuthFailed(f"{where}: authentication failed ({e}); check user and key in the fleet file "
                             f"or ~/.ssh/config, and the board's authorized_keys") from None
        except (OSError, socket.timeout, EOFError, paramiko.SSHException) as e:
            c.close()
            raise UnreachableBoard(f"{where} unreachable: {type(e).__name__}: {e}; check that it is on and sshd "
                                   f"runs, or leave it out with --group") from None
        self.client = c
        self._sftp = None

    def close(self) -> None:
        try:
            if self._sftp is not None:
                self._sftp.close()
        except Exception:
            pass
        if self.client is not None:
            self.client.close()
        self.client, self._sftp = None, None

    def _lost(self, e: BaseException, what: str) -> UnreachableBoard:
        self.close()
        return UnreachableBoard(f"board {self.board.name}: connection lost during {what} ({type(e).__name__}: {e}); "
                                f"retry the push, it resumes")

    @property
    def sftp(self) -> Any:
        self.connect()
        if self._sftp is None:
            try:
                self._sftp = self.client.open_sftp()
            except Exception as e:
                raise self._lost(e, "sftp start") from None
        return self._sftp

    # ---------------------------------------------------------------- commands
    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float | None = None) -> CommandResult:
        bad = [k for k in (env or {}) if not valid_env_key(k)]
        if bad:  # the fleet file is checked on load; a Board built in code is checked here, before connecting
            raise InventoryError(f"board {self.board.name}: env key {str(bad[0])[:60]!r} is not a variable name")
        self.connect()
        cmd = " ".join(shlex.quote(a) for a in argv)
        if env:
            cmd = "env " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items()) + " " + cmd
        t0 = time.perf_counter()
        try:
            chan = self.client.get_transport().open_session(timeout=self.board.connect_timeout)
            chan.settimeout(timeout)
            chan.exec_command(cmd)
            out, err = bytearray(), bytearray()
            while True:
                if chan.recv_ready():
                    out += chan.recv(65536)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                elif chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                else:
                    import select
                    select.select([chan], [], [], 0.5)
            while chan.recv_ready():
                out += chan.recv(65536)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            rc = chan.recv_exit_status()
            chan.close()
        except (OSError, socket.timeout, EOFError, Exception) as e:
            if isinstance(e, (UnreachableBoard,)):
                raise
            raise self._lost(e, f"`{cmd[:80]}`") from None
        if rc == -1:  # no exit status: the session died
            raise self._lost(EOFError("no exit status"), f"`{cmd[:80]}`")
        return CommandResult(list(argv), rc, out.decode(errors="replace"), err.decode(errors="replace"),
                             time.perf_counter() - t0)

    # ---------------------------------------------------------------- files
    def put(self, local: Path, remote: str, *, offset: int = 0, progress: Progress | None = None) -> int:
        sent = 0
        try:
            sftp = self.sftp
            f = sftp.open(remote, "r+b" if offset else "wb", bufsize=0)
            try:
                if offset:
                    f.truncate(offset)
                    f.seek(offset)
                f.set_pipelined(True)
                since_sync = 0
                with open(local, "rb") as src:
                    src.seek(offset)
                    while b := src.read(CHUNK):
                        since_sync += len(b)
                        if since_sync >= SYNC_EVERY:  # one synchronous write drains all acknowledgements
                            f.set_pipelined(False)
                            f.write(b)
                            f.set_pipelined(True)
                            since_sync = 0
                        else:
                            f.write(b)
                        sent += len(b)
                        if progress:
                            progress(sent)
            finally:
                f.close()
        except UnreachableBoard as e:
            raise PartialTransfer(str(e), sent) from None
        except Exception as e:
            self.close()
            raise PartialTransfer(f"board {self.board.name}: upload of {Path(local).name} broke off after {sent} bytes "
                                  f"({type(e).__name__}: {e})", sent) from None
        return sent

    def get(self, remote: str, local: Path) -> int:
        try:
            self.sftp.get(remote, str(local))
        except OSError as e:
            raise TransferFailed(f"board {self.board.name}: cannot fetch {remote}: {e}") from None
        return Path(local).stat().st_size

    def size(self, remote: str) -> int | None:
        try:
            return int(self.sftp.stat(remote).st_size)
        except FileNotFoundError:
            return None
        except IOError as e:
            if getattr(e, "errno", None) == 2:
                return None
            raise self._lost(e, f"stat {remote}") from None

    def read_text(self, remote: str) -> str | None:
        try:
            with self.sftp.open(remote, "rb") as f:
                return f.read().decode()
        except FileNotFoundError:
            return None
        except IOError as e:
            if getattr(e, "errno", None) == 2:
                return None
            raise self._lost(e, f"read {remote}") from None

    def write_text(self, remote: str, text: str) -> None:
        try:
            with self.sftp.open(remote, "wb") as f:
                f.write(text.encode())
        except Exception as e:
            raise self._lost(e, f"write {remote}") from None

    def rename(self, src: str, dst: str) -> None:
        try:
            self.sftp.posix_rename(src, dst)
        except Exception as e:
            raise self._lost(e, f"rename {src}") from None

    def remove(self, remote: str) -> None:
        try:
            self.sftp.remove(remote)
        except FileNotFoundError:
            pass
        except IOError as e:
            if getattr(e, "errno", None) != 2:
                raise self._lost(e, f"remove {remote}") from None

    def makedirs(self, remote: str) -> None:
        sftp = self.sftp
        parts = [p for p in remote.split("/") if p]
        cur = "/" if remote.startswith("/") else ""
        for p in parts:
            cur = f"{cur}{p}" if cur in ("", "/") else f"{cur}/{p}"
            try:
                sftp.stat(cur)
            except IOError:
                try:
                    sftp.mkdir(cur)
                except IOError as e:
                    raise TransferFailed(f"board {self.board.name}: cannot create {cur}: {e}") from None


def open_transport(board: Board, fleet: Fleet) -> Transport:
    return LocalTransport(board) if board.transport == "local" else SSHTransport(board, fleet)


# --------------------------------------------------------------------------- resumable upload
@dataclass
class TransferStats:
    remote: str
    size: int
    bytes_sent: int = 0
    attempts: int = 0
    resumed_at: list[int] = field(default_factory=list)
    skipped: bool = False  # already on the board
    seconds: float = 0.0


def file_sha256(p: Path) -> str:
    return sha256_of_file(p)


def send_file(t: Transport, local: Path, remote_dir: str, *, sha256: str | None = None, retries: int = 3,
              max_bytes: int | None = None, progress: Progress | None = None, backoff: float = 0.5,
              fresh: bool = False) -> TransferStats:
    """Upload ``local`` into ``remote_dir`` as ``<sha16>-<name>``; resume after drops.

    At most ``retries`` reconnects; never more than ``max_bytes`` sent in all (TransferFailed).
    """
    local = Path(local)
    size = local.stat().st_size
    sha = sha256 or file_sha256(local)
    final = f"{remote_dir.rstrip('/')}/{sha[:16]}-{local.name}"
    part, rec = final + ".part", final + ".resume"
    record = json.dumps({"sha256": sha, "size": size})
    st = TransferStats(remote=final, size=size)
    t0 = time.perf_counter()
    while True:
        st.attempts += 1
        try:
            t.connect()
            t.makedirs(remote_dir)
            if fresh:
                t.remove(final)
                t.remove(part)
                fresh = False
            elif t.size(final) == size:
                st.skipped = st.bytes_sent == 0
                break
            offset = 0
            ps = t.size(part)
            if ps is not None and 0 < ps <= size and t.read_text(rec) == record:
                offset = ps
                st.resumed_at.append(ps)
            else:
                t.write_text(rec, record)
            if max_bytes is not None and st.bytes_sent + (size - offset) > max_bytes:
                raise TransferFailed(f"board {t.board.name}: sending {local.name} would exceed the per-board byte "
                                     f"budget ({max_bytes} bytes, {st.bytes_sent} already sent); raise --max-bytes-factor")
            base = st.bytes_sent
            try:
                st.bytes_sent += t.put(local, part, offset=offset,
                                       progress=(lambda n: progress(base + n)) if progress else None)
            except PartialTransfer as e:
                st.bytes_sent += e.sent
                raise
            t.rename(part, final)
            t.remove(rec)
            break
        except (PartialTransfer, UnreachableBoard) as e:
            if st.attempts > retries:
                raise TransferFailed(f"{e} (gave up after {st.attempts} attempts, {st.bytes_sent} bytes sent; "
                                     f"the next push resumes)") from None
            t.close()
            time.sleep(backoff * st.attempts)
    st.seconds = time.perf_counter() - t0
    return st


__all__ = ["Transport", "LocalTransport", "SSHTransport", "CommandResult", "TransferStats", "PartialTransfer",
           "open_transport", "send_file", "file_sha256"]
