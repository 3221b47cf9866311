"""The single-file board agent: ``device_agent/`` packed into one stdlib zipapp.

``bootstrap`` copies it onto boards and ``edgepack agent build`` writes it for hand installs. Only
the agent's own sources go in: the board provides numpy, cryptography, backports.zstd and its
runtime, so the file stays small and nothing of the host side (onnx, typer, rich, edgepack) can
leak onto a board.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipapp
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

MAIN = '''"""edgepack device agent (zipapp). Run: python3 edgepack-agent.pyz --help"""
import sys

from device_agent.cli import main

sys.exit(main())
'''


@dataclass
class AgentBuild:
    path: Path
    bytes: int
    files: int
    agent_version: str
    sha256: str


def build_zipapp(output: str | Path, *, interpreter: str = "/usr/bin/env python3", compressed: bool = True) -> AgentBuild:
    """Write ``device_agent/`` (sources only, no caches) plus a ``__main__.py`` into a zipapp."""
    import device_agent
    src = Path(device_agent.__file__).resolve().parent
    out = Path(output)
    if out.suffix != ".pyz":
        raise UsageError(f"output {out} should end in .pyz (a Python zipapp); e.g. -o edgepack-agent.pyz")
    with tempfile.TemporaryDirectory(prefix="edgepack-agent-") as td:
        stage = Path(td) / "app"
        shutil.copytree(src, stage / "device_agent",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.so", "tests"))
        (stage / "__main__.py").write_text(MAIN)
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_name(f".{out.name}.partial")
        zipapp.create_archive(stage, part, interpreter=interpreter, compressed=compressed)
        part.replace(out)
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
    bad = [n for n in names if n != "__main__.py" and not n.startswith("device_agent/")]
    if bad:
        out.unlink()
        raise UsageError(f"zipapp would contain files outside device_agent/: {bad}")
    return AgentBuild(path=out, bytes=out.stat().st_size, files=len(names), agent_version=device_agent.__version__,
                      sha256=hashlib.sha256(out.read_bytes()).hexdigest())


__all__ = ["AgentBuild", "build_zipapp"]
