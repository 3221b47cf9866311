"""W8A8 for the NPU's matmuls, measured by fake quantization in PyTorch.

What an INT8-matmul NPU runs: per-output-channel symmetric INT8 weights and a *static*
per-tensor activation scale per matmul input (fixed at calibration, no runtime ranges).
LLaMA-class decoders break this at a few channels: "massive activations" at the ``down_proj``
inputs (SmolLM2-135M: |x| in the thousands against a median of a few units), so one scale per
tensor leaves most channels with a handful of levels. Remedies, each an option here:

- SmoothQuant-class scale migration (``alpha``): per input channel ``s = amax_x^a / amax_w^(1-a)``
  folded exactly into the producer: the RMSNorm weight for q/k/v and gate/up, ``up_proj``'s
  output rows for ``down_proj`` (the SwiGLU product is linear in ``up``), ``v_proj``'s output
  rows for ``o_proj`` (attention is linear in V; scales shared across a GQA group).
- A rotation of the ``down_proj`` inputs (``rotate_down``, QuaRot / SpinQuant class): ``x W^T =
  (x R)(W R)^T`` for an orthogonal R, exact in float; R spreads a massive channel over all
  channels so one static scale fits. R = kron(DCT-II(m), Hadamard(2^k) / sqrt(2^k)) with
  m * 2^k = intermediate size (1536 = 3 x 512 on SmolLM2): a fast transform on the board's CPU
  (O(n log n), between the SiLU*mul and the NPU call, no extra partition).
- 16-bit activations for chosen matmuls (Qualcomm-style W8A16 on NPUs that have it).
- CPU FP16 for chosen matmuls (weights and inputs rounded to float16).

Everything else (norms, rotary, softmax, residual adds) stays in the PyTorch float path: the
CPU runs it in FP16 on the board; that rounding is not emulated here (stated in the report).
Calibration and the selection of promoted layers use text disjoint from the evaluation text.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("npu-a8w8", "npu-a16w8", "cpu-fp16", "fp32")


@dataclass(frozen=True, kw_only=True)
class W8A8Options:
    alpha: float | None = None                       # SmoothQuant migration strength; None: off
    modes: dict = field(default_factory=dict)        # linear name -> one of MODES; default npu-a8w8
    lm_head: str = "cpu-fp16"                        # the tied head: CPU by default (sensitive, huge)
    weight_bits: int = 8

    def __post_init__(self):
        bad = {k: v for k, v in {**self.modes, "lm_head": self.lm_head}.items() if v not in MODES}
        if bad:
            raise UsageError(f"unknown placement mode(s) {bad}; choose from {', '.join(MODES)}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"SmoothQuant alpha must be within 0..1, not {self.alpha}")


def linear_names(model) -> list[str]:
    """``layers.{i}.{self_attn|mlp}.{proj}`` for every decoder matmul, in execution order."""
    out = []
    for i, layer in enumerate(model.model.layers):
        for p in LINEARS:
            part = "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            if hasattr(getattr(layer, part), p):
                out.append(f"layers.{i}.{part}.{p}")
    return out


def _module(model, name):
    m = model.model
    for part in name.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


@dataclass
class ActStats:
    """Per input channel max |x| and per-tensor figures of every matmul input (one calibration pass)."""

    amax: dict            # name -> np.ndarray [in_features]
    tensor_max: dict      # name -> float
    median_abs: dict      # name -> float (median over channels of the per-channel amax)
    a8_rel_err: dict      # name -> relative output error of static per-tensor INT8 input quantization

    def worst(self, k: int = 5) -> list[tuple[str, float]]:
        return sorted(self.a8_rel_err.items(), key=lambda kv: -kv[1])[:k]


def calibrate(model, windows: list[np.ndarray], names: list[str] | None = None) -> ActStats:
    """Run ``windows`` ([1, T] ids each) and record every matmul input's ranges, then (second
    pass, with the static scales now fixed) each matmul's output error under INT8 activations."""
    import torch

    names = names or linear_names(model) + ["lm_head"]
    mods = {n: (model.lm_head if n == "lm_head" else _module(model, n)) for n in names}
    amax = {n: None for n in names}

    def rec(n):
        def hook(_m, inp):
            x = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0)
            amax[n] = x if amax[n] is None else torch.maximum(amax[n], x)
        return hook

    hs = [mods[n].register_forward_pre_hook(rec(n)) for n in names]
    try:
        with torch.no_grad():
            for w in windows:
                model(input_ids=torch.from_numpy(np.asarray(w, np.int64)))
    finally:
        for h in hs:
            h.remove()
    tmax = {n: float(amax[n].max()) for n in names}
    err_num = {n: 0.0 for n in names}
    err_den = {n: 0.0 for n in names}

    def err(n):
        def hook(m, inp):
            x = inp[0].detach()
            s = tmax[n] / 127.0
            xq = torch.clamp(torch.round(x / s), -127, 127) * s
            y, yq = x @ m.weight.T, xq @ m.weight.T
            err_num[n] += float(((yq - y) ** 2).sum())
            err_den[n] += float((y ** 2).sum())
        return hook

    hs = [mods[n].register_forward_pre_hook(err(n)) for n in names]
    try:
        with torch.no_grad():
            for w in windows[:1]:
                model(input_ids=torch.from_numpy(np.asarray(w, np.int64)))
    finally:
        for h in hs:
            h.remove()
    return ActStats(amax={n: amax[n].numpy() for n in names}, tensor_max=tmax,
                    median_abs={n: float(np.median(amax[n].numpy())) for n in names},
                    a8_rel_err={n: (err_num[n] / max(err_den[n], 1e-30)) ** 0.5 for n in names})


def rotation(n: int) -> np.ndarray:
    """Orthogonal [n, n]: kron(orthonormal DCT-II of size m, normalized Sylvester Hadamard of size
    2^k), n = m * 2^k with m odd (the largest power of two that divides n)."""
    k = n & -n
    m = n // k
    h = np.ones((1, 1))
    while h.shape[0] < k:
        h = np.block([[h, h], [h, -h]])
    h /= np.sqrt(k)
    i = np.arange(m)
    d = np.cos(np.pi * (i[None, :] + 0.5) * i[:, None] / m) * np.sqrt(2.0 / m)
    d[0] /= np.sqrt(2.0)
    return np.kron(d.T, h)


def rotate_down(model):
    """A copy of ``model`` whose ``down_proj`` weights are ``W R`` and whose ``down_proj`` inputs
    are multiplied by R at run time (a pre-hook): the same function in float arithmetic."""
    import torch

    m = copy.deepcopy(model)
    r = torch.from_numpy(rotation(m.config.intermediate_size)).float()
    with torch.no_grad():
        for layer in m.model.layers:
            d = layer.mlp.down_proj
            d.weight.copy_(d.weight @ r)
            d.register_forward_pre_hook(lambda _m, inp: (inp[0] @ r,))
    m._edgepack_rotation = r
    return m


def smooth(model, stats: ActStats, alpha: float):
    """A copy of ``model`` with SmoothQuant scales folded in (exact in float arithmetic)."""
    import torch

    m = copy.deepcopy(model)
    cfg = m.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads

    def scales(x_amax, weights):
        w_amax = torch.stack([w.weight.detach().abs().amax(0) for w in weights]).amax(0)
        x = torch.from_numpy(x_amax).clamp(min=1e-5)
        return (x ** alpha / w_amax.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)

    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            a, mlp = layer.self_attn, layer.mlp
            s = scales(stats.amax[f"layers.{i}.self_attn.q_proj"], [a.q_proj, a.k_proj, a.v_proj])
            layer.input_layernorm.weight.div_(s)
            for p in (a.q_proj, a.k_proj, a.v_proj):
                p.weight.mul_(s)
            s = scales(stats.amax[f"layers.{i}.mlp.gate_proj"], [mlp.gate_proj, mlp.up_proj])
            layer.post_attention_layernorm.weight.div_(s)
            for p in (mlp.gate_proj, mlp.up_proj):
                p.weight.mul_(s)
            s = scales(stats.amax[f"layers.{i}.mlp.down_proj"], [mlp.down_proj])
            mlp.up_proj.weight.div_(s[:, None])
            mlp.down_proj.weight.mul_(s)
            # o_proj's input channel h*hd+d comes from v channel (h // group)*hd+d: one scale per v channel
            s = scales(stats.amax[f"layers.{i}.self_attn.o_proj"], [a.o_proj]).reshape(heads, hd)
            group = heads // kv_heads
            sv = s.reshape(kv_heads, group, hd).amax(1)                      # [kv_heads, hd]
            a.v_proj.weight.div_(sv.reshape(-1)[:, None])
            a.o_proj.weight.mul_(sv.repeat_interleave(group, 0).reshape(-1))
    return m


class _FakeQuantLinear:
    """Forward hook body: replaces a Linear's output by the quantized computation."""

    def __init__(self, mode: str, x_scale_max: float, weight_bits: int):
        self.mode, self.xmax, self.wbits = mode, x_scale_max, weight_bits
        self.wq = None

    def weight(self, w):
        import torch

        if self.wq is None:
            if self.mode == "cpu-fp16":
                self.wq = w.detach().half().float()
            else:
                q = 2 ** (self.wbits - 1) - 1
                s = w.detach().abs().amax(1, keepdim=True).clamp(min=1e-12) / q
                self.wq = torch.clamp(torch.round(w.detach() / s), -q, q) * s
        return self.wq

    def __call__(self, mod, x):
        import torch

        if self.mode == "cpu-fp16":
            xq = x.half().float()
        else:
            q = 127 if self.mode == "npu-a8w8" else 32767
            s = self.xmax / q
            xq = torch.clamp(torch.round(x / s), -q, q) * s
        y = xq @ self.weight(mod.weight).T
        return y + mod.bias if mod.bias is not None else y


def fake_quantize(model, stats: ActStats, options: W8A8Options):
    """Make each matmul of ``model`` compute fake-quantized, in place (static per-tensor scales
    from ``stats``, which must come from the same model, i.e. after :func:`smooth`). Apply it to
    a copy: the model's Linear forwards are replaced."""
    handles = []
    for n in linear_names(model) + ["lm_head"]:
        mode = options.lm_head if n == "lm_head" else options.modes.get(n, "npu-a8w8")
        if mode == "fp32":
            continue
        mod = model.lm_head if n == "lm_head" else _module(model, n)
        fq = _FakeQuantLinear(mode, stats.tensor_max[n], options.weight_bits)
        # replace the forward (a hook would compute the float matmul as well: twice the time)
        mod.forward = (lambda m, f: (lambda x: f(m, x)))(mod, fq)
        handles.append(fq)
    return handles


def prepare(model, calib_windows, options: W8A8Options):
    """Smoothed (if asked), calibrated and fake-quantized copy of ``model`` plus its stats."""
    base_stats = calibrate(model, calib_windows)
    m = smooth(model, base_stats, options.alpha) if options.alpha is not None else copy.deepcopy(model)
    stats = calibrate(m, calib_windows) if options.alpha is not None else base_stats
    fake_quantize(m, stats, options)
    return m, stats, base_stats


def logits_fn(model):
    import torch

    def fn(ids):
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()
    return fn
