#!/usr/bin/env python
"""Hostile-input sweep (issue 12): >= 150 generated cases against the reader, the agent and the fleet.

Categories: container, manifest, trust, delta, state, trial, fleet file, board replies, HTML.
Every case must be *refused* with a named error (or, for HTML, rendered as inert text). A case is

* ``accepted`` when the hostile input got through (installed, verified, committed, live markup),
* ``crashed`` when it raised something other than the named errors (or the agent exited 1 /
  printed a traceback), and
* ``hung`` when it did not finish within ``--timeout`` seconds.

Library cases run in a forked child (so a hang can be killed), agent cases as real
``edgepack-agent`` processes, fleet cases as real ``push`` runs against local boards.

    PYTHONPATH=. python scripts/hostile_inputs.py [--json out.json] [--only CATEGORY]

Prints ``N cases, N accepted, N crashed, N hung`` last; exit 0 only if the last three are 0.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

REFUSED, ACCEPTED, CRASHED, HUNG = "refused", "accepted", "crashed", "hung"


@dataclass
class Case:
    category: str
    name: str
    run: Callable[[], tuple[str, str]]  # -> (outcome, detail)
    forked: bool = True


# --------------------------------------------------------------------------- runners
def _child(fn, q) -> None:
    try:
        q.put(fn())
    except BaseException as e:  # noqa: BLE001 - classification happens in the parent
        q.put((CRASHED, f"{type(e).__name__}: {str(e)[:200]}"))


def run_case(c: Case, timeout: float) -> tuple[str, str, float]:
    t0 = time.perf_counter()
    if not c.forked:
        try:
            out, det = c.run()
        except subprocess.TimeoutExpired:
            out, det = HUNG, f"no answer in {timeout} s"
        except BaseException as e:  # noqa: BLE001
            out, det = CRASHED, f"{type(e).__name__}: {str(e)[:200]}"
        return out, det, time.perf_counter() - t0
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(c.run, q))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return HUNG, f"no answer in {timeout} s", time.perf_counter() - t0
    try:
        out, det = q.get(timeout=5)
    except Exception:  # noqa: BLE001
        out, det = CRASHED, f"child died (exit {p.exitcode})"
    return out, det, time.perf_counter() - t0


def expect(fn: Callable[[], Any], named: tuple[type, ...]) -> tuple[str, str]:
    """``fn`` must raise one of ``named``; returning normally means the input was accepted."""
    try:
        fn()
    except named as e:
        return REFUSED, f"{type(e).__name__}: {str(e)[:120]}"
    return ACCEPTED, "no error raised"


def agent_case(state: Path, *args: str, ok_codes=(), timeout: float = 60) -> tuple[str, str]:
    """A real agent process: exit 0 on hostile input = accepted; exit 1 or a traceback = crashed."""
    r = subprocess.run([sys.executable, "-m", "device_agent", "--state", str(state), *args], capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if "Traceback" in r.stderr or r.returncode == 1:
        return CRASHED, f"exit {r.returncode}: {r.stderr.strip()[-200:]}"
    try:
        out = json.loads(r.stdout)
    except ValueError:
        return CRASHED, f"stdout is not one JSON object: {r.stdout[:100]!r}"
    if r.returncode == 0 and r.returncode not in ok_codes:
        return ACCEPTED, f"exit 0: {json.dumps(out)[:150]}"
    return REFUSED, f"exit {r.returncode} {(out.get('error') or {}).get('type', '')}"


# --------------------------------------------------------------------------- the world
class World:
    def __init__(self, d: Path):
        from agent_helpers import bundle, golden_for, init_board, make_onnx, make_pki
        from device_agent import bundle as B
        from device_agent.durable import utc_now
        from edgepack.ota.delta import make_delta_bundle
        self.d = d
        self.pki = make_pki(d / "pki")
        for n in ("m1", "m2", "other"):
            (d / n).mkdir()
        self.m1 = make_onnx(d / "m1" / "mlp.onnx", seed=0, hidden=96)
        self.m2 = make_onnx(d / "m2" / "mlp.onnx", seed=0, hidden=96, drift=0.01)
        self.other = make_onnx(d / "other" / "mlp.onnx", seed=5, hidden=96)
        self.g1, self.g2 = golden_for(self.m1, d / "g1.npz", n=4), golden_for(self.m2, d / "g2.npz", n=4)
        self.b1 = bundle(self.pki, d / "b1.bundle", self.m1, release=1, golden=self.g1)
        self.b2 = bundle(self.pki, d / "b2.bundle", self.m2, release=2, golden=self.g2)
        self.delta = make_delta_bundle(self.b1, self.b2, d / "d12.bundle", trust=self.pki.board_trust(),
                                       signer=self.pki.release[0], now=utc_now()).path
        self.slot1 = d / "slot1"
        B.extract(B.open_bundle(self.b1, self.pki.board_trust(), now=utc_now()), self.slot1)
        self.tpl = d / "tpl"
        init_board(self.tpl, self.pki, threads=1, trial_in_process=True, trial_runs=2).install(self.b1)
        self.n = 0

    def path(self, suffix: str = ".bundle") -> Path:
        self.n += 1
        return self.d / "cases" / f"c{self.n:04d}{suffix}"

    def board(self) -> Path:
        self.n += 1
        st = self.d / "boards" / f"b{self.n:04d}"
        shutil.copytree(self.tpl, st, symlinks=True)
        return st


def _verify(w: World, p: Path, base: bool = False) -> Callable[[], None]:
    def go() -> None:
        from device_agent import bundle as B
        from device_agent.durable import utc_now
        vm = B.open_bundle(p, w.pki.board_trust(), now=utc_now(), target="rpi4-2gb", min_release=1)
        dest = p.with_suffix(".out")
        B.extract(vm, dest, base_dir=w.slot1 if base else None)
    return go


def _ota() -> tuple[type, ...]:
    from device_agent.errors import OtaError
    return (OtaError,)


# --------------------------------------------------------------------------- generators
def container_cases(w: World) -> list[Case]:
    from ota_helpers import split_bundle
    data = w.b1.read_bytes()
    hdr, m, fr = split_bundle(w.b1)
    out: list[Case] = []

    def add(name: str, blob: bytes | None = None, make: Callable[[Path], None] | None = None) -> None:
        p = w.path()
        p.parent.mkdir(parents=True, exist_ok=True)
        if make:
            make(p)
        else:
            p.write_bytes(blob or b"")
        out.append(Case("container", name, lambda p=p: expect(_verify(w, p), _ota())))

    n = len(data)
    for cut in (0, 3, 8, 11, 12, 15, 40, hdr.payload_offset - 1, hdr.payload_offset, hdr.payload_offset + 7, n // 2, n - 1):
        add(f"truncated at {cut}", data[:cut])
    for pos in (0, 7, 8, 9, 10, 11, 12, 13, 14, 15, hdr.payload_offset - 3, hdr.payload_offset + 1, n - 2):
        b = bytearray(data)
        b[pos] ^= 0xFF
        add(f"byte {pos} flipped", bytes(b))
    for name, blob in (("trailing byte", data + b"\0"), ("trailing bundle", data + data),
                       ("trust length 4 GiB", data[:12] + b"\xff\xff\xff\xff" + data[16:]),
                       ("version 2", data[:8] + b"\0\2" + data[10:]), ("flags set", data[:10] + b"\0\1" + data[12:]),
                       ("zeros", b"\0" * 4096), ("text file", b"hello world\n" * 10)):
        add(name, blob)
    add("fifo", make=lambda p: os.mkfifo(p))
    add("symlink to /dev/zero", make=lambda p: p.symlink_to("/dev/zero"))
    add("directory", make=lambda p: p.mkdir())
    return out


def manifest_cases(w: World) -> list[Case]:
    from ota_helpers import resign
    bad = {"format": ["x", None, 1], "format_version": [0, 2, "1", 1.0, True, 2**64],
           "kind": ["delta", "FULL", None], "model": ["", "a/b", "m\n", "[b]x[/]", "\x1b[31m", 1, "x" * 300],
           "release": [-1, "2", 1.5, True, 2**63, None], "version": ["", "1\n", "\x1b]0;x\x07", [], "a b"],
           "targets": [[], "rpi4-2gb", ["rpi4-2gb\n"], [1], None],
           "created": ["2026-13-01T00:00:00Z", "yesterday", 0, "2999-01-01T00:00:00Z"],
           "expires": ["2000-01-01T00:00:00Z", None, "2026-01-01"],
           "min_agent_version": ["9.0.0", "0.1.0\n", "x", " 0.1", "1_0"], "compression": ["gzip", None],
           "content_sha256": ["0" * 64, "A" * 64, "x"], "files": [[], {}, [1], None],
           "base": [{"release": 1}]}
    out = []
    for field, values in bad.items():
        for v in values:
            def mut(m, field=field, v=v):
                m[field] = v
            p = w.path()
            p.parent.mkdir(parents=True, exist_ok=True)
            try:
                resign(w.b1, p, w.pki.release[0], mutate=mut)
            except (ValueError, TypeError):
                continue
            out.append(Case("manifest", f"{field}={str(v)[:30]!r}", lambda p=p: expect(_verify(w, p), _ota())))
    fe_bad = {"path": ["../x", "/etc/passwd", "a/b", "mlp.onnx\n", ".hidden", ""], "role": ["exe", None],
              "length": [-1, 2**41, "5"], "sha256": ["0" * 63], "encoding": ["gzip", "base-copy"],
              "transport_length": [0, 10**12]}
    for field, values in fe_bad.items():
        for v in values:
            def mut(m, field=field, v=v):
                m["files"][0][field] = v
            p = w.path()
            resign(w.b1, p, w.pki.release[0], mutate=mut)
            out.append(Case("manifest", f"files[0].{field}={str(v)[:30]!r}", lambda p=p: expect(_verify(w, p), _ota())))
    return out


def trust_cases(w: World) -> list[Case]:
    from device_agent.wire.encoding import canonical_json
    from edgepack.ota import keys as K
    from ota_helpers import assemble, split_bundle
    hdr, m, fr = split_bundle(w.b1)
    rk = hdr.trust["release_keys"]
    out = []

    def raw(name: str, tb: bytes) -> None:
        from device_agent.wire import MAGIC
        from device_agent.trust import MANIFEST_TYPE
        mb = canonical_json(m)
        sb = canonical_json([w.pki.release[0].sign(MANIFEST_TYPE, mb)])
        p = w.path()
        p.write_bytes(MAGIC + struct.pack(">HH", 1, 0) + b"".join(struct.pack(">I", len(x)) + x for x in (tb, mb, sb))
                      + b"".join(fr))
        out.append(Case("trust", name, lambda p=p: expect(_verify(w, p), _ota())))

    base = canonical_json(hdr.trust)
    raw("1e400 in trust section", base[:-1] + b',"x":1e400}')
    raw("NaN literal", base[:-1] + b',"x":NaN}')
    raw("-Infinity literal", base[:-1] + b',"x":-Infinity}')
    raw("duplicate key", base[:-1] + b',"roots":[]}')
    raw("deep nesting", b'{"x":' + b"[" * 100000 + b"]" * 100000 + b"}")
    raw("non-UTF-8", b'{"x":"\xff\xfe"}')
    raw("huge int", b'{"x":' + b"9" * 5000 + b"}")
    raw("not an object", b"[1,2,3]")

    def doc(name: str, trust: Any) -> None:
        p = w.path()
        assemble(p, trust=trust, manifest=m, signers=[w.pki.release[0]], frames=fr)
        out.append(Case("trust", name, lambda p=p: expect(_verify(w, p), _ota())))

    doc("no release keys", {"roots": [], "release_keys": None})
    doc("roots not a list", {"roots": "x", "release_keys": rk})
    doc("roots of strings", {"roots": ["x", 1], "release_keys": rk})
    doc("17 roots", {"roots": [{}] * 17, "release_keys": rk})
    doc("release keys a string", {"roots": [], "release_keys": "x"})
    for kid in ("[/]", "[bold]x", "\x1b[2J", "a\rb", "0" * 64):
        r2 = {"signed": {"type": "edgepack-root", "version": 2, "threshold": 1, "expires": "2099-01-01T00:00:00Z",
                         "keys": {kid: {"keytype": "ed25519", "public": "00" * 32}}}, "signatures": []}
        doc(f"root key id {kid!r}", {"roots": [r2], "release_keys": rk})
    bad_sig = copy.deepcopy(rk)
    bad_sig["signatures"][0]["sig"] = "0" * 128
    doc("release-key list with a bad root signature", {"roots": [], "release_keys": bad_sig})
    one = copy.deepcopy(rk)
    one["signatures"] = one["signatures"][:1]
    doc("release-key list below threshold", {"roots": [], "release_keys": one})
    from device_agent.durable import utc_now
    import datetime as dt
    expired = K.make_release_keys(w.pki.root_doc, w.pki.root_keys[:2], [w.pki.release[0].public_raw], version=3,
                                  expires_days=-1, now=utc_now(), check=False)
    doc("expired release-key list", {"roots": [], "release_keys": expired})
    revoking = K.make_release_keys(w.pki.root_doc, w.pki.root_keys[:2], [w.pki.release[1].public_raw], version=4,
                                   revoked=[w.pki.release[0].keyid], now=utc_now())
    doc("signed by a key its own list revokes", {"roots": [], "release_keys": revoking})
    wrong_type = copy.deepcopy(rk)
    wrong_type["signed"]["type"] = "edgepack-root"
    doc("key list with root type", {"roots": [], "release_keys": wrong_type})
    del dt
    return out


def delta_cases(w: World) -> list[Case]:
    from ota_helpers import assemble, split_bundle
    hdr, m, fr = split_bundle(w.delta)
    idx = [i for i, f in enumerate(m["files"]) if f["transport_length"] > 0]
    out = []
    blobs: list[tuple[str, int, Callable[[bytes], bytes]]] = []
    for i in idx:
        enc = m["files"][i]["encoding"]
        for name, f in (("random", lambda b: os.urandom(len(b))), ("truncated", lambda b: b[: len(b) // 2]),
                        ("doubled", lambda b: b + b), ("magic", lambda b: b"XXXXXXXX" + b[8:]),
                        ("header length huge", lambda b: b[:8] + b"\xff\xff\xff\xff" + b[12:]),
                        ("byte 20 flipped", lambda b: b[:20] + bytes([b[20] ^ 0xFF]) + b[21:]),
                        ("last byte flipped", lambda b: b[:-1] + bytes([b[-1] ^ 0xFF])), ("empty", lambda b: b"")):
            blobs.append((f"{enc} {m['files'][i]['path']} {name}", i, f))
    for name, i, f in blobs:
        mm = copy.deepcopy(m)
        frames = list(fr)
        frames[i] = f(frames[i])
        mm["files"][i].update(transport_length=len(frames[i]), transport_sha256=hashlib.sha256(frames[i]).hexdigest())
        p = w.path()
        assemble(p, trust=hdr.trust, manifest=mm, signers=[w.pki.release[0]], frames=frames)
        out.append(Case("delta", name, lambda p=p: expect(_verify(w, p, base=True), _ota())))
    wrong = w.path(".dir")
    shutil.copytree(w.slot1, wrong)
    for q in wrong.iterdir():
        if q.suffix == ".onnx":
            q.write_bytes(q.read_bytes()[::-1])

    def wrong_base() -> tuple[str, str]:
        from device_agent import bundle as B
        from device_agent.durable import utc_now
        vm = B.open_bundle(w.delta, w.pki.board_trust(), now=utc_now())
        return expect(lambda: B.extract(vm, wrong.with_suffix(".out"), base_dir=wrong), _ota())
    out.append(Case("delta", "wrong base", wrong_base))
    return out


def state_cases(w: World) -> list[Case]:
    from test_hostile import CORRUPT, _replace, _set
    extra = {"state-huge": lambda st: (st / "state.json").write_bytes(b" " * (5 << 20) + b"{}"),
             "state-deep": lambda st: (st / "state.json").write_text("[" * 100000 + "]" * 100000),
             "state-empty": _replace("state.json", "none"), "format-wrong": _set("format", "x"),
             "history-of-ints": _set("history", [1, 2]), "counter-negative": _set("counter", -1),
             "counter-huge": _set("counter", 2**70), "previous-z": _set("previous", "z"),
             "board-json-dir": _replace("board.json", "dir"), "board-json-zero": _replace("board.json", "zero"),
             "board-ram-string": lambda st: _board(st, ram_budget_mb="x"),
             "board-runtimes-string": lambda st: _board(st, runtimes="onnxruntime"),
             "board-nan": lambda st: (st / "board.json").write_text(
                 (st / "board.json").read_text().replace('"ram_budget_mb": 512.0', '"ram_budget_mb": NaN')),
             "slot-meta-garbage": lambda st: (st / "slots" / "a" / ".slot.json").write_text('{"files": "x"}'),
             "slot-file-fifo": lambda st: _fifo_slot_file(st)}
    out = []
    for name, f in {**CORRUPT, **extra}.items():
        def go(f=f, name=name) -> tuple[str, str]:
            st = w.board()
            f(st)
            # slot damage may be healed by --verify (exit 0); everything else must be refused
            r = agent_case(st, "status", "--verify", ok_codes=(0,) if name.startswith("slot-") else (), timeout=30)
            if r[0] != REFUSED:
                return r
            rr = agent_case(st, "recover", ok_codes=(0,), timeout=30)  # must not crash or hang either
            return rr if rr[0] != REFUSED else r
        out.append(Case("state", name, go, forked=False))
    return out


def _board(st: Path, **kw: Any) -> None:
    p = st / "board.json"
    d = json.loads(p.read_text())
    d.update(kw)
    p.write_text(json.dumps(d))


def _fifo_slot_file(st: Path) -> None:
    for q in (st / "slots" / "a").iterdir():
        if q.suffix == ".onnx":
            q.unlink()
            os.mkfifo(q)


def trial_cases(w: World) -> list[Case]:
    from agent_helpers import bundle
    out = []
    evil = w.d / "evil.so"
    evil.write_bytes(b"\x7fELF")
    settings = {
        "ep path": {"execution_provider": str(evil)}, "delegate path": {"delegate": str(evil)},
        "ep list": {"execution_providers": ["Evil", str(evil)]}, "health -2": {"health": {"min_cosine": -2,
                                                                                            "min_cosine_sample": -2, "min_top1_agreement": -1}},
        "health NaN": {"health": {"min_cosine": float("nan")}}, "health inf": {"health": {"max_abs_error": float("inf")}},
        "health string": {"health": {"min_cosine": "0"}}, "health not an object": {"health": "off"},
        "wrong model": {}, "runtime unknown": {"runtime": "evilrt"},
    }
    for name, s in settings.items():
        p = w.path()
        try:
            bundle(w.pki, p, w.other, release=2, golden=w.g1, settings={"runtime": "onnxruntime", "threads": 1, **s})
        except Exception as e:  # the host refused to build it: also a refusal, on the host side
            out.append(Case("trial", name, lambda e=e: (REFUSED, f"host: {type(e).__name__}")))
            continue
        out.append(Case("trial", name, lambda p=p: agent_case(w.board(), "install", str(p)), forked=False))
    import numpy as np
    big = w.d / "bomb.npz"
    np.savez_compressed(big, inputs_x=np.zeros((2_000_000, 1, 32), np.float32),
                        outputs_y=np.zeros((2_000_000, 1, 10), np.float32))
    p = w.path()
    bundle(w.pki, p, w.m2, release=2, golden=big)

    def bomb() -> tuple[str, str]:
        st = w.board()
        _board(st, trial_in_process=False, ram_budget_mb=64.0)
        return agent_case(st, "install", str(p), timeout=120)
    out.append(Case("trial", "golden bomb on a 64 MiB board", bomb, forked=False))
    from agent_helpers import build
    import datetime as dt
    from device_agent.durable import utc_now
    fut, huge = w.path(), w.path()
    build(w.pki, fut, w.m2, release=2, golden=w.g2, now=utc_now() + dt.timedelta(days=30))
    bundle(w.pki, huge, w.m2, release=2**63 - 1, golden=w.g2)
    out.append(Case("trial", "created in the far future", lambda: agent_case(w.board(), "install", str(fut)), forked=False))
    out.append(Case("trial", "release 2**63-1", lambda: agent_case(w.board(), "install", str(huge)), forked=False))
    return out


def fleet_file_cases(w: World) -> list[Case]:
    texts = {
        "env key with ;": "[[boards]]\nname='a'\nhost='h'\nenv={'A;touch /tmp/pwn;B'='1'}\n",
        "env key with space": "[[boards]]\nname='a'\nhost='h'\nenv={'A B'='1'}\n",
        "env key with $()": "[[boards]]\nname='a'\nhost='h'\nenv={'$(id)'='1'}\n",
        "env key with =": "[[boards]]\nname='a'\nhost='h'\nenv={'A=B'='1'}\n",
        "env key newline": "[[boards]]\nname='a'\nhost='h'\nenv={\"A\\nB\"='1'}\n",
        "env value table": "[[boards]]\nname='a'\nhost='h'\nenv={A={b=1}}\n",
        "env a string": "[[boards]]\nname='a'\nhost='h'\nenv='A=1'\n",
        "port string": "[[boards]]\nname='a'\nhost='h'\nport='22'\n",
        "no host": "[[boards]]\nname='a'\n",
        "name missing": "[[boards]]\nhost='h'\n",
        "name a list": "[[boards]]\nname=['a']\nhost='h'\n",
        "duplicate": "[[boards]]\nname='a'\nhost='h'\n[[boards]]\nname='a'\nhost='h'\n",
        "unknown key": "[[boards]]\nname='a'\nhost='h'\nshell='rm -rf /'\n",
        "unknown section": "[evil]\nx=1\n[[boards]]\nname='a'\nhost='h'\n",
        "transport evil": "[[boards]]\nname='a'\nhost='h'\ntransport='telnet'\n",
        "tofu string": "[fleet]\ntrust_on_first_use='yes'\n[[boards]]\nname='a'\nhost='h'\n",
        "budget string": "[[boards]]\nname='a'\nhost='h'\nram_budget_mb='lots'\n",
        "boards a table": "[boards]\nname='a'\n",
        "not toml": "[[boards\n",
        "empty": "",
        "non-utf8": b"[[boards]]\nname='\xff'\n",
    }
    out = []
    for name, t in texts.items():
        p = w.path(".toml")
        p.write_bytes(t if isinstance(t, bytes) else t.encode())

        def go(p=p) -> tuple[str, str]:
            from edgepack.fleet import load_fleet
            from edgepack.fleet.errors import InventoryError
            return expect(lambda: load_fleet(p), (InventoryError,))
        out.append(Case("fleet file", name, go))
    for src in ("fifo", "dev-zero"):
        p = w.path(".toml")
        os.mkfifo(p) if src == "fifo" else p.symlink_to("/dev/zero")

        def go2(p=p) -> tuple[str, str]:
            from edgepack.fleet import load_fleet
            from edgepack.fleet.errors import InventoryError
            return expect(lambda: load_fleet(p), (InventoryError,))
        out.append(Case("fleet file", f"fleet file is a {src}", go2))
    return out


FAKE = r'''
import json, os, sys
args = sys.argv[1:]
reply = json.loads(os.environ["FAKE_REPLY"])
cmd = reply.get("cmd", "install")
if cmd in args:
    sys.stdout.write(reply["out"]); sys.exit(reply.get("rc", 0))
os.execv(sys.executable, [sys.executable, "-m", "device_agent", *args])
'''


def reply_cases(w: World) -> list[Case]:
    fake = w.d / "fake_agent.py"
    fake.write_text(FAKE)
    replies = {
        "garbage exit 0": {"out": "<html>ok</html>"}, "empty exit 0": {"out": ""},
        "JSON list": {"out": "[1,2]"}, "JSON string": {"out": '"committed"'},
        "release a list": {"out": json.dumps({"ok": True, "status": "committed", "release": [2]})},
        "release a string": {"out": json.dumps({"ok": True, "status": "committed", "release": "2"})},
        "other release": {"out": json.dumps({"ok": True, "status": "committed", "release": 99})},
        "trial a string": {"out": json.dumps({"ok": True, "status": "committed", "release": 2, "trial": "x"})},
        "ok false exit 0": {"out": json.dumps({"ok": False, "status": "committed", "release": 2})},
        "exit 7 report a list": {"out": json.dumps({"ok": False, "report": [1], "error": "x"}), "rc": 7},
        "exit 5 error a list": {"out": json.dumps({"ok": False, "error": [1]}), "rc": 5},
        "status active a string": {"cmd": "status", "out": json.dumps({"ok": True, "active": "a"})},
        "status release a dict": {"cmd": "status", "out": json.dumps({"ok": True, "active": {"release": {}}})},
        "status huge": {"cmd": "status", "out": json.dumps({"ok": True, "active": {"release": 1, "x": "y" * 100000}})},
        "status NaN": {"cmd": "status", "out": '{"ok": true, "active": {"release": NaN}}'},
    }
    out = []
    for name, rep in replies.items():
        def go(rep=rep, name=name) -> tuple[str, str]:
            from edgepack.fleet import Fleet, Policy, load_release, push
            from edgepack.fleet.inventory import Board
            good_st, liar_st = w.board(), w.board()
            good = Board(name="good", transport="local", state=str(good_st), incoming=str(good_st / "in"),
                         trial_in_process=True)
            liar = Board(name="liar", transport="local", state=str(liar_st), incoming=str(liar_st / "in"),
                         trial_in_process=True, agent=f"{sys.executable} {fake}",
                         env={"FAKE_REPLY": json.dumps(rep), "PYTHONPATH": str(ROOT)})
            r = push(load_release(w.b2), Fleet(boards=[good, liar], ssh_config=None),
                     policy=Policy(canary=0, wave_size=2))
            res = {b.board: b for b in r.boards}
            if rep.get("cmd") == "status":  # the install itself is real: the push must just survive
                return REFUSED, f"survived: liar {res['liar'].result}, good {res['good'].result}"
            if res["liar"].result in ("committed", "current"):
                return ACCEPTED, f"liar counted as {res['liar'].result}"
            if res["liar"].result == "failed" and res["good"].result == "committed" and not r.halted:
                return ACCEPTED, "a failed board did not halt the wave"
            return REFUSED, f"liar {res['liar'].result}, good {res['good'].result}, halted {r.halted}"
        out.append(Case("board replies", name, go, forked=False))
    return out


def html_cases(w: World) -> list[Case]:
    payloads = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "\"><svg onload=alert(1)>",
                "</td></tr></table><iframe src=//x>", "<a href='javascript:1'>x</a>", "<style>*{display:none}</style>",
                "' onmouseover='alert(1)", "<!--", "<b>bold</b>", "&lt;script&gt;"]
    out = []
    for i, pl in enumerate(payloads):
        def go(pl=pl, i=i) -> tuple[str, str]:
            from edgepack.fleet import Store
            from edgepack.fleet.report import render_html
            db = w.d / f"h{i}.db"
            with Store(db) as s:
                s.add(f"board{pl}", "status", {"ok": True, "active": {"release": pl, "version": pl}})
                s.add("b", "status", {"ok": True, "active": {"release": 1}}, release=pl)
                s.add("b", "install", {"ok": True, "status": pl, "release": 1,
                                        "trial": {"latency": {"p90_ms": pl}, "comparison": pl}})
                s.add("b", "install", {"ok": False, "error": {"type": pl}, "release": 1})
                rid = s.start_rollout(1, pl)
                s.finish_rollout(rid, True, pl, {"boards": [{"result": pl}], "bytes_sent": pl})
                page = render_html(s, w.d / f"h{i}.html").read_text()
            raw = pl if "<" in pl or "'" in pl or '"' in pl else None
            if raw and raw in page:
                return ACCEPTED, f"raw {pl!r} in the page"
            return REFUSED, "escaped"
        out.append(Case("HTML", pl[:30], go))
    return out


GENERATORS = {"container": container_cases, "manifest": manifest_cases, "trust": trust_cases, "delta": delta_cases,
              "state": state_cases, "trial": trial_cases, "fleet file": fleet_file_cases,
              "board replies": reply_cases, "HTML": html_cases}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as hung")
    ap.add_argument("--only", action="append", help="category (repeat)")
    ap.add_argument("--json", type=Path, help="write every case's outcome here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="edgepack-hostile-"))
    (d / "cases").mkdir()
    (d / "boards").mkdir()
    try:
        w = World(d)
        cases = [c for cat, gen in GENERATORS.items() if not args.only or cat in args.only for c in gen(w)]
        results = []
        counts = {REFUSED: 0, ACCEPTED: 0, CRASHED: 0, HUNG: 0}
        for c in cases:
            outcome, detail, secs = run_case(c, args.timeout)
            counts[outcome] += 1
            results.append({"category": c.category, "case": c.name, "outcome": outcome, "detail": detail,
                            "seconds": round(secs, 3)})
            if outcome != REFUSED:
                print(f"  {outcome.upper()}: [{c.category}] {c.name}: {detail}", flush=True)
        by_cat: dict[str, int] = {}
        for r in results:
            by_cat[r["category"]] = by_cat.get(r["category"], 0) + 1
        print("cases per category: " + ", ".join(f"{k} {v}" for k, v in by_cat.items()))
        if args.json:
            args.json.write_text(json.dumps({"counts": counts, "by_category": by_cat, "cases": results}, indent=1))
        print(f"{len(cases)} cases, {counts[ACCEPTED]} accepted, {counts[CRASHED]} crashed, {counts[HUNG]} hung")
        return 0 if counts[ACCEPTED] == counts[CRASHED] == counts[HUNG] == 0 else 1
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
