"""Board profiles (``targets/*.toml``), validated on load.

A target says what a class of boards can run: its compute units with the dtypes and runtimes
each executes, its RAM, storage and OTA size budget, and the default accuracy and latency
budgets. The quantizer reads it to decide what is allowed (float fallback, dynamic
quantization, activation dtype); the packager reads the size budget; the agent the RAM budget.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import TargetError
from .arithmetic import arithmetic

KNOWN_DTYPES = {"int4", "int8", "uint8", "fp16", "bf16", "fp32"}
KNOWN_KINDS = {"cpu", "npu", "gpu", "dsp"}


def targets_dir() -> Path:
    """``$EDGEPACK_TARGETS`` or the board profiles shipped as package data (edgepack/targets/profiles),
    so a wheel install finds them as an editable one does."""
    env = os.environ.get("EDGEPACK_TARGETS")
    return Path(env) if env else Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class ComputeUnit:
    name: str
    kind: str
    dtypes: tuple[str, ...]
    runtimes: tuple[str, ...]
    int8_ops: tuple[str, ...] = ()        # empty: every op the runtime quantizes
    fallback_cost_ms: float = 0.0         # per float island moved to this unit


@dataclass(frozen=True)
class QuantPolicy:
    activation_dtype: str = "uint8"
    weight_dtype: str = "int8"
    per_channel: bool = True
    allow_float_fallback: bool = True
    allow_dynamic: bool = True


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str
    ram_mb: int
    storage_mb: int
    ota_budget_mb: float
    threads: int
    compute: tuple[ComputeUnit, ...]
    max_top1_drop: float
    latency_ms: float
    model_ram_mb: int
    quant: QuantPolicy = field(default_factory=QuantPolicy)
    int8_arithmetic: str = "exact"        # how the board's INT8 kernels compute (edgepack.quantize.numerics)
    path: Path | None = None
    # Label-free data (agreement with FP32, no labels): the floor on top-1 agreement, percent. None:
    # ``max_top1_drop`` is applied to disagreement (100 - agreement) as well. See accuracy_budget.
    min_agreement: float | None = None

    def accuracy_budget(self, labelled: bool, max_drop: float | None = None) -> tuple[float, str]:
        """The accuracy budget in points of the evaluated metric, and a sentence saying which.

        With labels the budget is ``max_top1_drop``: INT8 top-1 within that many points of FP32.
        Without labels only agreement with FP32 can be measured, and a top-1 drop is bounded by
        the disagreement rate (a sample can only turn wrong where INT8 and FP32 disagree), but
        most disagreements fall on samples FP32 already gets wrong or barely gets right, so
        reading ``max_top1_drop`` as ``100 - agreement`` asks far more than the labelled budget:
        99 % agreement is out of reach for any INT8-weight EfficientNet-Lite0 (every activation
        float still gives 98.3 %; docs/BENCHMARKS.md). ``min_agreement`` states the label-free
        floor explicitly. An explicit ``max_drop`` (``--max-drop``) overrides both."""
        if max_drop is not None:
            return float(max_drop), f"drop <= {max_drop:g} points (--max-drop)"
        if labelled or self.min_agreement is None:
            what = "top-1 accuracy" if labelled else "top-1 disagreement with FP32"
            return self.max_top1_drop, f"{what} drop <= {self.max_top1_drop:g} points ({self.name} max_top1_drop)"
        return (round(100.0 - self.min_agreement, 6),
                f"top-1 agreement with FP32 >= {self.min_agreement:g} % on label-free data ({self.name} "
                f"min_agreement; max_top1_drop = {self.max_top1_drop:g} applies when labels exist)")

    @property
    def weight_bits(self) -> int:
        """Widest weights that compute exactly on this board (7 where u8 x s8 pair sums saturate)."""
        return arithmetic(self.int8_arithmetic).max_weight_bits

    @property
    def runtimes(self) -> tuple[str, ...]:
        """The agent's runtimes for this board, in preference order (``edgepack-agent init --runtime``
        for each): the runtime part of every compute unit's ``runtime:device`` spec, first unit first."""
        from device_agent.runtime import normalize
        return tuple(dict.fromkeys(normalize(r.split(":", 1)[0]) for u in self.compute for r in u.runtimes))

    @property
    def float_allowed(self) -> bool:
        """Whether a layer may stay in float (on some compute unit) without leaving the policy."""
        return self.quant.allow_float_fallback

    def integer_only(self) -> "Target":
        """This board with float fallback refused: what an INT8-only build for it may use
        (``--format tflite --full-integer`` runs the ONNX search so)."""
        return replace(self, quant=replace(self.quant, allow_float_fallback=False))


def _req(d: dict, key: str, typ, where: str):
    if key not in d:
        raise TargetError(f"{where}: missing field {key!r}")
    v = d[key]
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
        raise TargetError(f"{where}: field {key!r} must be {typ.__name__}, got {type(v).__name__}")
    return v


def _check_runtimes(specs: tuple, where: str) -> None:
    """Each spec is ``runtime`` or ``runtime:device`` with a runtime the agent knows (an alias counts)."""
    from device_agent.agent_errors import Incompatible
    from device_agent.runtime import normalize
    for r in specs:
        if not isinstance(r, str) or not r.split(":", 1)[0]:
            raise TargetError(f"{where}: runtimes must be strings like 'openvino:CPU', got {r!r}")
        try:
            normalize(r.split(":", 1)[0])
        except Incompatible as e:
            raise TargetError(f"{where}: {e}") from None


def parse_target(data: dict, where: str = "target") -> Target:
    """Validate a profile dict; every problem is a TargetError naming the field."""
    name = _req(data, "name", str, where)
    units = data.get("compute")
    if not isinstance(units, list) or not units:
        raise TargetError(f"{where}: needs at least one [[compute]] unit")
    compute = []
    for i, u in enumerate(units):
        w = f"{where}: compute[{i}]"
        if not isinstance(u, dict):
            raise TargetError(f"{w} must be a table")
        dtypes = tuple(_req(u, "dtypes", list, w))
        bad = [d for d in dtypes if d not in KNOWN_DTYPES]
        if bad or not dtypes:
            raise TargetError(f"{w}: unknown dtype(s) {bad} (known: {sorted(KNOWN_DTYPES)})")
        kind = _req(u, "kind", str, w)
        if kind not in KNOWN_KINDS:
            raise TargetError(f"{w}: kind must be one of {sorted(KNOWN_KINDS)}, got {kind!r}")
        runtimes = tuple(_req(u, "runtimes", list, w))
        _check_runtimes(runtimes, w)
        compute.append(ComputeUnit(
            name=_req(u, "name", str, w), kind=kind, dtypes=dtypes,
            runtimes=runtimes,
            int8_ops=tuple(u.get("int8_ops", ())),
            fallback_cost_ms=float(u.get("fallback_cost_ms", 0.0))))
    b = data.get("budgets", {})
    q = data.get("quantization", {})
    if not isinstance(b, dict) or not isinstance(q, dict):
        raise TargetError(f"{where}: [budgets] and [quantization] must be tables")
    pol = QuantPolicy(**{k: q[k] for k in QuantPolicy.__dataclass_fields__ if k in q})
    unknown = set(q) - set(QuantPolicy.__dataclass_fields__)
    if unknown:
        raise TargetError(f"{where}: unknown [quantization] field(s) {sorted(unknown)}")
    if pol.activation_dtype not in ("int8", "uint8") or pol.weight_dtype not in ("int8", "uint8"):
        raise TargetError(f"{where}: activation_dtype/weight_dtype must be int8 or uint8")
    t = Target(
        name=name, description=data.get("description", ""), arch=_req(data, "arch", str, where),
        ram_mb=_req(data, "ram_mb", int, where), storage_mb=_req(data, "storage_mb", int, where),
        ota_budget_mb=_req(data, "ota_budget_mb", float, where), threads=int(data.get("threads", 1)),
        compute=tuple(compute),
        max_top1_drop=_req(b, "max_top1_drop", float, f"{where} [budgets]"),
        latency_ms=_req(b, "latency_ms", float, f"{where} [budgets]"),
        model_ram_mb=_req(b, "model_ram_mb", int, f"{where} [budgets]"),
        quant=pol, int8_arithmetic=data.get("int8_arithmetic", "exact"),
        min_agreement=_req(b, "min_agreement", float, f"{where} [budgets]") if "min_agreement" in b else None)
    arithmetic(t.int8_arithmetic)  # unknown names are a TargetError
    for fld in ("ram_mb", "storage_mb", "ota_budget_mb", "latency_ms", "model_ram_mb", "threads"):
        if getattr(t, fld) <= 0:
            raise TargetError(f"{where}: {fld} must be positive")
    if not 0 <= t.max_top1_drop <= 100:
        raise TargetError(f"{where}: max_top1_drop must be within 0..100 percentage points")
    if t.min_agreement is not None and not 0 < t.min_agreement <= 100:
        raise TargetError(f"{where}: min_agreement must be within 0..100 percent")
    if t.quant.allow_float_fallback and not any("fp32" in u.dtypes or "fp16" in u.dtypes for u in compute):
        raise TargetError(f"{where}: allow_float_fallback needs a compute unit that runs fp32 or fp16")
    return t


def load_target(name_or_path: str | Path) -> Target:
    """A target by name (``targets/NAME.toml``) or by path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix != ".toml":
        p = targets_dir() / f"{name_or_path}.toml"
    if not p.is_file():
        raise TargetError(f"unknown target {str(name_or_path)!r}; known: {', '.join(list_targets()) or 'none'}")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{p}: invalid TOML ({e})") from None
    t = parse_target(data, where=str(p.name))
    return Target(**{**t.__dict__, "path": p})


def list_targets() -> list[str]:
    d = targets_dir()
    return sorted(f.stem for f in d.glob("*.toml")) if d.is_dir() else []
