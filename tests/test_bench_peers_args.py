"""bench_peers.py's command line parses without the heavy peer venvs (the peers are not in CI)."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_peers.py"


def _mod():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_parses_peer_selection_and_limits():
    m = _mod()
    a = m.build_parser().parse_args(["--only", "nncf-default", "aimet-recipe", "--calib-size", "8"])
    assert a.only == ["nncf-default", "aimet-recipe"] and a.calib_size == 8
    assert {p[0] for p in m.PEERS} >= {"ort-default", "nncf-accuracy-control", "aimet-cle", "aimet-adaround"}


def test_rejects_unknown_peer():
    with pytest.raises(SystemExit):
        _mod().build_parser().parse_args(["--only", "tensorrt"])


def test_resume_options_and_kept_results(tmp_path):
    """A rerun reports kept per-peer results (failures included) without quantizing anything."""
    import json

    m = _mod()
    a = m.build_parser().parse_args(["--work", str(tmp_path), "--kept-only", "--redo", "aimet-cle"])
    assert a.kept_only and a.redo == ["aimet-cle"] and a.work == str(tmp_path)
    (tmp_path / "aimet-cle.result.json").write_text(json.dumps({"peer": "aimet-cle", "error": "exit 1: boom"}))
    peer = next(p for p in m.PEERS if p[0] == "aimet-cle")
    r = m.run_or_resume(peer, a, {}, tmp_path, {}, {})
    assert r["error"] == "exit 1: boom"
    r = m.run_or_resume(next(p for p in m.PEERS if p[0] == "nncf-default"), a, {}, tmp_path, {}, {})
    assert r["error"] == "not run yet"
