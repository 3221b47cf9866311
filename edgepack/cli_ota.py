"""CLI for OTA bundles: keys, bundle, delta, verify (issue 3). Placeholder until implemented."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    return None
