"""The fixed perplexity protocol, the placement planner and the memory model (no model needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from transformers import LlamaConfig

from edgepack.errors import DataError, TargetError, UsageError
from edgepack.llm.memory import estimate, fits, kv_cache_bytes
from edgepack.llm.perplexity import PROTOCOL, PerplexityProtocol, perplexity, windows
from edgepack.llm.placement import (BoardLLM, board_llm, decoder_ops, evaluate_plan, naive_placement, plan,
                                    search_promotions)
from edgepack.targets import load_target

SMOL = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, head_dim=64)


@pytest.mark.parametrize("ctx,stride,n", [(512, 512, 2048), (8, 3, 50), (8, 8, 21), (5, 1, 12)])
def test_every_token_scored_once(ctx, stride, n):
    p = PerplexityProtocol(context=ctx, stride=stride, tokens=n)
    scored = []
    for b, e, first in windows(n, p):
        assert e - b <= ctx and first >= 1
        scored += list(range(b + first, e))
    if stride < ctx:
        assert scored == list(range(1, n))
    else:   # non-overlapping windows: a window's first token has no context and is not scored
        assert scored == [t for t in range(1, n) if t % ctx]


def test_uniform_model_has_vocab_perplexity_and_protocol_id():
    p = PerplexityProtocol(context=16, stride=8, tokens=40)
    r = perplexity(lambda x: np.zeros((1, x.shape[1], 37), np.float32), np.arange(40) % 37, p)
    assert r.ppl == pytest.approx(37.0) and r.scored_tokens == 39 and r.protocol == p.id
    assert PROTOCOL.id != p.id and "ctx512" in PROTOCOL.id


def test_perplexity_matches_hand_computation():
    p = PerplexityProtocol(context=4, stride=4, tokens=8)
    ids = np.array([1, 2, 3, 0, 1, 2, 3, 0])
    rng = np.random.default_rng(0)
    table = rng.normal(size=(4, 4)).astype(np.float32)   # a bigram model: logits depend on the token

    r = perplexity(lambda x: table[x], ids, p)
    nll = []
    for w in (ids[:4], ids[4:]):
        for a, b in zip(w[:-1], w[1:]):
            lg = table[a].astype(np.float64)
            nll.append(math.log(np.exp(lg).sum()) - lg[b])
    assert r.ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-9)


def test_bad_protocol_and_bad_logits_are_named_errors():
    with pytest.raises(DataError):
        PerplexityProtocol(context=8, stride=9, tokens=16)
    p = PerplexityProtocol(context=4, stride=4, tokens=8)
    with pytest.raises(DataError, match="shape"):
        perplexity(lambda x: np.zeros((x.shape[1], 5)), np.zeros(8, np.int64), p)
    with pytest.raises(DataError, match="non-finite"):
        perplexity(lambda x: np.full((1, x.shape[1], 5), np.nan), np.zeros(8, np.int64), p)
    with pytest.raises(DataError, match="expected 8"):
        perplexity(lambda x: np.zeros((1, x.shape[1], 5)), np.zeros(9, np.int64), p)


# ---------------------------------------------------------------- placement planner
@pytest.fixture(scope="module")
def board():
    return board_llm(load_target("hybrid-npu-int8-cpu-fp16"))


def test_norms_softmax_rotary_residuals_stay_on_cpu(board):
    ops = decoder_ops(SMOL)
    p = plan(ops, board, promote=[o.name for o in ops if o.kind == "down_proj"][:5])
    for r in p.rows:
        if r["kind"] in ("norm", "rope", "attention", "act", "add"):
            assert r["place"] == "cpu-fp16", r
    with pytest.raises(UsageError, match="cannot run on this NPU"):
        evaluate_plan(ops, {"layers.0.input_layernorm": "npu-a8w8"}, board)


def test_mac_fraction_is_the_share_of_decoder_matmul_macs(board):
    ops = decoder_ops(SMOL)
    h, i, kv = 576, 1536, 3 * 64
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    assert plan(ops, board).decoder_macs == 30 * per_layer
    downs = [o.name for o in ops if o.kind == "down_proj"]
    p = plan(ops, board, promote=downs)
    assert p.npu_int8_mac_fraction == pytest.approx(1 - h * i / per_layer)
    # promoted ops are either 16-bit on the NPU or on the CPU: the two fractions differ by the A16 share
    a16 = sum(r["macs"] for r in p.rows if r["place"] == "npu-a16w8")
    assert p.npu_mac_fraction - p.npu_int8_mac_fraction == pytest.approx(a16 / p.decoder_macs)


def test_plan_has_fewer_partitions_than_naive_and_moving_down_proj_merges_islands(board):
    ops = decoder_ops(SMOL)
    _, naive = naive_placement(ops, board)
    base = plan(ops, board)
    assert base.partitions < naive                 # q/k/v and gate/up share an NPU call
    assert base.partitions == 4 * 30 + 1
    p = plan(ops, board, promote=[o.name for o in ops if o.kind == "down_proj"])
    # down_proj sits between two CPU ops: on the CPU it removes its island, on the NPU at A16 it would not
    assert p.partitions < base.partitions
    assert all(p.placement[o.name] == "cpu-fp16" for o in ops if o.kind == "down_proj")


def test_a16_is_chosen_when_it_keeps_an_island_and_costs_less(board):
    ops = decoder_ops(SMOL)
    p = plan(ops, board, promote=["layers.3.self_attn.k_proj"])   # k between q and v: splitting costs 2 crossings
    assert p.placement["layers.3.self_attn.k_proj"] == "npu-a16w8"
    no_a16 = BoardLLM(**{**board.__dict__, "npu_a16w8_slowdown": 0.0})
    assert plan(ops, no_a16, promote=["layers.3.self_attn.k_proj"]).placement["layers.3.self_attn.k_proj"] == "cpu-fp16"


def test_board_profile_errors_name_the_field(tmp_path):
    src = load_target("hybrid-npu-int8-cpu-fp16").path.read_text()
    bad = tmp_path / "b.toml"
    bad.write_text(src.replace("cpu_fp16_gflops = 60.0", "cpu_fp16_gflop = 60.0"))
    from edgepack.targets import load_target as lt
    with pytest.raises(TargetError, match="cpu_fp16_gflops|cpu_fp16_gflop"):
        board_llm(lt(bad))
    with pytest.raises(TargetError, match=r"\[llm\]"):
        board_llm(load_target("rpi4-2gb"))


def test_search_finds_the_shortest_prefix_within_budget():
    ranking = [f"m{i}" for i in range(40)]
    calls = []

    def evaluate(promoted):          # quality improves with each promoted layer; 13 are needed
        calls.append(len(promoted))
        return 100.0 * (1.0 + 0.5 * max(0, 13 - len(promoted)) / 13) + (0.0 if len(promoted) >= 13 else 1.0)

    r = search_promotions(evaluate, ranking, 100.0, 0.03)
    assert r["promoted"] == ranking[:13] and r["met"]
    assert len(calls) <= 10
    r = search_promotions(evaluate, ranking, 100.0, 0.03, groups={"first 20": ranking[:20]})
    assert r["promoted"] == ranking[:13]


# ---------------------------------------------------------------- memory model
def test_kv_cache_formula_and_fits_are_monotone():
    assert kv_cache_bytes(SMOL, 1) == 2 * 30 * 3 * 64 * 2
    assert kv_cache_bytes(SMOL, 2048, kv_bytes=1) * 2 == kv_cache_bytes(SMOL, 2048)
    e = estimate(SMOL, 100_000_000, 512)
    assert e.total == e.weights + e.kv_cache + e.activations + e.runtime
    f = fits(SMOL, 100_000_000, 600_000_000, contexts=(512, 4096, 65536))
    assert [v["fits"] for v in f.values()] == [True, True, False]
    assert f[512]["bytes"] < f[4096]["bytes"] < f[65536]["bytes"]


def test_cli_plan_and_memory(tmp_path):
    import json

    from typer.testing import CliRunner

    from edgepack.cli import app
    SMOL.save_pretrained(str(tmp_path / "cfg"))
    promote = tmp_path / "promote.json"
    promote.write_text(json.dumps(["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]))
    r = CliRunner().invoke(app, ["llm", "plan", "--hf-dir", str(tmp_path / "cfg"), "--promote", str(promote),
                                 "-o", str(tmp_path / "plan.json")])
    assert r.exit_code == 0, r.output
    p = json.loads((tmp_path / "plan.json").read_text())
    assert p["placement"]["layers.0.mlp.down_proj"] == "cpu-fp16" and p["partitions"] == 4 * 30 + 1 - 2
    assert "naive per-op dispatch: 211 partitions" in r.output
    promote.write_text("{not json")
    r = CliRunner().invoke(app, ["llm", "plan", "--hf-dir", str(tmp_path / "cfg"), "--promote", str(promote)])
    assert r.exit_code == 2 and "not a JSON list" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["llm", "memory", "--weights-mb", "116", "--hf-dir", str(tmp_path / "cfg")])
    assert r.exit_code == 0 and "context   2048" in r.output and "fits" in r.output
    r = CliRunner().invoke(app, ["llm", "plan", "--hf-dir", str(tmp_path / "nope")])
    assert r.exit_code != 0 and "config.json" in r.output
