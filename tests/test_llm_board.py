"""An LLM bundle on the board: the agent's token metrics (``bench``) and its golden-prompt health
check (next-token agreement and perplexity ratio), on a tiny real exported decoder (2 layers,
hidden 64, GQA, KV cache) run by the agent's own runtime adapter. The golden set is small (4
prompts, 256 positions) and the check must pass the model and its INT8 weight-only version,
and fail weights perturbed by 10 %, another model of the same shape, and sharpened logits
(argmax unchanged: only the perplexity ratio can catch them)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from agent_helpers import TARGET, init_board, make_pki, run_agent
from llm_helpers import tiny_llama

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from edgepack.llm.export import OnnxLM, build_onnx
    from edgepack.llm.golden import make_golden
    root = tmp_path_factory.mktemp("llm-board")
    model = build_onnx(tiny_llama(root / "hf"), root / "fp32", "fp32")
    rng = np.random.default_rng(5)
    golden = make_golden(OnnxLM(model, threads=1).logits, [rng.integers(0, 320, 64) for _ in range(4)])
    np.savez(root / "golden.npz", **golden)
    return {"root": root, "model": model, "golden": golden, "golden_path": root / "golden.npz"}


def _variant(llm, name: str, change) -> Path:
    """A copy of the model whose initializers ``change(name, array)`` rewrites (None: unchanged)."""
    dst = llm["root"] / name
    dst.mkdir(exist_ok=True)
    shutil.copy(llm["model"].parent / "genai_config.json", dst)
    m = onnx.load(str(llm["model"]))
    rng = np.random.default_rng(9)
    for init in m.graph.initializer:
        new = change(init.name, numpy_helper.to_array(init), rng)
        if new is not None:
            init.CopyFrom(numpy_helper.from_array(new.astype(np.float32), init.name))
    onnx.save(m, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return dst / "model.onnx"


def _noise(rel):
    return lambda n, a, rng: (a + rng.standard_normal(a.shape) * rel * a.std()) if a.ndim == 2 and a.dtype == np.float32 else None


def _redrawn(n, a, rng):
    return rng.standard_normal(a.shape) * a.std() if a.ndim == 2 and a.dtype == np.float32 else None


def _sharpened(n, a, rng):   # the final RMSNorm's gain x4: logits x4, the same argmax everywhere
    return a * 4.0 if "final_norm" in n else None


def _check(path: Path, golden: Path, **settings):
    from device_agent.health import Thresholds, check
    from device_agent.runtime import load_model
    th = Thresholds.from_settings({"health": settings} if settings else {}, None)
    return check(load_model(path, "onnxruntime", threads=1), golden, th, runs=5)


def test_bench_reports_token_metrics_in_the_agents_envelope(llm):
    from edgepack.llm.export import OnnxLM
    code, out, err = run_agent(None, "bench", "--model", str(llm["model"]), "--data", str(llm["golden_path"]),
                               "--threads", "1", "--prompt-tokens", "40", "--new-tokens", "9", "--generations", "2")
    assert code == 0 and out["ok"], err
    t = out["llm"]
    assert (t["prompt_tokens"], t["new_tokens"], t["generations"], t["vocab"]) == (40, 9, 2, 320)
    assert t["ttft_ms"] > 0 and abs(t["prefill_tok_s"] - 40 / (t["ttft_ms"] / 1e3)) < 0.02 * t["prefill_tok_s"]
    assert out["latency"]["runs"] == 2 * 8 and t["decode_tok_s"] > 0
    assert 0.5 < t["decode_tok_s"] * out["latency"]["p50_ms"] / 1e3 < 2.0   # tokens/s and ms/token agree
    assert out["peak_rss_mb"] >= out["rss_agent_mb"] + out["rss_model_mb"] > 0
    assert out["model_bytes"] > 390_000                      # model.onnx + its external data
    assert "golden prompt 0" in out["input"] and len(err.strip().splitlines()) == 1 and "TTFT" in err
    # the board's greedy tokens through its KV cache are the host's full-window argmax chain
    prompt = np.resize(llm["golden"]["ids"][:64], 40)[None]
    toks, _, _ = OnnxLM(llm["model"], threads=1).greedy(prompt, 9)
    assert t["tokens"] == toks


def test_health_check_passes_the_model_and_its_int8_weights(llm):
    from edgepack.llm.weightonly import WeightOnlyOptions, quantize_weight_only
    rep = _check(llm["model"], llm["golden_path"])
    assert rep.passed, rep.reason
    assert rep.llm["tokens"] == 256 and rep.llm["agreement"] == 1.0 and abs(rep.llm["ppl_ratio"] - 1) < 1e-5
    assert rep.comparison.top1_agreement == 1.0 and rep.latency["runs"] == 5
    w8 = llm["root"] / "w8" / "model.onnx"
    quantize_weight_only(llm["model"], w8, WeightOnlyOptions(bits=8, block_size=32))
    shutil.copy(llm["model"].parent / "genai_config.json", w8.parent)
    rep = _check(w8, llm["golden_path"])
    assert rep.passed and 0.9 <= rep.llm["agreement"] < 1.0, rep.reason


@pytest.mark.parametrize("name,change,fails_on", [
    ("noise10", _noise(0.10), "agreement"),
    ("other", _redrawn, "agreement"),
    ("sharpened", _sharpened, "perplexity"),
])
def test_health_check_fails_a_corrupted_model(llm, name, change, fails_on):
    rep = _check(_variant(llm, name, change), llm["golden_path"])
    assert not rep.passed and fails_on in rep.reason, rep.reason
    if name == "sharpened":   # argmax untouched: the agreement alone would have passed it
        assert rep.llm["agreement"] == 1.0 and rep.llm["ppl_ratio"] > 1.1


def test_the_host_judges_with_the_boards_code(llm):
    from edgepack.llm.golden import judge, judge_on_board_code
    from edgepack.llm.export import OnnxLM
    bad = _variant(llm, "noise10", _noise(0.10))
    board = _check(bad, llm["golden_path"]).llm
    host = judge_on_board_code(bad, llm["golden"])
    assert not host.ok and host.agreement == board["agreement"] and host.ppl == pytest.approx(board["ppl"])
    assert judge(OnnxLM(llm["model"], threads=1).logits, llm["golden"]).ok


def test_thresholds_come_from_the_bundle_bounded_by_the_board(llm):
    from device_agent.health import Thresholds
    # a bundle may tighten: an agreement of 1.0 demanded fails the INT8-like 2 % noise model
    assert _check(_variant(llm, "noise2", _noise(0.02)), llm["golden_path"]).passed
    rep = _check(llm["root"] / "noise2" / "model.onnx", llm["golden_path"], min_token_agreement=1.0)
    assert not rep.passed and "agreement" in rep.reason
    # ... never loosen past the board's floors
    th = Thresholds.from_settings({"health": {"min_token_agreement": 0.1, "max_ppl_ratio": 9.0}}, None)
    assert (th.min_token_agreement, th.max_ppl_ratio) == (0.9, 1.1)
    th = Thresholds.from_settings({"health": {"max_ppl_ratio": 9.0}}, None, floors={"max_ppl_ratio": 1.5})
    assert th.max_ppl_ratio == 1.5
    with pytest.raises(Exception, match="max_ppl_ratio"):
        Thresholds.from_settings({"health": {"max_ppl_ratio": float("nan")}}, None)


def _hostile(root: Path, golden: dict) -> dict[str, Path]:
    d = root / "hostile"
    d.mkdir(exist_ok=True)
    files = {"not-npz": b"PK\x03\x04 not a zip at all", "empty": b""}
    out = {}
    for n, b in files.items():
        (d / f"{n}.npz").write_bytes(b)
        out[n] = d / f"{n}.npz"
    variants = {
        "missing-ppl": {k: v for k, v in golden.items() if k != "ppl"},
        "lengths": {**golden, "lengths": golden["lengths"] + 1},
        "float-ids": {**golden, "ids": golden["ids"].astype(np.float32)},
        "nan-ppl": {**golden, "ppl": np.float64("nan")},
        "vocab": {**golden, "ids": golden["ids"] + 10_000},
        "top-ids-1d": {**golden, "top_ids": golden["top_ids"][:, 0]},
    }
    for n, arrays in variants.items():
        np.savez(d / f"{n}.npz", **arrays)
        out[n] = d / f"{n}.npz"
    obj = d / "pickled.npz"
    np.savez(obj, ids=np.array([object()] * 4, dtype=object), lengths=np.array([4]), top_ids=np.zeros((4, 1), int),
             ppl=np.float64(2))
    out["pickled"] = obj
    return out


def test_malformed_golden_data_is_one_named_line(llm):
    from device_agent.llm import GoldenDataError
    bad = _hostile(llm["root"], llm["golden"])
    for name, path in bad.items():
        with pytest.raises(GoldenDataError) as e:
            _check(llm["model"], path)
        assert "\n" not in str(e.value) and path.name in str(e.value) or name == "vocab", (name, e.value)
    for name in ("not-npz", "lengths", "pickled", "vocab"):
        code, out, err = run_agent(None, "eval", "--model", str(llm["model"]), "--data", str(bad[name]))
        assert code == 2 and out["error"]["type"] == "GoldenDataError", (name, out)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)


def _llm_bundle(pki, out: Path, model: Path, golden: Path, release: int) -> Path:
    """A signed full bundle of a decoder by ``edgepack bundle``'s library call: the KV-cache
    decoder is detected and its external data and genai_config.json come along."""
    from device_agent.durable import utc_now
    from edgepack.ota.bundle import build_bundle
    rep = build_bundle(out, models=[model], name="tiny-llm", release=release, version=f"1.{release}.0",
                       targets=[TARGET], signer=pki.release[0], release_keys_doc=pki.rk_doc, roots=[pki.root_doc],
                       settings={"runtime": "onnxruntime", "threads": 1}, golden=golden, now=utc_now())
    files = {f["path"]: f["role"] for f in rep.files}
    assert files == {"model.onnx": "model", "model.onnx.data": "extra", "genai_config.json": "extra",
                     "settings.json": "settings", "golden.npz": "golden"}, files
    return out


def test_the_bundle_command_packages_an_llm(llm, tmp_path):
    from typer.testing import CliRunner

    from device_agent.bundle import open_bundle
    from device_agent.trust import TrustRoot
    from edgepack.cli import app

    def cli(*args, ok=True):
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert (r.exit_code == 0) == ok, (r.stdout, r.stderr)
        return r

    pk = tmp_path / "pki"
    cli("keys", "init-root", pk)
    cli("keys", "new-release-key", pk / "rel.key")
    cli("keys", "sign-release-keys", "--root", pk / "root.json", "--root-key", pk / "root-1.key", "--root-key",
        pk / "root-3.key", "--key", pk / "rel.key.pub", "--version", 1, "-o", pk / "rk.json")
    common = ["--name", "tiny-llm", "--release", 1, "--target", TARGET, "--key", pk / "rel.key",
              "--release-keys", pk / "rk.json", "--root", pk / "root.json", "--golden", llm["golden_path"]]
    r = cli("bundle", llm["model"], *common, "--max-ppl-ratio", 1.05, "-o", tmp_path / "a.bundle", "--json")
    files = {f["path"]: f for f in json.loads(r.stdout)["files"]}
    assert set(files) == {"model.onnx", "model.onnx.data", "genai_config.json", "settings.json", "golden.npz"}
    assert files["model.onnx.data"]["length"] == (llm["model"].parent / "model.onnx.data").stat().st_size
    root = json.loads((pk / "root.json").read_text())
    vm = open_bundle(tmp_path / "a.bundle", TrustRoot.from_bytes(root))
    assert vm.manifest.model == "tiny-llm" and vm.file("model").path == "model.onnx"
    d = tmp_path / "x"
    from device_agent.bundle import extract
    extract(vm, d)
    st = json.loads((d / "settings.json").read_text())
    assert st["model"] == "model.onnx" and st["health"] == {"min_token_agreement": 0.9, "max_ppl_ratio": 1.05}
    # --no-llm: the graph alone, and LLM golden prompts are then not tensor goldens
    r = cli("bundle", llm["model"], *common, "--no-llm", "-o", tmp_path / "b.bundle", ok=False)
    assert "input*" in r.stdout + r.stderr
    # --llm on a model that is no decoder is one named line
    from ota_helpers import make_onnx
    make_onnx(tmp_path / "mlp.onnx")
    r = cli("bundle", tmp_path / "mlp.onnx", *common[:-2], "--llm", "-o", tmp_path / "c.bundle", ok=False)
    assert "not one KV-cache decoder" in r.stdout + r.stderr


def test_an_llm_bundle_installs_and_a_corrupted_release_rolls_back(llm, tmp_path):
    pki = make_pki(tmp_path / "pki")
    state = tmp_path / "board"
    init_board(state, pki, threads=1, trial_runs=4)
    good = _llm_bundle(pki, tmp_path / "r1.bundle", llm["model"], llm["golden_path"], 1)
    code, out, err = run_agent(state, "install", str(good))
    assert code == 0, (out, err)
    assert out["trial"]["llm"]["agreement"] == 1.0 and out["trial"]["llm"]["passed"]
    bad = _llm_bundle(pki, tmp_path / "r2.bundle", _variant(llm, "other", _redrawn), llm["golden_path"], 2)
    code, out, err = run_agent(state, "install", str(bad))
    assert code == 7 and "agreement" in json.dumps(out), (out, err)
    code, out, _ = run_agent(state, "bench", "--prompt-tokens", "16", "--new-tokens", "4", "--generations", "1")
    assert code == 0 and out["release"] == 1 and out["llm"]["decode_tok_s"] > 0
    # the host's fleet table shows the board's decode tokens/s (p90 ms is then per token)
    from edgepack.fleet.inventory import Board
    from edgepack.fleet.status import board_status
    from edgepack.fleet.store import Store
    st = Store(tmp_path / "fleet.db")
    st.add("b1", "bench", out)
    row = board_status(Board(name="b1", transport="local"), st)
    assert row.decode_tok_s == out["llm"]["decode_tok_s"] and row.p90_ms == pytest.approx(out["latency"]["p90_ms"])


def test_a_delta_between_fine_tunes_codes_the_weights_file_tensor_by_tensor(llm, tmp_path):
    """The external data file of two fine-tunes gets a tensor-delta (spans from the graph), not a
    byte-level patch-from the board would have to hold the base in memory for; the board applies it."""
    import onnx as _onnx

    from device_agent.bundle import extract, open_bundle
    from edgepack.ota.bundle import trust_for_check
    from edgepack.ota.delta import make_delta_bundle
    pki = make_pki(tmp_path / "pki")
    one = _onnx.load(str(llm["model"]), load_external_data=False)
    w = next(i.name for i in one.graph.initializer if i.dims and len(i.dims) == 2 and "layers.1" in i.name)
    tuned = _variant(llm, "tuned", lambda n, a, rng: a * 1.01 if n == w else None)
    r1 = _llm_bundle(pki, tmp_path / "r1.bundle", llm["model"], llm["golden_path"], 1)
    r2 = _llm_bundle(pki, tmp_path / "r2.bundle", tuned, llm["golden_path"], 2)
    rep = make_delta_bundle(r1, r2, tmp_path / "d.bundle", trust=trust_for_check([pki.root_doc], pki.rk_doc),
                            signer=[pki.release[0]])
    vm = open_bundle(tmp_path / "d.bundle", pki.board_trust())
    enc = {f.path: f.encoding for f in vm.files}
    assert enc["model.onnx.data"] == "tensor-delta" and enc["genai_config.json"] == "base-copy", (enc, rep)
    data = next(f for f in vm.files if f.path == "model.onnx.data")
    assert data.transport_length < data.length / 10
    base = tmp_path / "base"
    extract(open_bundle(r1, pki.board_trust()), base)
    extract(vm, tmp_path / "new", base_dir=base)
    assert (tmp_path / "new" / "model.onnx.data").read_bytes() == (tuned.parent / "model.onnx.data").read_bytes()
