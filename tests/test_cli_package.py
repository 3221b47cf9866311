"""The CLI is a package of thin command groups: no import cycle between its modules, nothing in the
library imports it, and the console-script entry point in pyproject.toml still resolves."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "edgepack" / "cli"


def _imports(path: Path, package: str) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against ``package``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names |= {f"{mod}.{a.name}" for a in node.names}
    return names


def test_command_modules_import_only_common():
    for f in sorted(CLI.glob("*.py")):
        if f.name in ("__init__.py", "__main__.py"):
            continue
        cli_deps = {n for n in _imports(f, "edgepack.cli") if n.startswith("edgepack.cli")}
        others = {n for n in cli_deps if not n.startswith("edgepack.cli._common")}
        assert not others, f"{f.name} imports other CLI modules {sorted(others)}: share code through _common"


def test_library_never_imports_the_cli():
    for f in sorted((ROOT / "edgepack").rglob("*.py")):
        if CLI in f.parents:
            continue
        pkg = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        if f.name != "__init__.py":
            pkg = pkg.rsplit(".", 1)[0]
        bad = {n for n in _imports(f, pkg) if n == "edgepack.cli" or n.startswith("edgepack.cli.")}
        assert not bad, f"{f.relative_to(ROOT)} imports the CLI ({sorted(bad)}): move the function into the library"


def test_console_script_entry_point_resolves_and_runs():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["edgepack"]
    mod, fn = spec.split(":")
    assert callable(getattr(importlib.import_module(mod), fn))
    r = subprocess.run([sys.executable, "-c", f"import sys; from {mod} import {fn}; sys.argv[0] = 'edgepack'; {fn}()",
                        "targets", "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "rpi4-2gb" in r.stdout
