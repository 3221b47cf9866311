"""Building, reading and extracting bundles; the CLI end to end."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from device_agent import bundle as B
from device_agent.errors import HashMismatch
from edgepack.cli import app
from edgepack.errors import DataError, ModelError

from ota_helpers import NOW, build, files_in, make_golden, make_onnx, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_manifest_names_everything(pki, tmp_path):
    m = make_onnx(tmp_path / "mlp.onnx")
    g = make_golden(tmp_path / "g.npz")
    rep = build(pki, tmp_path / "b.bundle", m, release=7, golden=g, targets=("rpi4", "rpi5"))
    vm = B.open_bundle(rep.path, pki.board_trust(), now=NOW, target="rpi5", min_release=7)
    s = vm.summary()
    assert (s["model"], s["release"], s["version"], s["targets"]) == ("mlp", 7, "1.7.0", ["rpi4", "rpi5"])
    assert s["min_agent_version"] == "0.1.0" and s["expires"] > s["created"]
    assert [f["role"] for f in s["files"]] == ["model", "settings", "golden"]
    assert all(f["encoding"] == "zstd" and len(f["sha256"]) == 64 for f in s["files"])
    assert s["bundle_bytes"] == rep.path.stat().st_size


def test_extract_writes_exact_files(pki, tmp_path):
    m = make_onnx(tmp_path / "mlp.onnx")
    g = make_golden(tmp_path / "g.npz")
    rep = build(pki, tmp_path / "b.bundle", m, golden=g, settings={"runtime": "onnxruntime", "threads": 3,
                                                                    "execution_provider": "CPUExecutionProvider"})
    out = B.extract(B.open_bundle(rep.path, pki.board_trust(), now=NOW), tmp_path / "slot")
    assert [p.name for p in out] == ["mlp.onnx", "settings.json", "golden.npz"]
    assert (tmp_path / "slot" / "mlp.onnx").read_bytes() == m.read_bytes()
    assert json.loads((tmp_path / "slot" / "settings.json").read_text())["threads"] == 3
    with np.load(tmp_path / "slot" / "golden.npz") as z:
        assert set(z.files) == {"inputs_x", "outputs_y", "labels"}
    assert files_in(tmp_path / "slot") == ["golden.npz", "mlp.onnx", "settings.json"]  # no staging left


def test_failed_extract_keeps_existing_slot_untouched(pki, tmp_path):
    m = make_onnx(tmp_path / "mlp.onnx")
    rep = build(pki, tmp_path / "b.bundle", m)
    slot = tmp_path / "slot"
    slot.mkdir()
    (slot / "mlp.onnx").write_bytes(b"previous")
    data = bytearray(rep.path.read_bytes())
    data[-3] ^= 0xFF
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(bytes(data))
    with pytest.raises(HashMismatch):
        B.extract(B.open_bundle(bad, pki.board_trust(), now=NOW), slot)
    assert files_in(slot) == ["mlp.onnx"] and (slot / "mlp.onnx").read_bytes() == b"previous"


def test_bad_inputs_are_refused_before_writing(pki, tmp_path):
    (tmp_path / "x.onnx").write_text("not a model")
    with pytest.raises(ModelError, match="ONNX"):
        build(pki, tmp_path / "o.bundle", tmp_path / "x.onnx")
    (tmp_path / "x.bin").write_bytes(b"\x08\x01")
    with pytest.raises(ModelError, match=".onnx or .tflite"):
        build(pki, tmp_path / "o.bundle", tmp_path / "x.bin")
    m = make_onnx(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "nogold.npz", inputs_x=np.zeros(3))
    with pytest.raises(DataError, match="output"):
        build(pki, tmp_path / "o.bundle", m, golden=tmp_path / "nogold.npz")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    import zipfile
    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as z:
        z.write(tmp_path / "obj.npy", "inputs_x.npy")
        z.write(tmp_path / "obj.npy", "outputs_y.npy")
    with pytest.raises(DataError, match="plain arrays"):
        build(pki, tmp_path / "o.bundle", m, golden=tmp_path / "pickled.npz")
    with pytest.raises(DataError, match="runtime"):
        build(pki, tmp_path / "o.bundle", m, settings={"threads": 2})
    assert not (tmp_path / "o.bundle").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_manifest_is_canonical_and_reproducible(pki, tmp_path):
    m = make_onnx(tmp_path / "mlp.onnx")
    a = build(pki, tmp_path / "a.bundle", m).path.read_bytes()
    b = build(pki, tmp_path / "b.bundle", m).path.read_bytes()
    assert a == b  # same inputs, same time -> byte-identical (Ed25519 is deterministic)


# --------------------------------------------------------------------------- CLI
def run(args, ok=True):
    r = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, (r.stdout, r.stderr)
    return r


def test_cli_end_to_end(tmp_path):
    pk = tmp_path / "pki"
    outputs = []
    outputs.append(run(["keys", "init-root", pk, "--json"]).stdout)
    outputs.append(run(["keys", "new-release-key", pk / "rel.key"]).stdout)
    outputs.append(run(["keys", "new-release-key", pk / "rel2.key"]).stdout)
    outputs.append(run(["keys", "sign-release-keys", "--root", pk / "root.json", "--root-key", pk / "root-1.key",
                        "--root-key", pk / "root-3.key", "--key", pk / "rel.key.pub", "--key", pk / "rel2.key.pub",
                        "--version", 1, "-o", pk / "rk.json"]).stdout)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    make_onnx(tmp_path / "a" / "m.onnx", hidden=256)
    make_onnx(tmp_path / "b" / "m.onnx", hidden=256, drift=1e-4)
    (tmp_path / "s.json").write_text('{"runtime": "onnxruntime", "threads": 2}')
    common = ["--name", "mlp", "--target", "rpi4-2gb", "--key", pk / "rel.key", "--release-keys", pk / "rk.json",
              "--root", pk / "root.json", "--settings", tmp_path / "s.json"]
    run(["bundle", tmp_path / "a" / "m.onnx", "--release", 1, "--version", "1.0", *common, "-o", tmp_path / "1.bundle"])
    r = run(["bundle", tmp_path / "b" / "m.onnx", "--release", 2, "--version", "1.1", *common,
             "-o", tmp_path / "2.bundle", "--json"])
    assert json.loads(r.stdout)["bundle_bytes"] > 0
    r = run(["delta", tmp_path / "1.bundle", tmp_path / "2.bundle", "-o", tmp_path / "d.bundle",
             "--key", pk / "rel.key", "--root", pk / "root.json", "--json"])
    d = json.loads(r.stdout)
    assert d["fallback_to_full"] is False and d["ratio"] < 1
    run(["verify", tmp_path / "1.bundle", "--root", pk / "root.json", "--target", "rpi4-2gb", "--extract", tmp_path / "slot"])
    r = run(["verify", tmp_path / "d.bundle", "--root", pk / "root.json", "--base-dir", tmp_path / "slot",
             "--min-release", 2, "--json"])
    v = json.loads(r.stdout)
    assert v["ok"] and v["payloads_rebuilt"] and v["kind"] == "delta"
    # revoke rel.key; bundles signed by it are refused by a board holding the new list
    rel_id = json.loads(run(["keys", "show", pk / "rel.key.pub", "--json"]).stdout)["keyid"]
    run(["keys", "revoke", rel_id[:12], "--root", pk / "root.json", "--release-keys", pk / "rk.json",
         "--root-key", pk / "root-2.key", "--root-key", pk / "root-3.key", "-o", pk / "rk2.json"])
    r = run(["verify", tmp_path / "1.bundle", "--root", pk / "root.json", "--release-keys", pk / "rk2.json"], ok=False)
    assert r.exit_code != 0 and "revoked" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # rotate the root (2 old + the new keys), and check it chains
    for i in range(3):
        run(["keys", "new-release-key", pk / f"new-root-{i}.key"])
    run(["keys", "rotate-root", "--root", pk / "root.json", "--old-key", pk / "root-1.key", "--old-key",
         pk / "root-2.key", *sum([["--new-key", pk / f"new-root-{i}.key"] for i in range(3)], []),
         "-o", pk / "root-v2.json"])
    assert json.loads((pk / "root-v2.json").read_text())["signed"]["version"] == 2
    # no private key material ever printed
    everything = "".join(outputs)
    for k in pk.glob("*.key"):
        body = "".join(k.read_text().strip().splitlines()[1:-1])
        assert body not in everything


@pytest.mark.parametrize("content,needle", [(b"hello world", "bad magic"), (b"EPBUN", "cut short"), (b"", "bad magic")])
def test_cli_bad_input_one_line_error(tmp_path, content, needle):
    pk = tmp_path / "pki"
    run(["keys", "init-root", pk])
    (tmp_path / "x.bundle").write_bytes(content)
    r = run(["verify", tmp_path / "x.bundle", "--root", pk / "root.json", "--extract", tmp_path / "out"], ok=False)
    assert r.exit_code != 0 and needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_refuses_loose_key(tmp_path):
    pk = tmp_path / "pki"
    run(["keys", "init-root", pk])
    os.chmod(pk / "root-1.key", 0o644)
    r = run(["keys", "sign-release-keys", "--root", pk / "root.json", "--root-key", pk / "root-1.key",
             "--root-key", pk / "root-2.key", "--version", 1, "-o", pk / "rk.json"], ok=False)
    assert r.exit_code != 0 and "chmod 600" in r.stderr and not (pk / "rk.json").exists()


def test_bundle_over_the_targets_ota_budget_is_refused(tmp_path):
    """rpi4-2gb's OTA budget is 8 MB: a larger bundle exits 4 and leaves nothing, unless overridden."""
    import numpy as np

    pk = tmp_path / "pki"
    run(["keys", "init-root", pk])
    run(["keys", "new-release-key", pk / "rel.key"])
    run(["keys", "sign-release-keys", "--root", pk / "root.json", "--root-key", pk / "root-1.key",
         "--root-key", pk / "root-2.key", "--key", pk / "rel.key.pub", "--version", 1, "-o", pk / "rk.json"])
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(1600, 1600)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1600])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1600])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    import onnx
    onnx.save(m, str(tmp_path / "big.onnx"))  # 10.2 MB of random floats: zstd cannot shrink it below 8 MB
    common = ["--name", "big", "--release", 1, "--version", "1.0", "--target", "rpi4-2gb", "--key", pk / "rel.key",
              "--release-keys", pk / "rk.json", "--root", pk / "root.json"]
    r = run(["bundle", tmp_path / "big.onnx", *common, "-o", tmp_path / "b.bundle"], ok=False)
    assert r.exit_code == 4 and "OTA budget" in r.output and not (tmp_path / "b.bundle").exists()
    run(["bundle", tmp_path / "big.onnx", *common, "--allow-oversize", "-o", tmp_path / "b.bundle"])
    assert (tmp_path / "b.bundle").stat().st_size > 8e6
