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
