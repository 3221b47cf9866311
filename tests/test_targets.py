import pytest

from edgepack.errors import TargetError
from edgepack.targets import list_targets, load_target, parse_target


def test_shipped_targets_load_and_validate():
    names = list_targets()
    for required in ("rpi4-2gb", "phone-npu-int8", "hybrid-npu-int8-cpu-fp16", "x86-vnni"):
        assert required in names
    rpi = load_target("rpi4-2gb")
    assert rpi.ram_mb == 2048 and rpi.float_allowed and rpi.ota_budget_mb > 0
    npu = load_target("phone-npu-int8")
    assert not npu.float_allowed and not npu.quant.allow_dynamic
    assert npu.compute[0].dtypes == ("int8",)
    hyb = load_target("hybrid-npu-int8-cpu-fp16")
    assert {"fp16", "int8"} <= {d for u in hyb.compute for d in u.dtypes}


def test_unknown_target_names_the_known_ones():
    with pytest.raises(TargetError, match="unknown target 'nope'.*rpi4-2gb"):
        load_target("nope")


def _valid() -> dict:
    return {"name": "b", "arch": "aarch64", "ram_mb": 512, "storage_mb": 1024, "ota_budget_mb": 4.0,
            "compute": [{"name": "cpu", "kind": "cpu", "dtypes": ["int8", "fp32"], "runtimes": ["onnxruntime"]}],
            "budgets": {"max_top1_drop": 1.0, "latency_ms": 10.0, "model_ram_mb": 64}}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("ram_mb"), "missing field 'ram_mb'"),
    (lambda d: d.update(ram_mb="lots"), "'ram_mb' must be int"),
    (lambda d: d.update(compute=[]), "at least one"),
    (lambda d: d["compute"][0].update(dtypes=["int3"]), "unknown dtype"),
    (lambda d: d["compute"][0].update(kind="fpga"), "kind must be"),
    (lambda d: d["budgets"].update(max_top1_drop=-1.0), "max_top1_drop"),
    (lambda d: d.update(quantization={"activation_dtype": "fp8"}), "activation_dtype"),
    (lambda d: d.update(quantization={"bogus": 1}), "unknown \\[quantization\\]"),
    (lambda d: d.update(ota_budget_mb=0), "ota_budget_mb must be positive"),
    (lambda d: (d["compute"][0].update(dtypes=["int8"]), d.update(quantization={"allow_float_fallback": True})),
     "allow_float_fallback needs"),
])
def test_invalid_profiles_name_the_field(mutate, message):
    d = _valid()
    parse_target(d)  # the base profile is valid
    mutate(d)
    with pytest.raises(TargetError, match=message):
        parse_target(d)


def test_invalid_toml_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("name = [unclosed")
    with pytest.raises(TargetError, match="invalid TOML"):
        load_target(p)


def test_a_wheel_install_finds_the_board_profiles(tmp_path):
    """Board profiles are package data: a non-editable install (a wheel, run from another folder)
    lists them and loads the main job's target, with no repository checkout on the path."""
    import json
    import os
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    import shutil

    root = Path(__file__).resolve().parents[1]
    # build from a copy of the sources: setuptools writes build/ into the tree it builds, and a stale
    # build/lib would leak old modules into the wheel
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "dist", "out", ".edgepack",
                                                            "bench-results", "__pycache__", "*.egg-info", "docs"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("edgepack-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith("edgepack/targets/profiles/") and n.endswith(".toml")}
        z.extractall(tmp_path / "site")
    assert "edgepack/targets/profiles/rpi4-2gb.toml" in shipped
    env = {k: v for k, v in os.environ.items() if k != "EDGEPACK_TARGETS"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    code = ("import json, edgepack.targets as t; from edgepack.cli import main\n"
            "print(json.dumps({'file': t.__file__, 'targets': t.list_targets(), "
            "'rpi': t.load_target('rpi4-2gb').ram_mb}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["file"].startswith(str(tmp_path / "site"))  # the wheel's copy, not the checkout
    assert {"rpi4-2gb", "phone-npu-int8", "hybrid-npu-int8-cpu-fp16", "x86-avx2"} <= set(out["targets"])
    assert len(out["targets"]) == len(shipped) and out["rpi"] == 2048
    r = subprocess.run([sys.executable, "-m", "edgepack.cli", "targets", "--json"], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0 and "rpi4-2gb" in r.stdout, r.stderr[-2000:]
