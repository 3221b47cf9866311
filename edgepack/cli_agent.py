"""CLI for the device agent's host-side helpers (issue 4). Placeholder until implemented."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    return None
