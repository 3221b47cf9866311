"""Weight-only INT8 / INT4 for CPU-only boards: ONNX Runtime ``MatMulNBits`` on every decoder
MatMul, ``GatherBlockQuantized`` for the embeddings.

Defaults follow what measurement on SmolLM2-135M showed (docs/BENCHMARKS.md): the body MatMuls
at the requested bit width with symmetric blocks, ``lm_head`` and the embedding table at INT8
(the largest and most output-sensitive weights). Tied embeddings (one [H, V] matrix behind both
``lm_head`` and, through a Transpose, the embedding Gather, as the genai builder lays them out)
are untied first, so the Gather can be block-quantized instead of keeping an FP32 copy alive.

Algorithms are ORT's own: ``rtn`` (round to nearest, the ``default`` quantizer), ``hqq``
(half-quadratic, no data), ``k_quant`` (llama.cpp-style). GPTQ in ORT goes through Intel Neural
Compressor and a calibration reader; it is not wired here (see docs/BENCHMARKS.md).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelError, UsageError

ALGOS = ("rtn", "hqq", "k_quant")
LM_HEAD = "/lm_head/MatMul"
# the body's block size when none is given, by bit width. At 8 bits ORT's MatMulNBits (accuracy
# level 4) quantizes the activations to int8 per block of the same length (MLAS' CompInt8 path,
# amax / 127 per block): on SmolLM2-135M's 16,384-token protocol blocks of 16 are +0.24 % ppl,
# 32 +0.47 %, 64 +0.69 %, at 171 / 157 / 147 MB (docs/BENCHMARKS.md, issue 15). At 4 bits the
# weights' own error dominates and 32 was the measured choice.
DEFAULT_BLOCK_SIZE = {4: 32, 8: 16}


@dataclass(frozen=True, kw_only=True)
class WeightOnlyOptions:
    bits: int = 4                     # body MatMuls: 4 or 8
    block_size: int | None = None     # None: DEFAULT_BLOCK_SIZE[bits] (chosen by measurement)
    algo: str = "rtn"
    symmetric: bool = True
    lm_head_bits: int | None = 8      # None: keep lm_head in float
    embed_bits: int | None = 8        # None: keep the embedding table in float
    accuracy_level: int = 4           # MatMulNBits computes with int8 activations on CPU (fastest)
    int8_matmuls: tuple = ()          # name substrings of body MatMuls kept at INT8 (e.g. "down_proj")
    share_tied: bool = True           # tied table: the embedding Gather reads lm_head's INT8 blocks

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise UsageError(f"weight-only bits must be 4 or 8, not {self.bits}")
        if self.block_size is None:
            object.__setattr__(self, "block_size", DEFAULT_BLOCK_SIZE[self.bits])
        if self.algo not in ALGOS:
            raise UsageError(f"unknown weight-only algorithm {self.algo!r}; choose from {', '.join(ALGOS)}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise UsageError(f"block size {self.block_size} must be one of 16, 32, 64, 128, 256")
        for name, b in (("lm_head_bits", self.lm_head_bits), ("embed_bits", self.embed_bits)):
            if b not in (None, 4, 8):
                raise UsageError(f"{name} must be 4, 8 or None")

    def to_dict(self) -> dict:
        return asdict(self)


def untie_embeddings(model) -> bool:
    """Replace ``Transpose(lm_head weight) -> Gather`` by a Gather on its own [V, H] initializer."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for g in model.graph.node:
        if g.op_type != "Gather" or g.input[0] in inits:
            continue
        t = producers.get(g.input[0])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[t.input[0]])
        if w.ndim != 2:
            continue
        emb = numpy_helper.from_array(np.ascontiguousarray(w.T), name="model.embed_tokens.weight")
        model.graph.initializer.append(emb)
        g.input[0] = emb.name
        if not any(t.output[0] in n.input for n in model.graph.node if n is not g):
            model.graph.node.remove(t)
        return True
    return False


def _quantize(model, cfg, nodes_to_exclude=(), nodes_to_include=None):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(model, bits=getattr(cfg, "bits", 4), block_size=getattr(cfg, "block_size", 32),
                             is_symmetric=getattr(cfg, "is_symmetric", True),
                             accuracy_level=getattr(cfg, "accuracy_level", None),
                             nodes_to_exclude=list(nodes_to_exclude), nodes_to_include=nodes_to_include,
                             algo_config=cfg)
    q.process()
    return q.model.model


def _body_config(o: WeightOnlyOptions):
    from onnxruntime.quantization import matmul_nbits_quantizer as m

    if o.algo == "rtn":
        c = m.DefaultWeightOnlyQuantConfig(block_size=o.block_size, is_symmetric=o.symmetric,
                                           accuracy_level=o.accuracy_level, bits=o.bits,
                                           op_types_to_quantize=("MatMul",))
    elif o.algo == "hqq":
        c = m.HQQWeightOnlyQuantConfig(block_size=o.block_size, bits=o.bits, op_types_to_quantize=("MatMul",))
    else:
        c = m.KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
        c.bits, c.block_size, c.is_symmetric, c.accuracy_level = o.bits, o.block_size, o.symmetric, o.accuracy_level
    return c


def quantize_weight_only(src: str | Path, dst: str | Path, options: WeightOnlyOptions = WeightOnlyOptions()) -> dict:
    """Write a weight-only quantized copy of a builder-layout FP32 decoder; returns what was done."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as m

    src, dst = Path(src), Path(dst)
    try:
        model = onnx.load(str(src))
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad model file
        raise ModelError(f"{src}: not a loadable ONNX model ({e})") from None
    if any(n.op_type == "MatMulNBits" for n in model.graph.node):
        raise ModelError(f"{src} is already weight-only quantized")
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    untied = untie_embeddings(model)
    has_head = any(n.name == LM_HEAD for n in model.graph.node)
    excl = [LM_HEAD] if has_head else []
    keep8 = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name != LM_HEAD
             and any(s in n.name for s in options.int8_matmuls)] if options.bits == 4 else []
    model = _quantize(model, _body_config(options), nodes_to_exclude=excl + keep8)
    if keep8:
        c = m.DefaultWeightOnlyQuantConfig(block_size=options.block_size, is_symmetric=options.symmetric, bits=8,
                                           accuracy_level=options.accuracy_level, op_types_to_quantize=("MatMul",))
        model = _quantize(model, c, nodes_to_include=keep8)
    if has_head and options.lm_head_bits:
        # the head in blocks of at least 32 (also at an 8-bit body of 16: what was measured)
        c = m.DefaultWeightOnlyQuantConfig(block_size=max(32, options.block_size), is_symmetric=True, bits=options.lm_head_bits,
                                           accuracy_level=options.accuracy_level, op_types_to_quantize=("MatMul",))
        model = _quantize(model, c, nodes_to_include=[LM_HEAD])
    embed = None
    if untied and has_head and options.share_tied and options.lm_head_bits == 8 and options.embed_bits == 8:
        embed = share_head_with_embedding(model)
    if embed is None and options.embed_bits:
        embed = quantize_embedding(model, options.embed_bits, options.block_size)
    save_model(model, dst, src.parent)
    ops = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"options": options.to_dict(), "untied_embeddings": untied, "embedding": embed, "ops": ops}


def save_model(model, dst: Path, side_files_from: Path | None = None) -> None:
    """Write ``model`` with one external data file named after ``dst``, atomically; copy the
    builder's side files (genai config, tokenizer) from the source folder."""
    import onnx

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.stem}-", suffix=".onnx")
    os.close(fd)
    data = Path(tmp).name + ".data"
    onnx.save(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data,
              size_threshold=1024)
    final_data = dst.name + ".data"
    # the external data file's name is written inside the graph: rewrite it before the rename
    m2 = onnx.load(tmp, load_external_data=False)
    for t in m2.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = final_data
    onnx.save(m2, tmp)
    if (Path(tmp).parent / data).is_file():     # none when no tensor reaches the threshold (a tiny model)
        os.replace(Path(tmp).parent / data, dst.parent / final_data)
    os.replace(tmp, dst)
    src = side_files_from
    for f in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        if src is not None and (src / f).is_file() and src != dst.parent:
            (dst.parent / f).write_bytes((src / f).read_bytes())


def share_head_with_embedding(model) -> str | None:
    """Tied embeddings, one INT8 copy: the embedding Gather reads the rows of ``lm_head``'s
    8-bit ``MatMulNBits`` blocks (B is [V, H/block, block] uint8: row v is embedding row v)
    and de-quantizes only the gathered rows, ``(q - zero) * scale``. Saves the second [V, H]
    INT8 table (28 MB on SmolLM2-135M). Returns None when the layout is not the expected one."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    head = next((n for n in model.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name), None)
    if head is None:
        return None
    attrs = {a.name: a.i for a in head.attribute}
    if attrs.get("bits") != 8 or head.input[1] not in inits or head.input[2] not in inits:
        return None
    k, n, blk = attrs["K"], attrs["N"], attrs["block_size"]
    gather = next((g for g in model.graph.node if g.op_type == "Gather" and g.input[0] in inits
                   and list(inits[g.input[0]].dims) == [n, k]), None)
    if gather is None or list(inits[head.input[1]].dims) != [n, k // blk, blk]:
        return None
    if len(head.input) > 3 and head.input[3]:
        return None                       # an asymmetric head: not the layout written here
    # re-round the head's blocks with scale = amax / 127: every weight within half a step. ORT's
    # 8-bit symmetric RTN uses a signed scale instead, -w[argmax |w|] / 128: the block's largest |w|
    # is exact and the step finer, but a weight of the other sign near amax is clipped by up to a
    # step. Measured (docs/BENCHMARKS.md, issue 15): the two head grids are within 0.003 ppl on
    # 16k tokens, and amax / 127 for the body MatMuls too is worse (+0.57 % against +0.47 %).
    base = gather.input[0]
    w = numpy_helper.to_array(inits[base]).astype(np.float32).reshape(n, k // blk, blk)
    scales = (np.maximum(np.abs(w).max(-1, keepdims=True), 1e-12) / 127.0).astype(np.float32)
    q = (np.clip(np.round(w / scales), -127, 127) + 128).astype(np.uint8)
    for name, arr in ((head.input[1], q), (head.input[2], scales.reshape(list(inits[head.input[2]].dims)))):
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.append(numpy_helper.from_array(arr, name))
    zp = np.float32(128.0)                # MatMulNBits' implied zero point for 8 bits: 2^(bits-1)
    model.graph.initializer.remove(inits[base])
    extra = [numpy_helper.from_array(scales, f"{base}_head_scale"),
             numpy_helper.from_array(np.array([0, 0, k], np.int64), f"{base}_shape")]
    zname = f"{base}_head_zero"
    extra.append(numpy_helper.from_array(np.asarray(zp, np.float32), zname))
    model.graph.initializer.extend(extra)
    _dequantizing_gather(model, gather, head.input[1], f"{base}_head_scale", f"{base}_shape", zero=zname)
    return f"{gather.name}: shares {head.name}'s int8 blocks of {blk} ({n}x{k})"


def _dequantizing_gather(model, gather, q: str, scale: str, shape: str, *, zero: str | None = None) -> None:
    """Replace ``gather`` (rows of a float table) in place by standard ops that gather the rows of
    the quantized blocks ``q`` and their ``scale``s and dequantize them: Cast, (Sub ``zero``), Mul,
    Reshape to ``shape``. Both the INT8 embedding and the table shared with lm_head use it."""
    from onnx import TensorProto, helper

    out, ids, g = gather.output[0], gather.input[1], gather.name
    centred = f"{out}_c" if zero else f"{out}_f"
    new = [helper.make_node("Gather", [q, ids], [f"{out}_q"], name=f"{g}_q", axis=0),
           helper.make_node("Gather", [scale, ids], [f"{out}_s"], name=f"{g}_s", axis=0),
           helper.make_node("Cast", [f"{out}_q"], [f"{out}_f"], name=f"{g}_cast", to=TensorProto.FLOAT)]
    if zero:
        new.append(helper.make_node("Sub", [f"{out}_f", zero], [centred], name=f"{g}_zero"))
    new += [helper.make_node("Mul", [centred, f"{out}_s"], [f"{out}_dq"], name=f"{g}_dq"),
            helper.make_node("Reshape", [f"{out}_dq", shape], [out], name=f"{g}_reshape")]
    idx = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    for j, node in enumerate(new):
        model.graph.node.insert(idx + j, node)


def quantize_embedding(model, bits: int, block: int) -> str | None:
    """Block-quantize the embedding table in standard ops: Gather int8 rows and their scales,
    Cast, Mul, Reshape. ORT's quantizer only writes 4-bit GatherBlockQuantized; this keeps INT8
    (and 4-bit values stored in int8) with only the gathered rows ever de-quantized."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for g in model.graph.node:
        if g.op_type != "Gather" or g.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[g.input[0]])
        if w.ndim != 2 or w.dtype != np.float32:
            continue
        v, h = w.shape
        while block > 1 and h % block:   # the widest block that tiles a row (576 = 4.5 x 128 -> 64)
            block //= 2
        qmax = 2 ** (bits - 1) - 1
        blocks = w.reshape(v, h // block, block)
        scale = np.maximum(np.abs(blocks).max(-1, keepdims=True), 1e-12) / qmax
        q = np.clip(np.round(blocks / scale), -qmax, qmax).astype(np.int8)
        base = g.input[0]
        model.graph.initializer.remove(inits[base])
        model.graph.initializer.extend([
            numpy_helper.from_array(q, f"{base}_q{bits}"),
            numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale"),
            numpy_helper.from_array(np.array([0, 0, h], np.int64), f"{base}_shape")])
        _dequantizing_gather(model, g, f"{base}_q{bits}", f"{base}_scale", f"{base}_shape")
        return f"{g.name}: int{bits} blocks of {block} ({v}x{h})"
    return None
