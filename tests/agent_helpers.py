"""Helpers for the device-agent tests: boards in tmp dirs, bundles of tiny real models, CLI runs.

Keys and bundle builders come from tests/ota_helpers.py (helper-1's fixtures); this adds golden
data computed with the real runtime, multi-file bundles (many crash boundaries) and a way to
run ``edgepack-agent`` as a real process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.durable import utc_now
from edgepack.tflite.from_onnx import fold_for_tflite, onnx_to_tflite  # noqa: F401  (the library's translator)
from ota_helpers import Pki, build, make_onnx, make_pki  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]
TARGET = "rpi4-2gb"


def golden_for(model: Path, out: Path, n: int = 8, seed: int = 3, labels: bool = True) -> Path:
    """Golden inputs + the model's own outputs (the reference) + labels = the reference's top-1."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
    y = np.stack([sess.run(None, {inp.name: xi})[0] for xi in x])
    arrays: dict[str, Any] = {f"inputs_{inp.name}": x, f"outputs_{sess.get_outputs()[0].name}": y}
    if labels:
        arrays["labels"] = y.reshape(n, -1).argmax(1)
    np.savez(out, **arrays)
    return out


def write_trust(pki: Pki) -> tuple[Path, Path]:
    root, rk = pki.dir / "root.json", pki.dir / "release-keys.json"
    root.write_text(json.dumps(pki.root_doc))
    rk.write_text(json.dumps(pki.rk_doc))
    return root, rk


def bundle(pki: Pki, out: Path, model: Path, *, release: int, golden: Path | None = None,
           settings: dict[str, Any] | None = None, **kw: Any) -> Path:
    build(pki, out, model, release=release, golden=golden, now=utc_now(),
          settings=settings if settings is not None else {"runtime": "onnxruntime", "threads": 1}, **kw)
    return out


def multi_file_bundle(pki: Pki, out: Path, model: Path, *, release: int, golden: Path | None, extras: int,
                      extra_bytes: int = 512, seed: int = 0, same_extras: bool = False) -> Path:
    """A full bundle with ``extras`` small role=extra files (labels, configs): many write boundaries."""
    import datetime as dt
    import tempfile

    from edgepack.ota import bundle as B
    now = utc_now()
    items = [(model.name, "model", model)]
    with tempfile.TemporaryDirectory() as td:
        tdp = Path(td)
        s = tdp / "settings.json"
        s.write_text(json.dumps({"runtime": "onnxruntime", "threads": 1, "model": model.name}))
        items.append(("settings.json", "settings", s))
        if golden is not None:
            items.append(("golden.npz", "golden", golden))
        rng = np.random.default_rng(seed if same_extras else seed + release)  # same: delta = base-copy
        for i in range(extras):
            p = tdp / f"extra-{i:03d}.bin"
            p.write_bytes(rng.bytes(extra_bytes))
            items.append((p.name, "extra", p))
        frames = []
        for i, (name, role, src) in enumerate(items):
            spool = tdp / f"frame-{i}.zst"
            with open(spool, "wb") as f:
                n, h, tn, th = B.compress_file(src, f)
            frames.append(B.Frame(B.FileEntry(path=name, role=role, length=n, sha256=h, encoding="zstd",
                                              transport_length=tn, transport_sha256=th), spool))
        manifest = B.make_manifest(kind="full", model="mlp", release=release, version=f"1.{release}.0",
                                   targets=[TARGET], created=now, expires=now + dt.timedelta(days=30),
                                   min_agent_version="0.1.0", entries=[fr.entry for fr in frames])
        B.write_container(out, trust_section=B.trust_section(pki.rk_doc, [pki.root_doc]), manifest=manifest,
                          signers=[pki.release[0]], frames=frames)
    return out


def init_board(state: Path, pki: Pki, **cfg: Any):
    """A board state dir (in-process Agent). cfg: BoardConfig fields."""
    from device_agent.install import Agent
    from device_agent.state import BoardConfig
    root, rk = write_trust(pki)
    a = Agent(state)
    a.init(BoardConfig(target=cfg.pop("target", TARGET), **cfg), root)
    return a


def agent_cmd(state: Path | None, *args: str) -> list[str]:
    return [sys.executable, "-m", "device_agent", *(["--state", str(state)] if state else []), *args]


def run_agent(state: Path | None, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
              ) -> tuple[int, dict[str, Any], str]:
    """Run the agent as a real process: (exit code, parsed JSON stdout, stderr)."""
    e = {**os.environ, **(env or {})}
    r = subprocess.run(agent_cmd(state, *args), capture_output=True, text=True, env=e, timeout=timeout, cwd=ROOT)
    try:
        out = json.loads(r.stdout) if r.stdout.strip() else {}
    except ValueError:
        out = {"_raw": r.stdout}
    return r.returncode, out, r.stderr


def active_ok(state: Path) -> tuple[int, str]:
    """Assert the board's invariant: state parses, active slot hash-verifies and its model runs.

    Returns (release, slot). Runs recover() first, as the next agent start would.
    """
    from device_agent.install import Agent
    from device_agent.runtime import load_model
    from device_agent.health import smoke_feed
    a = Agent(state)
    a.recover()
    st = a.sd.load()
    assert st.active is not None, "no active release"
    info = a.slots.verify(st.active)  # hash-verified
    sess = load_model(info.model_path, "onnxruntime", threads=1)
    out = sess.run(smoke_feed(sess))
    assert np.all(np.isfinite(out[0]))
    assert st.trial is None and st.writing is None
    return info.release, st.active
