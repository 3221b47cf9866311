"""Issue 13: a renamed model (model-v2.onnx against model.onnx) is paired by role, then by graph, and
the delta says so instead of silently sending it whole; `edgepack bundle` carries a single model as
NAME.onnx, so the next release's delta finds its base whatever the file is called on the laptop."""
from __future__ import annotations



import pytest

from edgepack.ota.delta import make_delta_bundle, pair_files
from edgepack.quantize.workflows import stable_model_names

from ota_helpers import NOW, build, make_onnx, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_renamed_model_is_paired_by_role_and_said(pki, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    m1 = make_onnx(tmp_path / "a" / "model.onnx", hidden=256)
    m2 = make_onnx(tmp_path / "b" / "model-v2.onnx", hidden=256, drift=1e-4)
    b1 = build(pki, tmp_path / "1.bundle", m1, release=1)
    b2 = build(pki, tmp_path / "2.bundle", m2, release=2)
    rep = make_delta_bundle(b1.path, b2.path, tmp_path / "d.bundle", trust=pki.board_trust(), signer=pki.release[0],
                            now=NOW)
    row = next(f for f in rep.files if f["path"] == "model-v2.onnx")
    assert row["paired_with"] == "model.onnx" and row["paired_by"] == "role"
    assert rep.warnings and "model-v2.onnx corresponds to model.onnx" in rep.warnings[0]
    assert "keep the file name" in rep.warnings[0]


def test_stable_name_gives_a_real_delta(pki, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "s1").mkdir(), (tmp_path / "s2").mkdir()
    m1 = make_onnx(tmp_path / "a" / "model.onnx", hidden=256)
    m2 = make_onnx(tmp_path / "b" / "model-v2.onnx", hidden=256, drift=1e-4)
    [s1] = stable_model_names([m1], "mlp", tmp_path / "s1")
    [s2] = stable_model_names([m2], "mlp", tmp_path / "s2")
    assert s1.name == s2.name == "mlp.onnx" and s2.read_bytes() == m2.read_bytes()
    b1 = build(pki, tmp_path / "1.bundle", s1, release=1)
    b2 = build(pki, tmp_path / "2.bundle", s2, release=2)
    rep = make_delta_bundle(b1.path, b2.path, tmp_path / "d.bundle", trust=pki.board_trust(), signer=pki.release[0],
                            now=NOW)
    assert not rep.fallback and not rep.warnings and rep.bundle_bytes < 0.8 * rep.full_bundle_bytes
    # the same two models under their own file names: sent whole (the ratio the issue measured)
    r1 = build(pki, tmp_path / "r1.bundle", m1, release=1)
    r2 = build(pki, tmp_path / "r2.bundle", m2, release=2)
    renamed = make_delta_bundle(r1.path, r2.path, tmp_path / "rd.bundle", trust=pki.board_trust(),
                                signer=pki.release[0], now=NOW)
    assert renamed.bundle_bytes > rep.bundle_bytes + 0.2 * rep.full_bundle_bytes


def test_pairing_by_graph_when_roles_are_ambiguous(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class F:
        path: str
        role: str

    a, b = tmp_path / "old", tmp_path / "new"
    a.mkdir(), b.mkdir()
    make_onnx(a / "enc.onnx", hidden=64, seed=1)
    make_onnx(a / "dec.onnx", hidden=32, seed=2)
    make_onnx(b / "enc-v2.onnx", hidden=64, seed=1, drift=1e-3)
    p = pair_files([F("enc-v2.onnx", "model"), F("dec.onnx", "model")], [F("enc.onnx", "model"),
                                                                          F("dec.onnx", "model")], b, a)
    assert p == {"enc-v2.onnx": ("enc.onnx", "role")}  # dec.onnx matched by path: one free candidate left
    make_onnx(b / "x.onnx", hidden=64, seed=1)
    p = pair_files([F("x.onnx", "model"), F("y.onnx", "model")], [F("enc.onnx", "model"), F("dec.onnx", "model")],
                   b, a)
    assert p.get("x.onnx") == ("enc.onnx", "graph")

