"""`edgepack agent ...`: host-side helpers for the device agent (issue 4).

``edgepack agent build -o edgepack-agent.pyz`` packs ``device_agent/`` into one zipapp to copy
onto boards (``python3 edgepack-agent.pyz --state DIR status``). Only the agent's own sources go
in: the board provides numpy, cryptography, backports.zstd and its runtime, so the file stays
small and nothing of the host side (onnx, typer, rich, edgepack) can leak onto a board.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import zipapp
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import typer

from .errors import UsageError

agent_app = typer.Typer(no_args_is_help=True, help="Device agent: build the single-file agent for boards.")

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
    import hashlib

    import device_agent
    src = Path(device_agent.__file__).resolve().parent
    out = Path(output)
    if out.suffix != ".pyz":
        raise UsageError(f"output {out} should end in .pyz (a Python zipapp)")
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


@agent_app.command("build")
def agent_build(output: Path = typer.Option(Path("edgepack-agent.pyz"), "-o", "--output", help="zipapp to write"),
                interpreter: str = typer.Option("/usr/bin/env python3", help="shebang line of the zipapp"),
                as_json: bool = typer.Option(False, "--json", help="print the result as JSON")) -> None:
    """Build the device agent into one file (stdlib zipapp) to copy onto boards."""
    from .cli import err, run_guarded

    def go() -> None:
        b = build_zipapp(output, interpreter=interpreter)
        d = {**asdict(b), "path": str(b.path)}
        if as_json:
            sys.stdout.write(json.dumps(d, indent=2) + "\n")
        else:
            err.print(f"wrote {b.path} ({b.bytes / 1024:.1f} KiB, {b.files} files, agent {b.agent_version}); "
                      f"on the board: python3 {b.path.name} --state DIR init --target NAME --trust-root root.json")

    run_guarded(go)


def register(app: typer.Typer) -> None:
    app.add_typer(agent_app, name="agent")
