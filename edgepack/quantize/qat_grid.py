"""Quantization-aware fine-tuning on a QDQ model's own grid (the optional `torch` extra).

Why: on an INT8-only board every activation is quantized, and on EfficientNet-Lite0 no
post-training technique measured here (calibration rules, GPTQ, bias correction, equalization)
gets full INT8 past ~95 % agreement with FP32 (docs/BENCHMARKS.md): the remaining error is the
rounding of a few activations whose grid is coarse for their typical values. Only the weights can
learn to live with that rounding, so this module fine-tunes them *through* it.

What is trained is the chosen QDQ model itself, interpreted in PyTorch op by op (:class:`QdqModule`):

- every activation ``QuantizeLinear -> DequantizeLinear`` pair is fake quantization with the
  model's own scale and zero point (fixed; round half to even as ONNX, straight-through gradient
  inside the range, none outside it);
- every weight and bias ``DequantizeLinear`` of an initializer becomes a float parameter,
  initialised from its integers, fake-quantized on its own fixed per-channel scales;
- with ``learn_ranges`` (the default) each activation grid's scale is learned too (LSQ: one
  log-ratio per QuantizeLinear, zero point fixed), and :func:`write_back` re-grids each bias on
  its input's new scale times the weight scale;
- the loss is knowledge distillation from the *original* FP32 model (ONNX Runtime, the same
  augmented batch): no labels are needed, only the calibration images.

Afterwards :func:`write_back` rounds the parameters onto the grids and writes the integers (and
learned scales) into a copy of the QDQ model: zero points and graph are unchanged, so the result
is a QDQ model of the same shape and size whose arithmetic is what training simulated, and
LiteRT's transplant (:mod:`edgepack.tflite.transplant`) carries it into a full-integer ``.tflite``.
The figure that counts is still the held-out agreement with the original FP32 model in the
board's arithmetic, measured by the caller; training never sees held-out data. Measured on
EfficientNet-Lite0 (docs/BENCHMARKS.md, LiteRT): with random crops the fine-tune fitted the 100
calibration images and lost held out; without them (the default) +1.95 dB held out, and on top
of a split stem (:mod:`.actsplit`) full INT8 reaches 97.16 % in LiteRT.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ..data import Dataset
from ..errors import DataError, ModelError
from .qat import _torch

__all__ = ["GridQatOptions", "GridQatReport", "QdqModule", "finetune_on_grid", "write_back"]


@dataclass(frozen=True, kw_only=True)
class GridQatOptions:
    """The defaults are the recipe measured best on EfficientNet-Lite0 for an INT8-only board
    (docs/BENCHMARKS.md, issue 14): logit MSE, weights and activation grids both learned, no
    random crops (with 100 calibration images, crops shifted the inputs and the fine-tune
    generalized worse), 150 steps of 8."""
    steps: int = 150                 # optimizer steps
    batch_size: int = 8
    lr: float = 0.01                 # Adam, in grid steps per step (weights live in grid units); cosine decay
    bias_lr_scale: float = 64.0      # int32 biases: a grid step is input_scale x weight_scale, far finer
    loss: str = "mse"                # "mse": the logits themselves (output SQNR); "kl": softened distributions
    temperature: float = 2.0         # distillation softmax temperature (loss "kl")
    crop_scale: tuple[float, float] = (1.0, 1.0)   # random-resized-crop area range (image inputs only; 1: none)
    flip: bool = True
    mixup: float = 0.0               # > 0: blend each image with another of the batch, weight ~ Beta(mixup, mixup)
    threads: int = 0                 # torch threads; 0: torch's default
    seed: int = 0
    weights: bool = True             # train the weight and bias integers
    learn_ranges: bool = True        # train each activation grid's scale (LSQ; its zero point stays)
    range_lr: float = 0.003          # Adam on log(scale / calibrated scale)


@dataclass
class GridQatReport:
    steps: int
    seconds: float
    loss_first: float                # mean distillation loss over the first tenth of the steps
    loss_last: float                 # ... and over the last tenth
    weights_changed: int             # integers that moved
    weights_total: int
    scales_changed: int = 0          # activation grids whose scale moved (learn_ranges)
    scale_ratios: dict = field(default_factory=dict)   # Q node output -> learned / calibrated scale
    log: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------- the interpreter

def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _dtype_range(zp: np.ndarray | None) -> tuple[int, int]:
    dt = np.uint8 if zp is None else zp.dtype
    if dt == np.int32:
        return -(2 ** 31), 2 ** 31 - 1
    info = np.iinfo(dt)
    return int(info.min), int(info.max)


def _bshape(v: np.ndarray, axis: int, ndim: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-axis vector over a tensor of ``ndim`` dimensions."""
    if v.ndim == 0 or v.size == 1:
        return ()
    s = [1] * ndim
    s[axis % ndim] = v.size
    return tuple(s)


class QdqModule:
    """A QDQ ONNX model as a differentiable PyTorch function with its weights as parameters.

    The ops are those of the constant-folded QDQ CNNs edgepack's quantizer writes (ORT's
    pre-processing folds exporter shape and pad arithmetic into Conv pads and initializers);
    any other op raises ModelError naming it.
    """

    OPS = ("Conv", "Clip", "Relu", "Add", "Mul", "GlobalAveragePool", "Flatten", "Reshape", "Gemm", "MatMul",
           "MaxPool", "AveragePool", "Concat", "Identity", "QuantizeLinear", "DequantizeLinear")

    #: activation grids never learned: the model input's (pixels sit exactly on it) and those of
    #: tensors LiteRT requires to share their input's grid (its int8 RESHAPE copies bytes)
    FIXED_AFTER = ("Reshape", "Flatten")

    def __init__(self, qdq: onnx.ModelProto, *, learn_ranges: bool = False):
        torch = _torch()
        self.torch = torch
        self.model = qdq
        g = qdq.graph
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.inputs = [i.name for i in g.input if i.name not in self.consts]
        self.outputs = [o.name for o in g.output]
        self.nodes = list(g.node)
        unknown = sorted({n.op_type for n in self.nodes if n.op_type not in self.OPS})
        if unknown:
            raise ModelError(f"quantization-aware fine-tuning cannot interpret op(s) {', '.join(unknown)}: "
                             "use post-training quantization for this model")
        # trainable: each DequantizeLinear whose input is an int8/int32 initializer (weights, biases)
        self.params: dict[str, "torch.nn.Parameter"] = {}
        self.grid: dict[str, tuple] = {}     # DQ output name -> (q init name, scale, zp, qmin, qmax, stored integers)
        by_init: dict[str, str] = {}         # a weight read by two DequantizeLinear nodes is one parameter
        for n in self.nodes:
            if n.op_type == "DequantizeLinear" and n.input[0] in self.consts:
                q = self.consts[n.input[0]]
                if q.dtype not in (np.int8, np.uint8, np.int32):
                    continue
                if n.input[0] in by_init:
                    self.params[n.output[0]] = self.params[by_init[n.input[0]]]
                    self.grid[n.output[0]] = self.grid[by_init[n.input[0]]]
                    continue
                by_init[n.input[0]] = n.output[0]
                s = self.consts[n.input[1]].astype(np.float32)
                z = self.consts[n.input[2]] if len(n.input) > 2 and n.input[2] else np.zeros_like(q, shape=())
                axis = int(_attrs(n).get("axis", 1))
                qmin, qmax = _dtype_range(q if q.dtype == np.int32 else z)
                if q.dtype == np.int8:
                    qmin = max(qmin, -127)   # symmetric int8 weights (LiteRT requires [-127, 127])
                shp = _bshape(s, axis, q.ndim)
                # the parameter is the move from the stored integers, in grid steps: one learning rate
                # fits layers whose scales differ by orders of magnitude, and int32 biases beyond
                # float32's 2**24 come back exactly where training left them alone
                self.params[n.output[0]] = torch.nn.Parameter(torch.zeros(q.shape))
                self.grid[n.output[0]] = (n.input[0], torch.from_numpy(np.reshape(s, shp).copy()),
                                          torch.from_numpy(np.reshape(z, shp).astype(np.float32)), qmin, qmax,
                                          torch.from_numpy(q.astype(np.float32)))
        # learned activation grids: one log-ratio per QuantizeLinear of a computed tensor; the
        # bias of each op reading it keeps its float value and is re-gridded on write_back
        self.log_scales: dict[str, "torch.nn.Parameter"] = {}
        if learn_ranges:
            producer = {o: n for n in self.nodes for o in n.output}
            for n in self.nodes:
                src = producer.get(n.input[0])
                if n.op_type == "QuantizeLinear" and src is not None and src.op_type not in self.FIXED_AFTER:
                    self.log_scales[n.output[0]] = torch.nn.Parameter(torch.zeros(()))

    def parameters(self) -> list:
        seen: dict[int, object] = {}
        for p in self.params.values():
            seen.setdefault(id(p), p)
        return list(seen.values())

    # fake quantization, straight-through inside the range
    def _fq(self, x, s, z, qmin, qmax):
        return self._fq_steps(x / s + z, s, z, qmin, qmax)

    def _fq_steps(self, v, s, z, qmin, qmax):
        """``v`` in grid steps: round (half to even, as ONNX), clamp, dequantize."""
        t = self.torch
        v = v + (t.round(v) - v).detach()
        return (t.clamp(v, qmin, qmax) - z) * s

    def scale_parameters(self) -> list:
        """The learned activation grids' log-ratios (empty unless ``learn_ranges``)."""
        return list(self.log_scales.values())

    def learned_scales(self) -> dict[str, float]:
        """Q node output -> learned scale / calibrated scale."""
        return {k: float(self.torch.exp(p.detach())) for k, p in self.log_scales.items()}

    def bias_parameters(self) -> list:
        """The int32 biases' parameters (a grid step is tiny: they get their own learning rate)."""
        ids = {id(self.params[k]) for k, g in self.grid.items() if g[4] > 2 ** 16}
        return [p for p in self.parameters() if id(p) in ids]

    def __call__(self, **feeds):
        t = self.torch
        F = t.nn.functional
        env: dict[str, object] = dict(self.consts)
        env.update(feeds)
        for n in self.nodes:
            ins = [env[i] if i else None for i in n.input]
            a = _attrs(n)
            op = n.op_type
            if n.output[0] in self.params:
                _, s, z, qmin, qmax, q0 = self.grid[n.output[0]]
                out = self._fq_steps(q0 + self.params[n.output[0]], s, z, qmin, qmax)
            elif n.output[0] in self.log_scales:
                out = self._torch_op(op, ins, a, n, F, t.exp(self.log_scales[n.output[0]]))
            else:
                out = self._torch_op(op, ins, a, n, F)
            env[n.output[0]] = out
        return [env[o] for o in self.outputs]

    def _torch_op(self, op, ins, a, n, F, ratio=1.0):
        t = self.torch

        def T(v):
            return v if isinstance(v, t.Tensor) else t.from_numpy(np.asarray(v, dtype=np.float32))

        if op == "QuantizeLinear":
            # the fake-quantized float value; the paired DequantizeLinear then passes it through
            s = np.asarray(ins[1], np.float32)
            z = np.asarray(ins[2]) if len(ins) > 2 and ins[2] is not None else np.zeros((), np.uint8)
            qmin, qmax = _dtype_range(z)
            shp = _bshape(s, int(a.get("axis", 1)), ins[0].dim())
            return self._fq(ins[0], T(np.reshape(s, shp)) * ratio, T(np.reshape(z, shp).astype(np.float32)), qmin, qmax)
        if op in ("DequantizeLinear", "Identity"):
            return ins[0]
        if op == "Conv":
            x, w, b = ins[0], T(ins[1]), (T(ins[2]) if len(ins) > 2 and ins[2] is not None else None)
            k = len(w.shape) - 2
            pads = list(a.get("pads", [0] * (2 * k)))
            padding = tuple(pads[:k])
            if pads[:k] != pads[k:]:  # asymmetric ("same" at stride 2): pad first, as torch's pad orders it
                x = F.pad(x, [p for i in reversed(range(k)) for p in (pads[i], pads[i + k])])
                padding = 0
            return F.conv2d(x, w, b, tuple(a.get("strides", [1] * k)), padding, tuple(a.get("dilations", [1] * k)),
                            int(a.get("group", 1)))
        if op == "Clip":
            lo = float(np.asarray(ins[1])) if len(ins) > 1 and ins[1] is not None else a.get("min", None)
            hi = float(np.asarray(ins[2])) if len(ins) > 2 and ins[2] is not None else a.get("max", None)
            return t.clamp(ins[0], lo, hi)
        if op == "Relu":
            return F.relu(ins[0])
        if op in ("Add", "Mul"):
            return (t.add if op == "Add" else t.mul)(T(ins[0]), T(ins[1]))
        if op == "GlobalAveragePool":
            return ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True)
        if op == "Flatten":
            ax = int(a.get("axis", 1))
            return ins[0].reshape(int(np.prod(ins[0].shape[:ax])), -1)
        if op == "Reshape":
            shape = [int(v) for v in np.asarray(ins[1]).tolist()]
            return ins[0].reshape([ins[0].shape[i] if v == 0 else v for i, v in enumerate(shape)])
        if op == "Gemm":
            x, w = T(ins[0]), T(ins[1])
            x, w = (x.t() if a.get("transA", 0) else x), (w.t() if a.get("transB", 0) else w)
            y = a.get("alpha", 1.0) * (x @ w)
            return y if len(ins) < 3 or ins[2] is None else y + a.get("beta", 1.0) * T(ins[2])
        if op == "MatMul":
            return T(ins[0]) @ T(ins[1])
        if op in ("MaxPool", "AveragePool"):
            k = tuple(a["kernel_shape"])
            pads = list(a.get("pads", [0] * (2 * len(k))))
            if pads[:len(k)] != pads[len(k):]:
                raise ModelError(f"{op} {n.name}: asymmetric pads are not interpretable for fine-tuning")
            fn = F.max_pool2d if op == "MaxPool" else F.avg_pool2d
            return fn(ins[0], k, tuple(a.get("strides", k)), tuple(pads[:len(k)]))
        if op == "Concat":
            return t.cat([T(v) for v in ins], dim=int(a["axis"]))
        raise ModelError(f"quantization-aware fine-tuning cannot interpret {op} ({n.name})")

    def _bias_inputs(self) -> dict[str, str]:
        """Bias DQ output -> the QuantizeLinear output its op reads (the grid its scale is made of)."""
        producer = {o: n for n in self.nodes for o in n.output}
        out = {}
        for n in self.nodes:
            if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2] in self.grid:
                dq = producer.get(n.input[0])
                if dq is not None and dq.op_type == "DequantizeLinear":
                    out[n.input[2]] = dq.input[0]
        return out

    def integers(self) -> dict[str, np.ndarray]:
        """Each trained weight and bias initializer rounded onto its grid, in its own dtype (a bias
        whose input grid was learned is re-gridded on ``input scale x weight scale`` anew)."""
        t = self.torch
        ratios = self.learned_scales()
        reads = self._bias_inputs() if ratios else {}
        out = {}
        with t.no_grad():
            for name, p in self.params.items():
                qname, qmin, qmax = self.grid[name][0], self.grid[name][3], self.grid[name][4]
                r = ratios.get(reads.get(name, ""), 1.0)
                if r != 1.0:
                    steps = (self.consts[qname].astype(np.float64) + p.numpy().astype(np.float64)) / r
                    moved = np.round(steps).astype(np.int64)
                else:
                    moved = self.consts[qname].astype(np.int64) + t.round(p).numpy().astype(np.int64)
                out[qname] = np.clip(moved, qmin, qmax).astype(self.consts[qname].dtype)
        return out


# ---------------------------------------------------------------- training

def _augment(torch, x, gen, o: GridQatOptions, rng: np.random.Generator | None = None):
    """Random resized crop and horizontal flip of an NCHW image batch, back to its size."""
    if x.dim() != 4 or x.shape[-1] < 16:
        return x
    F = torch.nn.functional
    n, _, h, w = x.shape
    out = []
    for i in range(n):
        area = float(torch.empty(1).uniform_(*o.crop_scale, generator=gen))
        ch, cw = max(8, int(round(h * area ** 0.5))), max(8, int(round(w * area ** 0.5)))
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        c = x[i:i + 1, :, y0:y0 + ch, x0:x0 + cw]
        if (ch, cw) != (h, w):
            c = F.interpolate(c, size=(h, w), mode="bilinear", align_corners=False)
        if o.flip and bool(torch.rand(1, generator=gen) < 0.5):
            c = c.flip(-1)
        out.append(c)
    x = torch.cat(out)
    if o.mixup > 0 and n > 1:          # new views for distillation: the teacher labels the blend itself
        rng = rng or np.random.default_rng(o.seed)
        lam = torch.from_numpy(rng.beta(o.mixup, o.mixup, (n, 1, 1, 1)).astype(np.float32))
        x = lam * x + (1 - lam) * x[torch.randperm(n, generator=gen)]
    return x


def finetune_on_grid(qdq_path: str | Path, fp32_path: str | Path, calib: Dataset, *,
                     options: GridQatOptions | None = None,
                     progress: Callable[[str], None] = lambda m: None) -> tuple[QdqModule, GridQatReport]:
    """Fine-tune the weights of the QDQ model at ``qdq_path`` on its own grids by distillation
    from the FP32 model at ``fp32_path`` on (augmented) ``calib`` samples."""
    import onnxruntime as ort

    torch = _torch()
    o = options or GridQatOptions()
    if len(calib) == 0:
        raise DataError("fine-tuning needs calibration samples")
    if o.threads:
        torch.set_num_threads(o.threads)
    qdq = onnx.load(str(qdq_path))
    mod = QdqModule(qdq, learn_ranges=o.learn_ranges)
    if len(mod.inputs) != 1 or len(mod.outputs) != 1:
        raise ModelError("quantization-aware fine-tuning takes single-input, single-output models")
    so = ort.SessionOptions()
    if o.threads:
        so.intra_op_num_threads = o.threads
    teacher = ort.InferenceSession(str(fp32_path), so, providers=["CPUExecutionProvider"])
    tin = teacher.get_inputs()[0].name
    xs = np.stack([np.asarray(calib.loader(i), dtype=np.float32) for i in range(len(calib))])
    if xs.ndim == 5 and xs.shape[1] == 1:
        xs = xs[:, 0]
    gen = torch.Generator().manual_seed(o.seed)
    rng = np.random.default_rng(o.seed)
    biases = {id(p) for p in mod.bias_parameters()}
    if not o.weights:
        for p in mod.parameters():
            p.requires_grad_(False)
    groups = [{"params": mod.scale_parameters(), "lr": o.range_lr}] if o.learn_ranges else []
    if o.weights:
        groups += [{"params": [p for p in mod.parameters() if id(p) not in biases], "lr": o.lr},
                   {"params": [p for p in mod.parameters() if id(p) in biases], "lr": o.lr * o.bias_lr_scale}]
    if not groups:
        raise DataError("nothing to fine-tune: set weights=True or learn_ranges=True")
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, o.steps))
    T = o.temperature
    losses, log = [], []
    t0 = time.perf_counter()
    for step in range(o.steps):
        idx = torch.randint(0, len(xs), (min(o.batch_size, len(xs)),), generator=gen)
        x = _augment(torch, torch.from_numpy(xs[idx.numpy()]), gen, o, rng)
        with torch.no_grad():
            tl = torch.from_numpy(teacher.run(None, {tin: x.numpy()})[0])
        sl = mod(**{mod.inputs[0]: x})[0]
        if o.loss == "mse":
            loss = torch.mean((sl - tl) ** 2)
        else:
            loss = torch.nn.functional.kl_div(torch.log_softmax(sl / T, -1), torch.log_softmax(tl / T, -1),
                                              log_target=True, reduction="batchmean") * T * T
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 25 == 0 or step == o.steps - 1:
            top1 = float((sl.argmax(-1) == tl.argmax(-1)).float().mean())
            log.append({"step": step, "loss": round(float(np.mean(losses[-25:])), 5), "batch_top1_agreement": top1,
                        "seconds": round(time.perf_counter() - t0, 1)})
            progress(f"fine-tuning step {step + 1}/{o.steps}: distillation loss {np.mean(losses[-25:]):.4f}")
    tenth = max(1, len(losses) // 10)
    new = mod.integers()
    changed = sum(int((q != mod.consts[k]).sum()) for k, q in new.items())
    total = sum(q.size for q in new.values())
    return mod, GridQatReport(steps=o.steps, seconds=round(time.perf_counter() - t0, 1),
                              loss_first=round(float(np.mean(losses[:tenth])), 5),
                              loss_last=round(float(np.mean(losses[-tenth:])), 5),
                              weights_changed=changed, weights_total=total, log=log,
                              scales_changed=sum(r != 1.0 for r in mod.learned_scales().values()),
                              scale_ratios={k: round(r, 4) for k, r in mod.learned_scales().items()})


def write_back(mod: QdqModule, output: str | Path) -> Path:
    """The QDQ model with the fine-tuned integers in place of its weights and biases; with learned
    ranges, each learned activation grid (and the bias grids made of it) gets its own new scale."""
    m = onnx.ModelProto()
    m.CopyFrom(mod.model)
    new = mod.integers()
    for init in m.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    ratios = {k: r for k, r in mod.learned_scales().items() if r != 1.0}
    if ratios:
        _rescale(m, mod, ratios)
    output = Path(output)
    onnx.save(m, str(output))
    return output


def _rescale(m: onnx.ModelProto, mod: QdqModule, ratios: dict[str, float]) -> None:
    """Give every learned Q/DQ pair, and every bias DQ on a learned input grid, a scale initializer
    of its own (the calibrated ones may be shared by value between tensors)."""
    scale_of: dict[str, np.ndarray] = {}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and n.output[0] in ratios:
            s_new = np.asarray(mod.consts[n.input[1]], np.float32) * np.float32(ratios[n.output[0]])
            scale_of[n.output[0]] = s_new
            name = f"{n.output[0]}_lsq_scale"
            m.graph.initializer.append(numpy_helper.from_array(s_new.astype(np.float32), name))
            n.input[1] = name
    weight_scale = {dq: mod.consts[nd.input[1]] for nd in m.graph.node for dq in nd.output
                    if nd.op_type == "DequantizeLinear" and dq in mod.grid}
    reads = mod._bias_inputs()
    wscale_of_bias = {}
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and reads.get(n.input[2]) in scale_of:
            wscale_of_bias[n.input[2]] = weight_scale[n.input[1]]
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        if n.input[0] in scale_of:                       # the learned activation's DQ
            n.input[1] = f"{n.input[0]}_lsq_scale"
        elif n.output[0] in wscale_of_bias:              # a bias on a learned input grid
            s_b = (scale_of[reads[n.output[0]]] * np.asarray(wscale_of_bias[n.output[0]], np.float32)).astype(np.float32)
            name = f"{n.output[0]}_lsq_scale"
            m.graph.initializer.append(numpy_helper.from_array(s_b.reshape(np.shape(mod.consts[n.input[1]])), name))
            n.input[1] = name
