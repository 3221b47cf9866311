"""Runtime adapters: one small ``Session`` interface over ONNX Runtime, LiteRT and OpenVINO.

Runtimes are imported lazily (an install that is refused never pays for importing one, and a
board carries only the runtime it uses). A requested accelerator (ORT execution provider,
LiteRT delegate, OpenVINO device) that is missing or fails to initialise raises
``AcceleratorUnavailable``: it is never silently replaced by the CPU, because a board that
quietly runs 10x slower than its budget is worse than one that says why it refuses.
"""
from __future__ import annotations

import os

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agent_errors import AcceleratorUnavailable, Incompatible, ModelLoadError, RuntimeUnavailable

ALIASES = {"onnxruntime": "onnxruntime", "ort": "onnxruntime", "onnx": "onnxruntime", "litert": "litert",
           "tflite": "litert", "ai_edge_litert": "litert", "tensorflow-lite": "litert", "openvino": "openvino"}
MODULES = {"onnxruntime": "onnxruntime", "litert": "ai_edge_litert", "openvino": "openvino"}
FORMATS = {".onnx": ("onnxruntime", "openvino"), ".tflite": ("litert",)}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | None, ...]
    dtype: str


@dataclass
class Session:
    """A loaded model. ``provider`` is what actually runs it, as the runtime reports it."""

    runtime: str
    runtime_version: str
    provider: str
    providers: list[str]
    threads: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    load_seconds: float
    _impl: Any = field(repr=False, default=None)
    path: Path | None = None   # the model file (a decoder reads its genai_config.json beside it)

    def run(self, feeds: dict[str, Any]) -> list[Any]:
        return self._impl(feeds)

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "runtime_version": self.runtime_version, "provider": self.provider,
                "providers": self.providers, "threads": self.threads,
                "inputs": [[t.name, list(t.shape), t.dtype] for t in self.inputs],
                "outputs": [[t.name, list(t.shape), t.dtype] for t in self.outputs]}


def normalize(name: str) -> str:
    n = ALIASES.get(name.lower())
    if n is None:
        raise Incompatible(f"unknown runtime {name!r}; known: onnxruntime, litert (tflite), openvino")
    return n


def installed(runtime: str) -> bool:
    return importlib.util.find_spec(MODULES[normalize(runtime)]) is not None


def choose_runtime(model: Path, board_runtimes: list[str], requested: str | None = None) -> str:
    """The runtime that will run ``model`` on this board; raises Incompatible if there is none.

    ``requested`` (the bundle's settings) must be one the board lists and has installed;
    otherwise the board's preference order decides among runtimes that read the format.
    """
    fmt = FORMATS.get(model.suffix.lower())
    if fmt is None:
        raise Incompatible(f"model {model.name}: no runtime reads {model.suffix!r} files (use .onnx or .tflite)")
    board = [normalize(r) for r in board_runtimes]
    if requested:
        r = normalize(requested)
        if r not in fmt:
            raise Incompatible(f"bundle asks for runtime {requested!r} but its model is {model.suffix}")
        if r not in board:
            raise Incompatible(f"bundle needs runtime {r}, this board offers {', '.join(board)}")
        if not installed(r):
            raise RuntimeUnavailable(f"bundle needs runtime {r}, which is not installed on this board")
        return r
    for r in board:
        if r in fmt and installed(r):
            return r
    raise Incompatible(f"model {model.name} ({model.suffix}) needs one of {', '.join(fmt)}; this board has "
                       f"{', '.join(r for r in board if installed(r)) or 'none installed'}")


def load_model(path: str | Path, runtime: str, *, threads: int = 0, accelerator: str | None = None) -> Session:
    """Load ``path`` in ``runtime``. Raises RuntimeUnavailable/AcceleratorUnavailable/ModelLoadError."""
    runtime = normalize(runtime)
    path = Path(path)
    if not installed(runtime):
        raise RuntimeUnavailable(f"runtime {runtime} is not installed on this board (pip install "
                                 f"{ {'onnxruntime': 'onnxruntime', 'litert': 'ai-edge-litert', 'openvino': 'openvino'}[runtime]})")
    sess = {"onnxruntime": _load_ort, "litert": _load_litert, "openvino": _load_openvino}[runtime](
        path, threads, accelerator)
    sess.path = path
    return sess


# --------------------------------------------------------------------------- ONNX Runtime
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32", "tensor(int64)": "int64",
              "tensor(bool)": "bool"}


def _ort_spec(a: Any) -> TensorSpec:
    return TensorSpec(a.name, tuple(d if isinstance(d, int) else None for d in a.shape), _ORT_TYPES.get(a.type, a.type))


def _load_ort(path: Path, threads: int, accelerator: str | None) -> Session:
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    exact = os.environ.get("EDGEPACK_AGENT_INT8") == "exact"
    if exact:
        # A stand-in board on a host whose INT8 kernels differ from the board's (x86 AVX2 without
        # VNNI saturates u8 x s8 pair sums): ORT's fused kernels with exact int32 sums (u8 x u8
        # in precision mode), as ARM NEON, VNNI and NPUs compute and as the quantizer judges
        # (edgepack.quantize.numerics.exact_session). The host's own default board sets it.
        so.add_session_config_entry("session.x64quantprecision", "1")   # every optimization level, as a board
    providers = ["CPUExecutionProvider"]
    if accelerator and accelerator != "CPUExecutionProvider":
        avail = ort.get_available_providers()
        if accelerator not in avail:
            raise AcceleratorUnavailable(f"execution provider {accelerator} is not available in this onnxruntime "
                                         f"(has {', '.join(avail)}); install the matching onnxruntime build")
        providers = [accelerator, "CPUExecutionProvider"]  # CPU only for nodes the EP does not take
    t0 = time.perf_counter()
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        if not exact:
            raise ModelLoadError(f"onnxruntime cannot load {path.name}: {str(e).splitlines()[0][:300]}") from None
        # precision mode refuses a weight zero point that two layers share (models not written by
        # edgepack): the unfused graph computes exact integer products too
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as e2:
            raise ModelLoadError(f"onnxruntime cannot load {path.name}: {str(e2).splitlines()[0][:300]}") from None
    dt = time.perf_counter() - t0
    used = sess.get_providers()
    if accelerator and accelerator not in used:
        raise AcceleratorUnavailable(f"execution provider {accelerator} failed to initialise (session runs on "
                                     f"{', '.join(used)}); refusing to fall back silently")
    out_names = [o.name for o in sess.get_outputs()]
    return Session(runtime="onnxruntime", runtime_version=ort.__version__, provider=used[0], providers=used,
                   threads=threads or int(so.intra_op_num_threads) or 0,
                   inputs=[_ort_spec(i) for i in sess.get_inputs()], outputs=[_ort_spec(o) for o in sess.get_outputs()],
                   load_seconds=dt, _impl=lambda feeds: sess.run(out_names, feeds))


# --------------------------------------------------------------------------- LiteRT
def _load_litert(path: Path, threads: int, accelerator: str | None) -> Session:
    from ai_edge_litert import interpreter as tfl
    import numpy as np
    delegates = []
    want = (accelerator or "").lower()
    if accelerator and want not in ("xnnpack", "cpu", "none"):
        try:
            # open the library first: LiteRT's Delegate object, half-built when the library is missing,
            # prints a traceback from its __del__ when collected
            import ctypes
            ctypes.CDLL(accelerator)
            delegates = [tfl.load_delegate(accelerator)]
        except (ValueError, OSError, RuntimeError) as e:
            raise AcceleratorUnavailable(f"LiteRT delegate {accelerator!r} cannot be loaded ({str(e)[:200]}); "
                                         "install it on the board or drop the request") from None
    t0 = time.perf_counter()
    try:
        kw: dict[str, Any] = {"model_path": str(path), "num_threads": threads or None}
        if delegates:
            kw["experimental_delegates"] = delegates
        elif want in ("cpu", "none"):
            kw["experimental_op_resolver_type"] = tfl.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        it = tfl.Interpreter(**kw)
        it.allocate_tensors()
    except Exception as e:
        raise ModelLoadError(f"LiteRT cannot load {path.name}: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}") from None
    provider = _litert_provider(it, accelerator if delegates else None)
    if want == "xnnpack" and provider != "XNNPACK":
        raise AcceleratorUnavailable(f"XNNPACK was asked for but took no op of {path.name} (it runs on {provider}); "
                                     "refusing to fall back silently")
    if delegates and provider != accelerator:
        raise AcceleratorUnavailable(f"LiteRT delegate {accelerator!r} loaded but took no op of {path.name}; "
                                     "refusing to run it on the CPU instead")
    dt = time.perf_counter() - t0
    ins, outs = it.get_input_details(), it.get_output_details()

    def run(feeds: dict[str, Any]) -> list[Any]:
        for d in ins:
            x = np.asarray(feeds[d["name"]])
            if tuple(x.shape) != tuple(d["shape"]):
                it.resize_tensor_input(d["index"], x.shape)
                it.allocate_tensors()
            it.set_tensor(d["index"], x)
        it.invoke()
        return [it.get_tensor(o["index"]).copy() for o in outs]

    def spec(d: dict) -> TensorSpec:
        sig = d.get("shape_signature")
        shape = tuple(None if (sig is not None and sig[i] < 0) else int(v) for i, v in enumerate(d["shape"]))
        return TensorSpec(d["name"], shape, np.dtype(d["dtype"]).name)

    try:
        import importlib.metadata as md
        ver = md.version("ai-edge-litert")
    except Exception:
        ver = "unknown"
    return Session(runtime="litert", runtime_version=ver, provider=provider, providers=[provider], threads=threads,
                   inputs=[spec(d) for d in ins], outputs=[spec(d) for d in outs], load_seconds=dt, _impl=run)


def _litert_provider(it: Any, delegate: str | None) -> str:
    """What really runs the model: the delegate that took ops, ``XNNPACK`` when LiteRT's default
    delegate took some, else ``none (builtin kernels)``. A delegate shows as a ``DELEGATE`` node in
    the interpreter's graph (LiteRT applies XNNPACK by default only to models it can take: a
    build without it, or a model of ops it lacks, runs on the builtin kernels)."""
    try:
        nodes = it._get_ops_details()
    except Exception:  # an interpreter without the node listing: say so rather than guess
        return delegate or "unknown"
    if any(n.get("op_name") == "DELEGATE" for n in nodes):
        return delegate or "XNNPACK"
    return "none (builtin kernels)"


# --------------------------------------------------------------------------- OpenVINO (optional)
# Virtual devices choose (or share) real devices themselves: AUTO and MULTI may run the model on the
# CPU while the board asked for its NPU, so the adapter refuses them and names one device.
_OV_VIRTUAL = ("AUTO", "MULTI", "HETERO", "BATCH")


def _ov_device(requested: str | None, available: list[str]) -> str:
    """The one OpenVINO device to compile for; AcceleratorUnavailable if absent or virtual.

    ``GPU`` matches ``GPU.0`` (OpenVINO numbers several devices of a kind); ``CPU`` is the default.
    """
    device = (requested or "CPU").strip().upper()  # OpenVINO's device names are upper case: "cpu" is the CPU
    base = device.split(".", 1)[0].split(":", 1)[0]
    if base in _OV_VIRTUAL:
        raise AcceleratorUnavailable(f"OpenVINO device {device!r} lets OpenVINO pick the hardware (it may run on "
                                     f"the CPU without saying so); name one device: {', '.join(available) or 'CPU'}")
    if device not in available and not (("." not in device) and any(a.split(".", 1)[0] == device for a in available)):
        raise AcceleratorUnavailable(f"OpenVINO device {device} is not present on this board (has "
                                     f"{', '.join(available) or 'none'}); install its driver or drop the request")
    return device


def _load_openvino(path: Path, threads: int, accelerator: str | None) -> Session:
    import openvino as ov
    core = ov.Core()
    device = _ov_device(accelerator, list(core.available_devices))
    cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}  # one stream: batch-1 latency, like the other adapters
    if device == "CPU":
        # f32 as the model says: on CPUs with bf16/AMX OpenVINO would otherwise lower FP32 models to bf16.
        cfg["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = threads
    t0 = time.perf_counter()
    try:
        # The ONNX frontend only: Core.read_model would try every frontend (TensorFlow, Paddle, ...) on
        # a file that is not valid ONNX, parsing hostile bytes with each and logging them to stderr.
        from openvino.frontend import FrontEndManager
        fe = FrontEndManager().load_by_framework("onnx")
        compiled = core.compile_model(fe.convert(fe.load(str(path))), device, cfg)
    except Exception as e:  # OpenVINO raises GeneralFailure/RuntimeError for unreadable models, unsupported ops
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith(
            ("Exception from", "Check '", "FrontEnd API failed"))]
        msg = "; ".join(lines) or type(e).__name__
        raise ModelLoadError(f"OpenVINO cannot load {path.name} on {device}: {msg[:300]}") from None
    dt = time.perf_counter() - t0
    ran = [str(d) for d in compiled.get_property("EXECUTION_DEVICES")] or [device]
    want = device.split(".", 1)[0]
    if any(d.split(".", 1)[0] != want for d in ran):
        raise AcceleratorUnavailable(f"OpenVINO compiled {path.name} for {device} but it runs on {', '.join(ran)}; "
                                     "refusing to fall back silently")
    req = compiled.create_infer_request()
    outs = list(compiled.outputs)

    def run(feeds: dict[str, Any]) -> list[Any]:
        res = req.infer(feeds, share_outputs=False)  # copies: the next inference reuses the output buffers
        return [res[o] for o in outs]

    def spec(p: Any) -> TensorSpec:
        ps = p.get_partial_shape()
        try:
            dtype = p.get_element_type().to_dtype().name
        except Exception:  # an element type numpy has no name for (e.g. u4): report OpenVINO's
            dtype = p.get_element_type().get_type_name()
        return TensorSpec(p.get_any_name(), tuple(d.get_length() if d.is_static else None for d in ps), dtype)

    used_threads = threads
    if device == "CPU":
        try:
            used_threads = int(compiled.get_property("INFERENCE_NUM_THREADS")) or threads
        except Exception:
            pass
    return Session(runtime="openvino", runtime_version=ov.__version__.split("-", 1)[0], provider=ran[0],
                   providers=ran, threads=used_threads, inputs=[spec(i) for i in compiled.inputs],
                   outputs=[spec(o) for o in outs], load_seconds=dt, _impl=run)


__all__ = ["Session", "TensorSpec", "load_model", "choose_runtime", "installed", "normalize"]
