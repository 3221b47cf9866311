"""bench_peers.py's command line parses without the heavy peer venvs (the peers are not in CI)."""
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_peers.py"


def _mod():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    m = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = m   # dataclasses look their module up there
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


def _main_sh_quantize_args() -> list[str]:
    """The arguments of scripts/main.sh step 1 (`$EP quantize ... "$@"`), continuation lines joined."""
    import shlex

    text = (SCRIPT.parents[0] / "main.sh").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("$EP quantize"))
    toks = shlex.split(line.split("||")[0])
    return [t for t in toks[2:] if t != "$@"]


def test_default_edgepack_command_is_the_main_jobs():
    """The side-by-side edgepack figure is the main job's, argument for argument."""
    import shlex

    m = _mod()
    ours = shlex.split(m.MAIN_JOB)
    assert ours[:2] == ["edgepack", "quantize"]
    assert ours[2:] == _main_sh_quantize_args()
    assert m.SUITES["efficientnet"].edgepack_cmd == m.MAIN_JOB


def test_quantize_argv_expands_assets_redirects_output_and_asks_for_json(tmp_path):
    m = _mod()
    cmd = ('PYTHONPATH=/x nice -n 5 .venv/bin/edgepack quantize "$A/models/m.onnx" --target rpi4-2gb '
           '--calib ${A}/images/c --calib-size 100 -o out/m.onnx --max-evals 12 "$@"')
    argv = m.quantize_argv(cmd, Path("/assets"), tmp_path / "e.onnx")
    assert argv == ["/assets/models/m.onnx", "--target", "rpi4-2gb", "--calib", "/assets/images/c",
                    "--calib-size", "100", "--max-evals", "12", "-o", str(tmp_path / "e.onnx"), "--json"]
    assert m.quantize_argv("edgepack quantize a.onnx --output=o.onnx --json", Path("/a"), Path("/w.onnx")) == [
        "a.onnx", "--json", "-o", "/w.onnx"]
    with pytest.raises(SystemExit):
        m.quantize_argv("edgepack bundle a.onnx", Path("/a"), Path("/w.onnx"))


def test_edgepack_command_from_another_trees_json(tmp_path):
    """--edgepack-from runs the JSON's command with the code of the tree the JSON lies in."""
    import json

    m = _mod()
    tree = tmp_path / "wt"
    (tree / "edgepack").mkdir(parents=True)
    (tree / "bench-results").mkdir()
    f = tree / "bench-results" / "final.json"
    f.write_text(json.dumps({"command": ["edgepack", "quantize", "$A/m.onnx", "-o", "out/x.onnx"], "agreement": 97}))
    a = m.build_parser().parse_args(["--edgepack-from", str(f), "--only", "edgepack"])
    cmd, t, src = m.edgepack_source(a)
    assert cmd == "edgepack quantize '$A/m.onnx' -o out/x.onnx" and t == tree.resolve() and src == str(f)
    assert m.quantize_argv(cmd, Path("/A"), Path("/w.onnx"))[0] == "/A/m.onnx"
    a = m.build_parser().parse_args(["--edgepack-cmd", "edgepack quantize b.onnx", "--edgepack-tree", str(tree)])
    assert m.edgepack_source(a)[:2] == ("edgepack quantize b.onnx", tree.resolve())
    a = m.build_parser().parse_args(["--suite", "fashion"])
    assert "fashion-cnn.onnx" in m.edgepack_source(a)[0] and m.edgepack_source(a)[1] == m.ROOT


def test_versus_gives_points_and_size_ratios():
    m = _mod()
    ep = {"peer": "edgepack", "bytes": 5_000_000, "exact": {"heldout": {"agreement": 97.0, "top1": None, "drop": 3.0}},
          "host": {"heldout": {"agreement": 90.0, "top1": None, "drop": 10.0}}}
    nncf = {"peer": "nncf-default", "bytes": 5_200_000,
            "exact": {"heldout": {"agreement": 84.0, "top1": None, "drop": 16.0}}, "host": {"error": "x"}}
    small = {"peer": "ort-default", "bytes": 4_900_000,
             "exact": {"heldout": {"agreement": 60.0, "top1": None, "drop": 40.0}}, "host": {}}
    v = m.versus([nncf, small, {"peer": "aimet-cle", "error": "exit 1"}, ep], 18_600_000)
    assert v["nncf-default"]["exact_points_edgepack_minus_peer"] == 13.0
    assert v["nncf-default"]["host_points_edgepack_minus_peer"] is None
    assert v["nncf-default"]["peer_over_edgepack_size"] == 1.04
    assert v["nncf-default"]["edgepack_as_accurate_exact_at_no_larger_size"] is True
    assert v["ort-default"]["edgepack_as_accurate_exact_at_no_larger_size"] is False   # it is smaller
    assert "aimet-cle" not in v and ep["x_smaller_than_fp32"] == 3.72
    # labelled data: the headline is minus the drop (higher is better)
    lab = {"peer": "edgepack", "bytes": 1, "exact": {"test": {"agreement": 99.0, "top1": 90.0, "drop": 0.2}}}
    assert m.primary(lab, "exact") == -0.2


def test_only_accepts_edgepack_and_suites():
    m = _mod()
    a = m.build_parser().parse_args(["--suite", "fashion", "--only", "ort-default", "edgepack", "--redo", "edgepack"])
    assert a.suite == "fashion" and a.only == ["ort-default", "edgepack"] and m.NAMES[-1] == "edgepack"


def test_edgepack_results_are_kept_per_command_and_tree(tmp_path):
    """Two edgepack commands (or trees) keep separate results in one --work; the same one resumes."""
    import json

    m = _mod()
    p = m.build_parser()
    a1 = p.parse_args(["--work", str(tmp_path), "--kept-only", "--edgepack-cmd", "edgepack quantize a.onnx -o x.onnx"])
    a2 = p.parse_args(["--work", str(tmp_path), "--kept-only", "--edgepack-cmd", "edgepack quantize a.onnx --max-drop 2"])
    (k1, s1), (k2, s2) = m.edgepack_key(a1, Path("/A")), m.edgepack_key(a2, Path("/A"))
    assert s1 != s2 and k1["argv"][-3:] == ["-o", "OUT.onnx", "--json"]
    assert m.edgepack_key(a1, Path("/A")) == (k1, s1)   # stable: a rerun finds it
    assert m.edgepack_or_resume(a1, tmp_path, Path("/A"), {}, {})["error"] == "not run yet"
    (tmp_path / f"{s1}.result.json").write_text(json.dumps({"peer": "edgepack", "exact": {}, "key": k1}))
    (tmp_path / f"{s1}.onnx").write_bytes(b"")
    assert m.edgepack_or_resume(a1, tmp_path, Path("/A"), {}, {})["path"] == tmp_path / f"{s1}.onnx"
    assert m.edgepack_or_resume(a2, tmp_path, Path("/A"), {}, {})["error"] == "not run yet"
