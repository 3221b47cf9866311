"""Quantization-aware fine-tuning (PyTorch fake quantization; the optional `torch` extra).

When post-training quantization cannot reach the budget on an INT8-only accelerator, the
weights have to learn to live with INT8. Every ``nn.Linear`` is wrapped so that, in training,
its input goes through asymmetric per-tensor INT8 fake quantization (range tracked by an
exponential moving average of min/max, as calibration would find it) and its weight through
symmetric per-output-channel INT8 (scale max|w|/127, exactly ONNX Runtime's per-channel
scheme); gradients pass straight through. After a short fine-tune from the FP32 checkpoint the
wrappers are removed, the model is exported to ONNX, and edgepack's normal PTQ pipeline
(calibration, GPTQ rounding, full INT8 QDQ) produces the deployable model, whose accuracy is then
measured in ONNX Runtime on the held-out split: the figure is what the board will run, not
what the training graph simulated.

Scope: Hugging Face sequence-classification checkpoints (BERT family) given as a folder
(config + tokenizer) and a ``state_dict`` file, with tokenized ``.npz`` data (input_ids,
attention_mask, labels).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError, EdgepackError


class QATUnavailable(EdgepackError):
    exit_code = 3


def _torch():
    try:
        import torch
    except ImportError:
        raise QATUnavailable("QAT needs PyTorch: pip install -e '.[torch]' (or bash scripts/setup.sh)") from None
    return torch


@dataclass
class QATReport:
    epochs: float
    steps: int
    seconds: float
    train_loss_first: float
    train_loss_last: float
    onnx_path: str


def _fake_quant_linear_cls(torch):
    nn = torch.nn
    ActFakeQuant = _act_observer_cls(torch)

    class FakeQuantLinear(nn.Module):
        """A Linear that sees INT8 inputs and INT8 weights in training (straight-through)."""

        def __init__(self, lin: nn.Linear):
            super().__init__()
            self.lin = lin
            self.act = ActFakeQuant()

        def forward(self, x):
            x = self.act(x)
            w = self.lin.weight
            s = (w.detach().abs().amax(1) / 127.0).clamp(min=1e-12)
            wq = torch.fake_quantize_per_channel_affine(w, s, torch.zeros_like(s, dtype=torch.int32), 0, -127, 127)
            return torch.nn.functional.linear(x, wq, self.lin.bias)

    return FakeQuantLinear


def _act_observer_cls(torch):
    class ActFakeQuant(torch.nn.Module):
        """EMA min/max observer + asymmetric INT8 fake quantization of one activation tensor."""

        def __init__(self, momentum: float = 0.05):
            super().__init__()
            self.momentum = momentum
            self.register_buffer("lo", torch.tensor(0.0))
            self.register_buffer("hi", torch.tensor(0.0))
            self.register_buffer("seen", torch.tensor(0))

        def forward(self, x):
            if self.training:
                with torch.no_grad():
                    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
                    if int(self.seen) == 0:
                        self.lo.copy_(lo)
                        self.hi.copy_(hi)
                    else:
                        self.lo.mul_(1 - self.momentum).add_(self.momentum * lo)
                        self.hi.mul_(1 - self.momentum).add_(self.momentum * hi)
                    self.seen += 1
            if int(self.seen) == 0:
                return x
            scale = float(max((self.hi - self.lo).item() / 255.0, 1e-8))
            zp = max(-128, min(127, int(round(-128 - self.lo.item() / scale))))
            return torch.fake_quantize_per_tensor_affine(x, scale, zp, -128, 127)

    return ActFakeQuant


def observe_activations(torch, module) -> list:
    """Fake-quantize what ONNX Runtime's full-INT8 QDQ also quantizes outside the Linears: the
    residual sums entering each LayerNorm, the LayerNorm outputs and the GELU outputs. Without
    these the fine-tune adapts to a different model than the one the NPU runs."""
    AQ = _act_observer_cls(torch)
    handles = []
    for name, m in module.named_modules():
        kind = type(m).__name__
        if isinstance(m, torch.nn.LayerNorm) or "GELU" in kind.upper():
            q_in, q_out = AQ(), AQ()
            m.add_module("_fq_in", q_in) if isinstance(m, torch.nn.LayerNorm) else None
            m.add_module("_fq_out", q_out)
            if isinstance(m, torch.nn.LayerNorm):
                handles.append(m.register_forward_pre_hook(lambda mod, args: (mod._fq_in(args[0]),) + tuple(args[1:])))
            handles.append(m.register_forward_hook(lambda mod, args, out: mod._fq_out(out)))
    return handles


def wrap_linears(torch, module) -> int:
    """Replace every nn.Linear below ``module`` by its fake-quantized twin; returns the count."""
    FQ = _fake_quant_linear_cls(torch)
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, FQ(child))
            n += 1
        else:
            n += wrap_linears(torch, child)
    return n


def unwrap_linears(torch, module) -> None:
    for name, child in list(module.named_children()):
        if type(child).__name__ == "FakeQuantLinear":
            setattr(module, name, child.lin)
        else:
            unwrap_linears(torch, child)


def qat_sequence_classifier(hf_dir: str | Path, state_dict: str | Path, train: Path, out_onnx: str | Path, *,
                            epochs: float = 1.0, lr: float = 2e-5, batch_size: int = 32, seed: int = 0,
                            num_labels: int = 2,
                            progress: Callable[[int, int], None] | None = None) -> QATReport:
    """Fine-tune a BERT-family classifier with INT8 fake quantization; export FP32 ONNX of the
    quantization-adapted weights (the PTQ pipeline then makes the INT8 QDQ model)."""
    torch = _torch()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForSequenceClassification
    except ImportError:
        raise QATUnavailable("QAT of Hugging Face models needs transformers (bash scripts/setup.sh)") from None
    t0 = time.perf_counter()
    try:
        z = np.load(train)
        ids, mask, y = z["input_ids"], z["attention_mask"], z["labels"]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{train}: expected an .npz with input_ids, attention_mask and labels ({e})") from None
    if len(ids) == 0:
        raise DataError(f"{train}: no training samples")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), num_labels=num_labels)
    try:
        model.load_state_dict(torch.load(str(state_dict), map_location="cpu"))
    except (OSError, RuntimeError) as e:
        raise DataError(f"{state_dict}: not a state_dict for {hf_dir} ({str(e).splitlines()[0]})") from None
    wrap_linears(torch, model)
    hooks = observe_activations(torch, model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    ids_t, mask_t, y_t = (torch.from_numpy(np.asarray(a, np.int64)) for a in (ids, mask, y))
    per_epoch = max(1, len(ids) // batch_size)
    steps = max(1, int(round(epochs * per_epoch)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    losses = []
    perm = torch.randperm(len(ids))
    for step in range(steps):
        i = step % per_epoch
        if i == 0 and step:
            perm = torch.randperm(len(ids))
        b = perm[i * batch_size:(i + 1) * batch_size]
        loss = model(input_ids=ids_t[b], attention_mask=mask_t[b], labels=y_t[b]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(step + 1, steps)
    model.eval()
    unwrap_linears(torch, model)
    for h in hooks:
        h.remove()
    for m in model.modules():  # drop the observers so the export is the plain float graph
        for k in ("_fq_in", "_fq_out"):
            if k in m._modules:
                del m._modules[k]
    # Weights are snapped to the INT8 grid they were trained on, so PTQ's per-channel absmax
    # scales find exactly the same integers.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                s = (m.weight.abs().amax(1, keepdim=True) / 127.0).clamp(min=1e-12)
                m.weight.copy_(torch.round(m.weight / s).clamp(-127, 127) * s)
    export_sequence_classifier(torch, model, ids.shape[1], out_onnx)
    k = max(1, len(losses) // 10)
    return QATReport(epochs, steps, round(time.perf_counter() - t0, 1), float(np.mean(losses[:k])),
                     float(np.mean(losses[-k:])), str(out_onnx))


def export_sequence_classifier(torch, model, seq_len: int, out: str | Path, meta: dict | None = None) -> None:
    """ONNX export through a keyword-argument wrapper (transformers 5.x breaks positional export)."""
    import onnx

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).logits

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    ex = (torch.ones(1, seq_len, dtype=torch.long), torch.ones(1, seq_len, dtype=torch.long))
    try:
        torch.onnx.export(Logits(model).eval(), ex, str(tmp), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=17, do_constant_folding=True, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                        "logits": {0: "batch"}})
        m = onnx.load(str(tmp))
        for k, v in (meta or {"edgepack.source": "edgepack qat (INT8 fake-quant fine-tune)"}).items():
            p = m.metadata_props.add()
            p.key, p.value = k, v
        onnx.save(m, str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
