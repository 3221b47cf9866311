"""`edgepack init`, and the project file's values as every command's defaults (flags override).

``defaults(project)`` maps ``edgepack.toml`` onto click's ``default_map``: a value there is what
the option would be without the flag, so a required option the project supplies is not required.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from ._common import JSON_OPT, cell, dump, err, run_guarded


def defaults(proj: Any) -> dict[str, Any]:
    """click ``default_map`` for the command tree from a loaded ``edgepack.project.Project``."""
    if proj is None:
        return {}
    s = lambda p: None if p is None else str(p)  # noqa: E731
    target = proj.targets[0] if proj.targets else None
    q = {("eval_" if k == "eval" else k): (str(v) if isinstance(v, Path) else v) for k, v in proj.quantize.items()}
    fleet = {"fleet": s(proj.fleet_file)} if proj.fleet_file else {}
    store = {"store": s(proj.store)} if proj.store else {}
    keyset = {k: v for k, v in (("release_keys", s(proj.release_keys)),) if v}
    dm: dict[str, Any] = {
        "quantize": {**({"target": target} if target else {}), **q},
        "analyze": {**({"target": target} if target else {}),
                    **{k: v for k, v in q.items() if k in ("calib", "eval_", "preprocess", "calib_size")}},
        "qat": {"target": target} if target else {},
        "bundle": {"name": proj.name, **({"target": list(proj.targets)} if proj.targets else {}),
                   **({"key": [s(proj.release_key)]} if proj.release_key else {}), **keyset,
                   **({"root": [s(proj.root)]} if proj.root else {})},
        "delta": {**({"key": [s(proj.release_key)]} if proj.release_key else {}),
                  **({"root": [s(proj.root)]} if proj.root else {})},
        "verify": {**({"root": s(proj.root)} if proj.root else {})},
        "diff": {**({"root": s(proj.root)} if proj.root else {})},
        "push": {**fleet, **store},
        "rollback": {**fleet, **store},
        "report": {**fleet, **store},
        "doctor": {**fleet},
        "fleet": {"bootstrap": {**fleet, **({"trust_root": s(proj.root)} if proj.root else {}), **keyset},
                  "status": {**fleet, **store}, "history": {**fleet, **store}, "check": {**fleet, **store}},
    }
    return {k: v for k, v in dm.items() if v}


def init_cmd(directory: Path = typer.Argument(Path("."), help="project folder (created if missing)"),
             name: Optional[str] = typer.Option(None, "--name", "-n", help="model name the bundles carry "
                                                "(default: the folder's name)"),
             target: List[str] = typer.Option(["rpi4-2gb"], "--target", "-t", help="board profile "
                                              "(`edgepack targets` lists them)"),
             as_json: bool = JSON_OPT) -> None:
    """Start a project: edgepack.toml, signing keys (2-of-3 root, one release key) and a sample fleet file."""
    from ..project import check_name, init_project

    def go() -> None:
        nm = name or check_name_from_folder(directory, check_name)
        rep = init_project(directory, name=nm, targets=list(target))
        if as_json:
            dump(rep.to_json())
            return
        err.print(cell(f"wrote {rep.project} (model {nm}, target {', '.join(target)}), keys in "
                       f"{Path(rep.keys['root']).parent}/ and the sample fleet {rep.fleet}"))
        err.print(cell("keep keys/root-*.key offline. Next: edgepack quantize MODEL.onnx --calib DATA --eval DATA; "
                       "edgepack bundle out/MODEL-int8.onnx --release 1; edgepack push BUNDLE --dry-run"))

    run_guarded(go)


def check_name_from_folder(directory: Path, check: Any) -> str:
    """The folder's name as a model name, made legal (``my model`` -> ``my-model``)."""
    import re
    raw = Path(directory).resolve().name
    return check(re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-._")[:64] or "model")


def register(app: typer.Typer) -> None:
    app.command("init")(init_cmd)
    register_doctor(app)


def doctor_cmd(fleet: Optional[Path] = typer.Option(None, "--fleet", "-f", help="fleet file (default: the project's)"),
               target: List[str] = typer.Option([], "--target", "-t", help="check this board profile too (repeat)"),
               boards: bool = typer.Option(True, "--boards/--no-boards", help="ask each board for its Python, "
                                           "numpy and runtimes"),
               as_json: bool = JSON_OPT) -> None:
    """Check the host, the project's targets and keys, the fleet file, known_hosts and the boards."""
    from rich.table import Table

    from ..doctor import doctor
    from ._common import current_project, fleet_of, finish

    def go() -> None:
        proj = current_project()
        fl = fleet_of(fleet) if (fleet or proj) else None
        rep = doctor(project=proj, fleet=fl, targets=list(target) or None, ask_boards=boards)
        if as_json:
            dump(rep.to_json())
        else:
            t = Table(title=f"edgepack doctor: {len(rep.failures)} problem(s)")
            for c in ("area", "check", "", "detail", "what to do"):
                t.add_column(c, overflow="fold")
            mark = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
            for c in rep.checks:
                t.add_row(cell(c.area), cell(c.name), mark[c.status], cell(c.detail), cell(c.advice))
            err.print(t)
        finish(rep)

    run_guarded(go)


def register_doctor(app: typer.Typer) -> None:
    app.command("doctor")(doctor_cmd)
