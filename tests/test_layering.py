"""The architecture as a test (docs/architecture.md): which room may import what.

Every rule reads the source with ``ast`` (imports inside functions count too: a lazy import is
still a dependency), so a change that breaks a rule fails here with the offending module named.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edgepack", "device_agent")

# The board's modules the host may import: its public face. Everything else in device_agent is the
# agent's own business (the install transaction, slots, state, the CLI) and may change freely.
BOARD_PUBLIC = {
    "device_agent", "device_agent.wire", "device_agent.bundle", "device_agent.trust", "device_agent.errors",
    "device_agent.agent_errors", "device_agent.durable", "device_agent.runtime", "device_agent.delta_apply",
    "device_agent.pull", "device_agent.machine", "device_agent.llm",
}

# Rooms of the host, lowest first. A room may import the shared modules and the rooms listed for it.
SHARED = {"edgepack", "edgepack.errors", "edgepack.data", "edgepack.modelinfo", "edgepack.targets", "edgepack.assets",
          "edgepack.charts"}
ROOMS = {  # room -> rooms it may import (besides SHARED and the board's public modules)
    "edgepack.quantize": set(),
    "edgepack.llm": {"edgepack.quantize"},      # scenario 3: export, weight-only, W8A8, placement for LLMs
    "edgepack.tflite": {"edgepack.quantize"},   # the LiteRT path: full-integer .tflite with the same search
    "edgepack.ota": set(),
    "edgepack.fleet": {"edgepack.ota", "edgepack.quantize"},  # pushes bundles; evaluates on emulated boards
    # tools over every room, used by the CLI and notebooks: the project file, doctor, release diffs
    "edgepack.project": {"edgepack.quantize", "edgepack.ota", "edgepack.fleet", "edgepack.llm", "edgepack.tflite"},
    "edgepack.doctor": {"edgepack.quantize", "edgepack.ota", "edgepack.fleet", "edgepack.project"},
    "edgepack.diff": {"edgepack.quantize", "edgepack.ota", "edgepack.fleet", "edgepack.project"},
    "edgepack.cli": {"edgepack.quantize", "edgepack.ota", "edgepack.fleet", "edgepack.project", "edgepack.llm",
                     "edgepack.tflite", "edgepack.doctor", "edgepack.diff"},
}


def _modname(p: Path) -> str:
    parts = list(p.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_modname(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, p: Path) -> set[str]:
    """Modules of this tree imported anywhere in ``p`` (``from X import m`` counts X.m when it is a module)."""
    pkg = name if p.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for n in ast.walk(ast.parse(p.read_text())):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                m = ".".join(base + ([n.module] if n.module else []))
            else:
                m = n.module or ""
            out.add(m)
            out |= {f"{m}.{a.name}" for a in n.names if f"{m}.{a.name}" in MODULES}
    return {m for m in out if m.split(".")[0] in PACKAGES}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _room(mod: str) -> str | None:
    for r in ROOMS:
        if mod == r or mod.startswith(r + "."):
            return r
    if mod.startswith("edgepack.cli"):  # edgepack.cli_* modules before the cli package existed
        return "edgepack.cli"
    return None


def test_device_agent_never_imports_the_host_side():
    """The board package must stay light: no edgepack, no torch/onnx/typer/rich/paramiko."""
    forbidden = {"edgepack", "torch", "onnx", "typer", "rich", "paramiko", "transformers"}
    for f in (ROOT / "device_agent").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in forbidden, f"{f.relative_to(ROOT)} imports {n}"
    code = ("import sys, importlib, pkgutil, device_agent\n"
            "for m in pkgutil.walk_packages(device_agent.__path__, 'device_agent.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in %r]\n"
            "assert not bad, bad\n") % (forbidden,)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_host_imports_only_the_boards_public_modules():
    bad = sorted((m, t) for m, ts in GRAPH.items() if m.startswith("edgepack")
                 for t in ts if t.startswith("device_agent")
                 and not (t in BOARD_PUBLIC or t.startswith("device_agent.wire.")))
    assert not bad, f"host modules import private board modules: {bad}"


def _private_violations(files: dict[str, Path]) -> list[tuple[str, str]]:
    out = []
    for m, p in files.items():
        for t in _imports(m, p):
            parts = t.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])  # the package the private module belongs to
                    if not (m == owner or m.startswith(owner + ".")):
                        out.append((m, t))
                    break
    return out


def test_private_modules_are_imported_only_inside_their_package():
    """``_internal`` and any ``_name`` module is private to its package: not the host's, the scripts'
    or the tests' to import."""
    files = dict(MODULES)
    for d in ("scripts", "tests"):
        files.update({f"{d}.{p.stem}": p for p in (ROOT / d).rglob("*.py")})
    assert not _private_violations(files)


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 5000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w == v or w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    # a package __init__ that re-exports its own submodules is a face, not a cycle
    real = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert not real, f"import cycles: {real}"


def test_rooms_import_only_downwards():
    bad = []
    for m, ts in GRAPH.items():
        if not m.startswith("edgepack"):
            continue
        src = _room(m)
        for t in ts:
            if not t.startswith("edgepack") or t in SHARED:
                continue
            dst = _room(t)
            if dst is None or dst == src:
                continue
            if src is None:  # a shared module importing a room
                bad.append((m, t))
            elif dst not in ROOMS[src]:
                bad.append((m, t))
    assert not bad, f"imports against the room order (docs/architecture.md): {bad}"


def test_the_cli_is_imported_by_nothing_in_the_library():
    bad = [(m, t) for m, ts in GRAPH.items() if _room(m) != "edgepack.cli"
           for t in ts if _room(t) == "edgepack.cli"]
    assert not bad, bad


def test_no_long_functions_outside_the_quantize_pipeline():
    """Short functions are the ones a newcomer can change. The quantization room is exempt until
    its search is a registry of remedies (the quantization issue), and the LiteRT path with it (its
    ONNX->TFLite translator is one long op table)."""
    long = []
    for m, p in MODULES.items():
        if _room(m) in ("edgepack.quantize", "edgepack.tflite"):
            continue
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80:
                long.append(f"{m}.{n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, long


def test_one_copy_of_the_durable_write_and_hash_helpers():
    """temp file + fsync + rename, directory fsync and file hashing live in device_agent/durable.py."""
    offenders = []
    for m, p in MODULES.items():
        if m == "device_agent.durable":
            continue
        s = p.read_text()
        if "os.fsync(" in s:
            offenders.append(f"{m}: os.fsync")
        if re.search(r"hashlib\.sha256\(\)\n(\s+)with open\(", s):
            offenders.append(f"{m}: a file hash loop")
    # the streaming writers fsync the files they stream (a bundle's payloads, a resumable download's
    # partial file), then rename through durable
    allowed = {"device_agent.bundle: os.fsync", "device_agent.pull: os.fsync"}
    assert sorted(set(offenders) - allowed) == []


def test_wire_limits_are_the_ones_the_format_document_quotes():
    from device_agent.wire.limits import LIMITS

    doc = (ROOT / "docs" / "bundle-format.md").read_text()
    for field in ("max_trust_section", "max_manifest", "max_signatures", "max_files", "full_window_log",
                  "max_buffered_frame"):
        m = re.search(rf"`{field}`\s*\|\s*([0-9][0-9 ]*)", doc)
        assert m, f"docs/bundle-format.md has no row for LIMITS.{field}"
        assert int(m.group(1).replace(" ", "")) == getattr(LIMITS, field), field


@pytest.mark.parametrize("name", ["zstd", "base-copy", "zstd-patch-from", "tensor-delta"])
def test_every_encoding_has_a_board_decoder_and_a_host_encoder(name):
    import device_agent.bundle  # noqa: F401  registers the decoders
    import edgepack.ota.delta  # noqa: F401  registers the encoders
    from device_agent.wire import codecs

    assert codecs.decoder(name)
    if name != codecs.BASE_COPY:  # a base copy has no payload to encode
        assert codecs.encoder(name)
