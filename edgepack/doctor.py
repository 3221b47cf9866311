"""``edgepack doctor``: everything a first push depends on, checked in one go, each problem with what
to do about it.

Host: the CPU's INT8 instructions (and so the arithmetic this host's own kernels compute), the
project's target names, the signing keys (private keys 0600, the release key listed in the
release-key list, nothing expired). Fleet: the fleet file, ``known_hosts`` holding every SSH
board's key, and (``boards=True``) each board's Python, numpy and runtimes, asked over its transport.
"""
from __future__ import annotations

import datetime as _dt
import json
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from device_agent.errors import OtaError

from .errors import EdgepackError

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True, kw_only=True)
class Check:
    area: str
    name: str
    status: str          # ok | warn | fail
    detail: str
    advice: str = ""


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    def add(self, area: str, name: str, status: str, detail: str, advice: str = "") -> None:
        self.checks.append(Check(area=area, name=name, status=status, detail=detail, advice=advice))

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def exit_code(self) -> int:
        """0 when nothing failed (warnings allowed); EdgepackError's 1 otherwise."""
        return EdgepackError.exit_code if self.failures else 0

    def to_json(self) -> dict[str, Any]:
        return {"ok": not self.failures, "exit_code": self.exit_code, "checks": [asdict(c) for c in self.checks]}


def _host(rep: DoctorReport) -> None:
    import platform
    import sys

    from .quantize.numerics import host_int8
    h = host_int8()
    adv = ("" if h.arithmetic == "exact" else "this host's own ONNX Runtime INT8 kernels saturate u8 x s8 pair "
           "sums; quantize still judges models in each target's own arithmetic")
    rep.add("host", "INT8 instructions", OK if h.arithmetic == "exact" else WARN, h.label, adv)
    rep.add("host", "Python", OK, f"{platform.python_implementation()} {sys.version.split()[0]}")


def _targets(rep: DoctorReport, names: list[str]) -> None:
    from .targets import list_targets, load_target
    known = list_targets()
    for n in names:
        try:
            t = load_target(n)
            rep.add("targets", n, OK, f"{t.description} (RAM {t.ram_mb} MB, OTA budget {t.ota_budget_mb:g} MB)")
        except EdgepackError as e:
            rep.add("targets", n, FAIL, str(e), f"use one of {', '.join(known)} (`edgepack targets`)")


def _mode_ok(p: Path) -> bool:
    return not (p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def _expiry(doc: dict[str, Any]) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(str(doc["signed"]["expires"]).replace("Z", "+00:00"))
    except (KeyError, TypeError, ValueError):
        return None


def _keys(rep: DoctorReport, release_key: Path | None, release_keys: Path | None, root: Path | None) -> None:
    from .ota.keys import load_signing_key
    now = _dt.datetime.now(_dt.timezone.utc)
    if root is not None:
        key_dir = root.parent
        for k in sorted(key_dir.glob("*.key")):
            if not _mode_ok(k):
                rep.add("keys", k.name, FAIL, f"{k} has mode {stat.S_IMODE(k.stat().st_mode):04o}",
                        f"chmod 600 {k}")
        if list(key_dir.glob("root-*.key")):
            rep.add("keys", "root keys offline", WARN, f"root private keys are in {key_dir}",
                    "move keys/root-*.key to offline storage once the key list is signed")
    docs: dict[str, dict[str, Any]] = {}
    for label, p in (("root", root), ("release-keys", release_keys)):
        if p is None:
            continue
        try:
            docs[label] = json.loads(Path(p).read_text())
            exp = _expiry(docs[label])
            if exp is None:
                rep.add("keys", label, FAIL, f"{p} has no valid expiry", "re-make it with `edgepack keys`")
            elif exp < now:
                rep.add("keys", label, FAIL, f"{p} expired on {exp:%Y-%m-%d}",
                        "sign a new one (`edgepack keys sign-release-keys` / `rotate-root`)")
            else:
                days = (exp - now).days
                rep.add("keys", label, OK if days > 30 else WARN, f"{p}: v{docs[label]['signed'].get('version')}, "
                        f"expires in {days} days", "" if days > 30 else "re-sign it soon")
        except (OSError, ValueError, KeyError, TypeError) as e:
            rep.add("keys", label, FAIL, f"{p}: cannot read it ({e})", "check the path in edgepack.toml")
    if release_key is not None:
        try:
            k = load_signing_key(release_key)
            listed = docs.get("release-keys", {}).get("signed", {}).get("keys", {})
            if "release-keys" in docs and k.keyid not in listed:
                rep.add("keys", "release key", FAIL, f"{release_key} ({k.keyid[:16]}) is not in {release_keys}",
                        "list it: `edgepack keys sign-release-keys --key KEY.pub ...`")
            else:
                rep.add("keys", "release key", OK, f"{release_key} ({k.keyid[:16]}), mode 0600")
        except (EdgepackError, OtaError) as e:  # KeyFileError / LoosePermissions are the board's OtaError family
            rep.add("keys", "release key", FAIL, str(e))


def _known_hosts_has(path: Path, host: str, port: int | None) -> bool:
    want = {host, f"[{host}]:{port}"} if port and port != 22 else {host}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return False
    for ln in lines:
        if ln.strip() and not ln.startswith("#"):
            first = ln.split()[0]
            names = ln.split()[1].split(",") if first.startswith("@") and len(ln.split()) > 1 else first.split(",")
            if want & set(names):
                return True
    return False


def _fleet(rep: DoctorReport, fleet: Any, ask_boards: bool) -> None:
    from .fleet.inventory import resolve_ssh
    ssh = [b for b in fleet.boards if b.transport == "ssh"]
    if ssh:
        kh = Path(fleet.known_hosts).expanduser()
        for b in ssh:
            tgt = resolve_ssh(b, fleet)
            if _known_hosts_has(kh, tgt.hostname, tgt.port):
                rep.add("fleet", f"{b.name} host key", OK, f"{tgt.hostname}:{tgt.port} is in {kh}")
            else:
                port = f"-p {tgt.port} " if tgt.port != 22 else ""
                rep.add("fleet", f"{b.name} host key", FAIL, f"{tgt.hostname}:{tgt.port} is not in {kh}",
                        f"check the key out of band, then: ssh-keyscan {port}{tgt.hostname} >> {kh}")
    if not ask_boards:
        return
    from .fleet.errors import FleetError
    from .fleet.transport import open_transport
    for b in fleet.boards:
        try:
            with open_transport(b, fleet) as t:
                v = t.agent("version")
                j = v.json()
                if v.rc != 0 or not j.get("ok", True) or "python" not in j:
                    rep.add("board", b.name, FAIL, f"the agent does not run there (exit {v.rc})",
                            "run `edgepack fleet bootstrap`; the board needs Python 3.10+, numpy, cryptography, "
                            "backports.zstd and a runtime")
                    continue
                rts = [r for r, ok in (j.get("runtimes") or {}).items() if ok]
                np_v = t.run([b.python, "-c", "import numpy; print(numpy.__version__)"]) if b.transport == "ssh" \
                    else None
                numpy = np_v.stdout.strip() if np_v is not None and np_v.rc == 0 else "present (the agent imports it)"
                rep.add("board", b.name, OK if rts else FAIL,
                        f"agent {j.get('agent_version')}, Python {j.get('python')}, numpy {numpy}, runtimes "
                        f"{', '.join(rts) or 'none'}", "" if rts else "install onnxruntime (or ai-edge-litert) there")
        except FleetError as e:
            rep.add("board", b.name, FAIL, str(e))


def doctor(*, project: Any = None, fleet: Any = None, targets: list[str] | None = None,
           ask_boards: bool = False) -> DoctorReport:
    """Run every check that applies (a project file supplies targets, keys and the fleet)."""
    rep = DoctorReport()
    _host(rep)
    names = list(targets or (project.targets if project else []))
    if names:
        _targets(rep, names)
    else:
        rep.add("targets", "project targets", WARN, "no target named", "run `edgepack init -t TARGET` or pass -t")
    if project is not None:
        _keys(rep, project.release_key, project.release_keys, project.root)
    else:
        rep.add("keys", "project", WARN, "no edgepack.toml here or above", "run `edgepack init` to make keys")
    if fleet is not None:
        _fleet(rep, fleet, ask_boards)
    return rep


__all__ = ["doctor", "DoctorReport", "Check"]
