"""Bundles of 100-300 MB stream in bounded memory on both sides (issue 15): a decoder-shaped
graph whose 100 MB of weights (random bytes: incompressible, so nothing shrinks them) sit in an
external data file is bundled by the host in one process and installed by the real agent CLI in
another; each process's peak RSS (VmHWM from /proc) must stay far below the payload's size over
what the same process holds after its imports. The trial runs in the agent's own child process
(it loads the weights, as any runtime must), so the install's figure is the verify+write path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent_helpers import ROOT, TARGET, init_board, run_agent
from ota_helpers import Pki

DATA_BYTES = 100 << 20
BOUND_MB = 48      # over the process's own baseline; the payload is 100 MiB


def _decoder_shaped(folder: Path) -> Path:
    """model.onnx (KV-cache input name, a Gather of 4 weights) + model.onnx.data (100 MiB random)."""
    import numpy as np
    from onnx import TensorProto, helper
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.onnx.data", "wb") as f:
        rng = np.random.default_rng(0)
        for _ in range(DATA_BYTES >> 20):
            f.write(rng.bytes(1 << 20))
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[DATA_BYTES // 4],
                    data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "model.onnx.data"), ("offset", "0"), ("length", str(DATA_BYTES))):
        w.external_data.add(key=k, value=v)
    idx = helper.make_tensor("idx", TensorProto.INT64, [4], [0, 1, 2, 3])
    g = helper.make_graph([helper.make_node("Gather", ["W", "idx"], ["g"]),
                           helper.make_node("Add", ["past_key_values.0.key", "g"], ["logits"])], "kv-shaped",
                          [helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4])], [w, idx])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    (folder / "model.onnx").write_bytes(m.SerializeToString())
    return folder / "model.onnx"


_CHILD = r"""
import json, sys
def hwm():
    for l in open("/proc/self/status"):
        if l.startswith("VmHWM:"):
            return int(l.split()[1]) / 1024
a = json.loads(sys.argv[1])
from device_agent import bundle, install, cli   # what `python -m device_agent install` imports
if a["what"] == "baseline":
    print(json.dumps({"base": hwm()})); sys.exit()
import numpy, onnx
from edgepack.ota.bundle import build_bundle
base = hwm()
from ota_helpers import make_pki
pki = make_pki(__import__("pathlib").Path(a["pki"]))
rep = build_bundle(a["out"], models=[a["model"]], name="kv", release=1, version="1", targets=[a["target"]],
                   signer=pki.release[0], release_keys_doc=pki.rk_doc, roots=[pki.root_doc],
                   settings={"runtime": "onnxruntime", "threads": 1})
print(json.dumps({"base": base, "peak": hwm(), "files": rep.files, "bytes": rep.bundle_bytes,
                  "root_doc": pki.root_doc, "rk_doc": pki.rk_doc}))
"""


def _child(**a) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(a)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM is read from Linux /proc")
def test_a_100mb_llm_bundle_builds_and_installs_in_bounded_memory(tmp_path):
    model = _decoder_shaped(tmp_path / "m")
    pki_dir = tmp_path / "pki"
    out = tmp_path / "kv.bundle"
    built = _child(what="build", pki=str(pki_dir), out=str(out), model=str(model), target=TARGET)
    assert {f["path"] for f in built["files"]} >= {"model.onnx", "model.onnx.data", "settings.json"}
    assert built["bytes"] > DATA_BYTES          # random bytes: zstd cannot shrink them
    host_mb = built["peak"] - built["base"]
    assert host_mb < BOUND_MB, f"bundle build peaked {host_mb:.0f} MB over its baseline for a 100 MiB payload"
    pki = Pki(pki_dir, [], [], built["root_doc"], built["rk_doc"])   # the board trusts the child's keys
    state = tmp_path / "board"
    init_board(state, pki, threads=1, trial_runs=2)
    code, res, err = run_agent(state, "install", str(out))
    base = _child(what="baseline")["base"]
    agent_mb = res.get("peak_rss_mb_before_trial", 1e9) - base
    print(f"host {host_mb:.1f} MB, agent {agent_mb:.1f} MB over baseline ({base:.0f} MB)")
    assert code == 0, (res, err[-2000:])
    assert agent_mb < BOUND_MB, f"agent install peaked {agent_mb:.0f} MB over its baseline for a 100 MiB payload"
    slot = state / "slots" / res["slot"]
    assert (slot / "model.onnx.data").stat().st_size == DATA_BYTES
