"""`edgepack agent build`: the single-file board agent (``edgepack.fleet.agent_zipapp``).

``edgepack agent build -o edgepack-agent.pyz`` packs ``device_agent/`` into one zipapp to copy
onto boards (``python3 edgepack-agent.pyz --state DIR status``).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from ._common import JSON_OPT, dump, err, run_guarded

agent_app = typer.Typer(no_args_is_help=True, help="Device agent: build the single-file agent for boards.")


@agent_app.command("build")
def agent_build(output: Path = typer.Option(Path("edgepack-agent.pyz"), "-o", "--output", help="zipapp to write"),
                interpreter: str = typer.Option("/usr/bin/env python3", help="shebang line of the zipapp"),
                as_json: bool = JSON_OPT) -> None:
    """Build the device agent into one file (stdlib zipapp) to copy onto boards."""
    from ..fleet.agent_zipapp import build_zipapp

    def go() -> None:
        b = build_zipapp(output, interpreter=interpreter)
        if as_json:
            dump({**asdict(b), "path": str(b.path)})
        else:
            err.print(f"wrote {b.path} ({b.bytes / 1024:.1f} KiB, {b.files} files, agent {b.agent_version}); "
                      f"on the board: python3 {b.path.name} --state DIR init --target NAME --trust-root root.json",
                      highlight=False, markup=False)

    run_guarded(go)


def register(app: typer.Typer) -> None:
    app.add_typer(agent_app, name="agent")
