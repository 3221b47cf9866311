"""Placement planner for ``hybrid-npu-int8-cpu-fp16``: each decoder op on the NPU (INT8) or the
CPU (FP16), from the board profile, per-layer sensitivity and a quality budget.

The op list is the decoder as it executes per token: RMSNorm, q/k/v, rotary, attention core
(QK^T, softmax, AV over the KV cache), o_proj, residual add, RMSNorm, gate/up, SiLU*mul,
down_proj, residual add; then the final norm and ``lm_head``. Only ops the profile's NPU lists
(``int8_ops``, weight matmuls) may go there; norms, softmax, rotary, SiLU and residual adds stay
on the CPU in FP16 unless the NPU lists them. Each weight matmul has three placements:
``npu-a8w8`` (what the NPU runs fastest), ``npu-a16w8`` (16-bit activations, if the profile says
the NPU has them; slower) and ``cpu-fp16``. Every maximal run of consecutive NPU ops is one
partition; each partition costs two boundary crossings (the profile's per-island cost plus the
activation bytes over the memory bus).

Time per token is a roofline estimate from the profile's ``[llm]`` table (stated assumptions,
not a board measurement): each op takes max(MACs / unit rate, bytes moved / bandwidth).
A sensitive matmul leaves ``npu-a8w8`` only when the quality budget needs it, in order of
measured sensitivity, and then goes to whichever of ``npu-a16w8`` / ``cpu-fp16`` costs less
time, counting the partitions it merges or splits.
"""
from __future__ import annotations

import json
import sys
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

from ..errors import TargetError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MATMUL_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


@dataclass(frozen=True, kw_only=True)
class BoardLLM:
    """The ``[llm]`` table of a board profile: throughput assumptions for the planner."""

    npu_int8_tops: float            # dense INT8 tera-ops/s (2 ops per MAC) the NPU sustains
    npu_a16w8_slowdown: float       # 16-bit activations: time factor against INT8 (0: not supported)
    cpu_fp16_gflops: float          # sustained FP16 GFLOP/s on the CPU cores
    memory_gbs: float               # DRAM bandwidth both units share, GB/s
    boundary_us: float              # fixed cost per NPU<->CPU crossing (sync, cache maintenance)
    npu_ops: tuple = ("MatMul",)    # the op kinds the NPU runs (weight matmuls)
    kv_dtype_bytes: int = 2         # KV cache in FP16

    @property
    def a16(self) -> bool:
        return self.npu_a16w8_slowdown > 0


def board_llm(target) -> BoardLLM:
    """Read and validate ``[llm]`` from the target's TOML (errors name the field)."""
    path = getattr(target, "path", None)
    if path is None:
        raise TargetError(f"target {target.name}: no profile file to read [llm] from")
    data = tomllib.loads(Path(path).read_text()).get("llm")
    if not isinstance(data, dict):
        raise TargetError(f"{path}: no [llm] table (the LLM planner needs the board's throughput figures)")
    out = {}
    for f in BoardLLM.__dataclass_fields__.values():
        if f.name not in data:
            if f.default is not MISSING:
                continue
            raise TargetError(f"{path} [llm]: missing field {f.name!r}")
    unknown = set(data) - set(BoardLLM.__dataclass_fields__)
    if unknown:
        raise TargetError(f"{path} [llm]: unknown field(s) {sorted(unknown)}")
    for k, v in data.items():
        if k == "npu_ops":
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise TargetError(f"{path} [llm]: npu_ops must be a list of op names")
            out[k] = tuple(v)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise TargetError(f"{path} [llm]: {k} must be a non-negative number")
        else:
            out[k] = int(v) if k == "kv_dtype_bytes" else float(v)
    b = BoardLLM(**out)
    for k in ("npu_int8_tops", "cpu_fp16_gflops", "memory_gbs"):
        if getattr(b, k) <= 0:
            raise TargetError(f"{path} [llm]: {k} must be positive")
    return b


@dataclass(frozen=True)
class Op:
    name: str
    kind: str          # q_proj ... lm_head, norm, rope, attention, act, add
    macs: int          # per token
    weight_bytes: int  # INT8 weight bytes (matmuls); 0 otherwise
    act_bytes: int     # FP16 activation bytes in + out per token
    layer: int         # -1 for the head

    @property
    def is_matmul(self) -> bool:
        return self.kind in MATMUL_KINDS


def decoder_ops(config, context: int = 512, rotate_down: bool = False) -> list[Op]:
    """The per-token op list of a LLaMA-class config (decode step at ``context`` cached tokens).
    ``rotate_down``: the down_proj inputs are rotated first (edgepack.llm.w8a8.rotate_down), a
    fast transform on the CPU (n log n operations) right after SiLU*mul."""
    h, inter, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kvh = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or h // heads
    kv = kvh * hd
    ops: list[Op] = []

    def mm(i, kind, k, n):
        ops.append(Op(f"layers.{i}.{'self_attn' if kind.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{kind}",
                      kind, k * n, k * n, 2 * (k + n), i))

    def other(i, name, kind, macs, act):
        ops.append(Op(f"layers.{i}.{name}", kind, macs, 0, act, i))

    for i in range(L):
        other(i, "input_layernorm", "norm", h, 4 * h)
        mm(i, "q_proj", h, h)
        mm(i, "k_proj", h, kv)
        mm(i, "v_proj", h, kv)
        other(i, "rotary", "rope", h + kv, 4 * (h + kv))
        # QK^T and AV over the cache: activation x activation, reads the KV cache
        other(i, "attention", "attention", 2 * heads * hd * context, 2 * 2 * kv * context + 4 * h)
        mm(i, "o_proj", h, h)
        other(i, "residual_attn", "add", h, 6 * h)
        other(i, "post_attention_layernorm", "norm", h, 4 * h)
        mm(i, "gate_proj", h, inter)
        mm(i, "up_proj", h, inter)
        other(i, "act_mul", "act", 2 * inter, 6 * inter)
        if rotate_down:
            other(i, "down_rotation", "rotate", inter * max(1, (inter & -inter).bit_length()), 4 * inter)
        mm(i, "down_proj", inter, h)
        other(i, "residual_mlp", "add", h, 6 * h)
    ops.append(Op("norm", "norm", h, 0, 4 * h, -1))
    ops.append(Op("lm_head", "lm_head", h * config.vocab_size, h * config.vocab_size, 2 * (h + config.vocab_size), -1))
    return ops


def _npu_capable(op: Op, board: BoardLLM) -> bool:
    return op.is_matmul and "MatMul" in board.npu_ops or (op.kind in ("norm", "add", "act", "rope")
                                                         and op.kind in board.npu_ops)


def op_time_s(op: Op, place: str, board: BoardLLM) -> float:
    """Roofline time of one op per token on its unit."""
    bw = board.memory_gbs * 1e9
    if place == "npu-a8w8":
        compute = 2 * op.macs / (board.npu_int8_tops * 1e12)
        moved = op.weight_bytes + op.act_bytes / 2
    elif place == "npu-a16w8":
        compute = 2 * op.macs / (board.npu_int8_tops * 1e12) * board.npu_a16w8_slowdown
        moved = op.weight_bytes + op.act_bytes
    else:  # cpu-fp16: FP16 weights (twice the INT8 bytes)
        compute = 2 * op.macs / (board.cpu_fp16_gflops * 1e9)
        moved = 2 * op.weight_bytes + op.act_bytes
    return max(compute, moved / bw)


@dataclass
class Plan:
    placement: dict                    # op name -> npu-a8w8 | npu-a16w8 | cpu-fp16
    partitions: int                    # maximal runs of NPU ops
    boundaries: int
    time_per_token_s: float
    npu_mac_fraction: float            # decoder weight-matmul MACs on the NPU (A8 or A16)
    npu_int8_mac_fraction: float       # ... of them at INT8 activations (npu-a8w8)
    decoder_macs: int
    assumptions: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.time_per_token_s if self.time_per_token_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))


def evaluate_plan(ops: list[Op], placement: dict, board: BoardLLM) -> Plan:
    """Cost a complete placement: per-op time, partitions, boundary crossings, MAC fractions."""
    t, parts, prev_npu, rows = 0.0, 0, False, []
    dec_macs = npu_macs = npu8 = 0
    for op in ops:
        place = placement.get(op.name, "cpu-fp16")
        if place.startswith("npu") and not _npu_capable(op, board):
            raise UsageError(f"{op.name} ({op.kind}) cannot run on this NPU (it runs {', '.join(board.npu_ops)})")
        if place == "npu-a16w8" and not board.a16:
            raise UsageError(f"{op.name}: this NPU has no 16-bit activations")
        ot = op_time_s(op, place, board)
        npu = place.startswith("npu")
        if npu and not prev_npu:
            parts += 1
            # entering and (later) leaving the island: per-crossing cost + the activation over DRAM
            t += 2 * (board.boundary_us * 1e-6 + op.act_bytes / 2 / (board.memory_gbs * 1e9))
        prev_npu = npu
        t += ot
        if op.is_matmul and op.kind != "lm_head":
            dec_macs += op.macs
            npu_macs += op.macs if npu else 0
            npu8 += op.macs if place == "npu-a8w8" else 0
        rows.append({"op": op.name, "kind": op.kind, "place": place, "macs": op.macs, "time_us": ot * 1e6})
    return Plan(placement=dict(placement), partitions=parts, boundaries=2 * parts, time_per_token_s=t,
                npu_mac_fraction=npu_macs / dec_macs if dec_macs else 0.0,
                npu_int8_mac_fraction=npu8 / dec_macs if dec_macs else 0.0,
                decoder_macs=dec_macs, assumptions=asdict(board), rows=rows)


def naive_placement(ops: list[Op], board: BoardLLM) -> tuple[dict, int]:
    """Each NPU-capable op on the NPU as its own call (no fusion of neighbours): the partitions a
    per-op dispatcher makes. Returns (placement, partitions)."""
    pl = {op.name: ("npu-a8w8" if _npu_capable(op, board) else "cpu-fp16") for op in ops}
    return pl, sum(1 for op in ops if _npu_capable(op, board))


def plan(ops: list[Op], board: BoardLLM, promote: list[str] = (), head: str | None = None) -> Plan:
    """The planner: every NPU-capable op at ``npu-a8w8`` except those in ``promote`` (most sensitive
    first), each of which goes to the cheaper of ``npu-a16w8`` and ``cpu-fp16`` given the placement
    so far (so a promoted op whose neighbours are on the CPU joins them when that removes a
    partition). ``head``: force lm_head's placement (default: chosen the same way if promoted)."""
    placement = {op.name: ("npu-a8w8" if _npu_capable(op, board) else "cpu-fp16") for op in ops}
    by_name = {op.name: op for op in ops}
    for name in promote:
        if name not in by_name:
            raise UsageError(f"unknown op {name!r} in the promotion list")
        if not by_name[name].is_matmul:
            continue
        best = None
        for choice in (("npu-a16w8",) if board.a16 else ()) + ("cpu-fp16",):
            trial = {**placement, name: choice}
            cost = evaluate_plan(ops, trial, board).time_per_token_s
            if best is None or cost < best[0]:
                best = (cost, choice)
        placement[name] = best[1]
    if head is not None:
        placement["lm_head"] = head
    return evaluate_plan(ops, placement, board)


def format_table(p: Plan, max_rows: int = 40) -> str:
    """Summary per op kind plus the placement of every matmul that left npu-a8w8."""
    from collections import Counter

    lines = [f"{'kind':<12}{'npu-a8w8':>10}{'npu-a16w8':>11}{'cpu-fp16':>10}"]
    c = Counter((r["kind"], r["place"]) for r in p.rows)
    for kind in dict.fromkeys(r["kind"] for r in p.rows):
        lines.append(f"{kind:<12}{c[(kind, 'npu-a8w8')]:>10}{c[(kind, 'npu-a16w8')]:>11}{c[(kind, 'cpu-fp16')]:>10}")
    moved = [r for r in p.rows if r["kind"] in MATMUL_KINDS and r["place"] != "npu-a8w8"]
    if moved:
        lines.append("matmuls off npu-a8w8: " + ", ".join(f"{r['op']}={r['place']}" for r in moved[:max_rows])
                     + (f" (+{len(moved) - max_rows} more)" if len(moved) > max_rows else ""))
    lines.append(f"partitions {p.partitions}, boundaries {p.boundaries}; decoder MACs on NPU "
                 f"{p.npu_mac_fraction * 100:.1f} % (INT8 activations {p.npu_int8_mac_fraction * 100:.1f} %); "
                 f"estimated {p.tokens_per_s:.0f} tokens/s (roofline from the profile's [llm] table)")
    return "\n".join(lines)


def search_promotions(evaluate, ranking: list[str], ref_ppl: float, budget: float,
                      groups: dict | None = None, max_probes: int = 12) -> dict:
    """Fewest promoted matmuls (a prefix of ``ranking``, most sensitive first) whose measured
    perplexity ``evaluate(promoted) -> ppl`` is within ``ref_ppl * (1 + budget)``: bisection over
    the prefix length (assumes quality improves as more layers are promoted; every probe is
    recorded). ``groups``: extra named candidate sets (e.g. every down_proj) probed as well.
    Returns the chosen set, its perplexity and every probe."""
    limit = ref_ppl * (1 + budget)
    probes = []

    def probe(label, names):
        ppl = float(evaluate(list(names)))
        probes.append({"label": label, "promoted": len(names), "ppl": ppl, "within": ppl <= limit})
        return ppl

    best = None
    for label, names in (groups or {}).items():
        if probe(label, names) <= limit and (best is None or len(names) < len(best[1])):
            best = (label, list(names))
    lo, hi = 0, len(ranking)
    if probe("none", []) <= limit:
        return {"promoted": [], "label": "none", "limit": limit, "probes": probes}
    cap = len(best[1]) if best else len(ranking)
    hi = min(hi, cap)
    ok_hi = best is not None or probe(f"top-{hi}", ranking[:hi]) <= limit
    if not ok_hi:
        return {"promoted": ranking[:hi], "label": f"top-{hi}", "limit": limit, "probes": probes, "met": False}
    found = None
    while hi - lo > 1 and len(probes) < max_probes:
        mid = (lo + hi) // 2
        if probe(f"top-{mid}", ranking[:mid]) <= limit:
            hi, found = mid, mid
        else:
            lo = mid
    if found is not None and (best is None or found < len(best[1])):
        best = (f"top-{found}", ranking[:found])
    if best is None:
        best = (f"top-{hi}", ranking[:hi])
    return {"promoted": best[1], "label": best[0], "limit": limit, "probes": probes, "met": True}
