#!/usr/bin/env python3
"""Smoke check of the emulated aarch64 board (scripts/arm-board.sh).

    python scripts/arm_smoke.py BOARD_DIR

On the host: a small MLP as .onnx and as .tflite (tests/agent_helpers.py writes TFLite without
TensorFlow) and its host ORT outputs. On the board (BOARD_DIR/bin/python3, under qemu): the
imports the agent needs, an Ed25519 signature, a zstd round trip, and that model in ONNX Runtime
and in LiteRT, checked against the host's outputs. Prints the board's versions as one JSON line;
exit 1 with the board's error otherwise.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

ON_BOARD = r'''
import importlib.metadata as md
import json, platform, sys
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from backports import zstd
import onnxruntime as ort
d = sys.argv[1]
k = Ed25519PrivateKey.generate(); k.public_key().verify(k.sign(b"edgepack"), b"edgepack")
assert zstd.decompress(zstd.compress(b"edgepack" * 100)) == b"edgepack" * 100
io = np.load(d + "/io.npz")
s = ort.InferenceSession(d + "/m.onnx", providers=["CPUExecutionProvider"])
y = s.run(None, {s.get_inputs()[0].name: io["x"]})[0]
assert np.allclose(y, io["y"], rtol=1e-4, atol=1e-4), "onnxruntime output differs from the host's"
from ai_edge_litert import interpreter as tfl
it = tfl.Interpreter(model_path=d + "/m.tflite"); it.allocate_tensors()
it.set_tensor(it.get_input_details()[0]["index"], io["x"]); it.invoke()
yl = it.get_tensor(it.get_output_details()[0]["index"])
assert np.allclose(yl.reshape(-1), io["y"].reshape(-1), rtol=1e-3, atol=1e-3), "LiteRT output differs from the host's"
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                  **{p: md.version(p) for p in ("numpy", "onnxruntime", "ai-edge-litert", "cryptography",
                                                 "backports-zstd")}}))
'''


def main() -> int:
    import numpy as np
    import onnxruntime as ort
    from agent_helpers import make_onnx, onnx_to_tflite

    board = Path(sys.argv[1])
    with tempfile.TemporaryDirectory(prefix="edgepack-arm-smoke-") as td:
        d = Path(td)
        m = make_onnx(d / "m.onnx", seed=1)
        onnx_to_tflite(m, d / "m.tflite")
        x = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
        y = ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.savez(d / "io.npz", x=x, y=y)
        r = subprocess.run([str(board / "bin" / "python3"), "-c", ON_BOARD, str(d)], capture_output=True,
                           text=True, timeout=600)
    if r.returncode != 0 or not r.stdout.strip():
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"[arm-board] smoke check failed on the board (exit {r.returncode}): {tail}", file=sys.stderr)
        return 1
    print(r.stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
