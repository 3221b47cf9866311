"""The quantize report rides in the signed bundle, and push refuses a budget-missing release
unless the operator accepts it explicitly (edgepack.ota.release_gate; issue 11, "Budgets enforced
downstream"). Real bundles, the real local board agent, the real CLI."""
from __future__ import annotations

import json

import pytest

from test_fleet_ssh import cli


def _report(path, met: bool, **over):
    doc = {"target": "rpi4-2gb", "budget_met": met, "budget_points": 1.0, "drop_points": 0.4 if met else 3.41,
           "agreement": 99.6 if met else 96.59, "metric": "top-1 agreement", "numerics": "exact",
           "int8_size_bytes": 5084732, "candidates": []}
    doc.update(over)
    path.write_text(json.dumps(doc))
    return path


def test_report_carried_and_gated(tmp_path):
    from agent_helpers import bundle, make_onnx, make_pki
    from edgepack.errors import BudgetNotMet
    from edgepack.ota.release_gate import REPORT_NAME, bundled_report, gate

    pki = make_pki(tmp_path / "pki")
    m = make_onnx(tmp_path / "m.onnx", seed=1)
    miss = bundle(pki, tmp_path / "miss.bundle", m, release=1, quantize_report=_report(tmp_path / "a.json", False))
    ok = bundle(pki, tmp_path / "ok.bundle", m, release=1, quantize_report=_report(tmp_path / "b.json", True))
    none = bundle(pki, tmp_path / "none.bundle", m, release=1)
    facts = bundled_report(miss)
    assert facts["budget_met"] is False and facts["drop_points"] == 3.41 and facts["target"] == "rpi4-2gb"
    with pytest.raises(BudgetNotMet, match="missed its accuracy budget.*3.41 points > 1 allowed.*--accept-budget-miss"):
        gate(miss)
    assert "pushing it because --accept-budget-miss" in gate(miss, accept_budget_miss=True)
    assert gate(ok) is None and bundled_report(ok)["budget_met"] is True
    assert bundled_report(none) is None and "no quantize report" in gate(none)
    # the board's verifier accepts the extra payload (role "extra"), and it is signed like the model
    from device_agent.bundle import open_bundle
    vm = open_bundle(miss, pki.board_trust(True))
    assert vm.file("extra").path == REPORT_NAME


def test_tampered_or_bad_report(tmp_path):
    from agent_helpers import bundle, make_onnx, make_pki
    from edgepack.errors import DataError
    from edgepack.errors import UsageError
    from edgepack.ota.release_gate import bundled_report

    pki = make_pki(tmp_path / "pki")
    m = make_onnx(tmp_path / "m.onnx", seed=1)
    (tmp_path / "junk.json").write_text("{not json")
    for bad, msg in ((tmp_path / "junk.json", "not JSON"),
                     (_report(tmp_path / "c.json", "no"), "'budget_met' is missing or not a bool"),
                     (tmp_path / "absent.json", "cannot read")):
        with pytest.raises(DataError, match=msg):
            bundle(pki, tmp_path / "x.bundle", m, release=1, quantize_report=bad)
        assert not (tmp_path / "x.bundle").exists()
    b = bundle(pki, tmp_path / "t.bundle", m, release=1, quantize_report=_report(tmp_path / "d.json", True))
    raw = bytearray(b.read_bytes())
    raw[-3] ^= 0xFF   # the report is the last payload: flip a byte of it
    b.write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="does not match the manifest's hash|corrupt"):
        bundled_report(b)


def test_push_refuses_budget_miss_unless_accepted(tmp_path):
    from agent_helpers import bundle, golden_for, make_onnx, make_pki

    pki = make_pki(tmp_path / "pki")
    (tmp_path / "root.json").write_text(json.dumps(pki.root_doc))
    m = make_onnx(tmp_path / "m.onnx", seed=1)
    r1 = bundle(pki, tmp_path / "r1.bundle", m, release=1, golden=golden_for(m, tmp_path / "g.npz"),
                quantize_report=_report(tmp_path / "q.json", False))
    env = {"EDGEPACK_FLEET_HOME": str(tmp_path / "home")}
    assert cli("fleet", "bootstrap", "--trust-root", str(tmp_path / "root.json"), env=env).returncode == 0
    r = cli("push", str(r1), env=env)
    assert r.returncode == 4 and "missed its accuracy budget" in r.stderr and "nothing pushed" in r.stderr, r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1   # one line, no traceback
    r = cli("fleet", "status", "--json", env=env)
    assert r.returncode == 0 and "committed" not in r.stdout
    r = cli("push", str(r1), "--accept-budget-miss", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert "--accept-budget-miss was given" in r.stderr
    assert json.loads(r.stdout)["boards"][0]["result"] == "committed"
