"""The `edgepack` command: a thin shell over the library API.

Each command parses its arguments, calls one library function, and renders the returned report
(a table on stderr/stdout, or JSON with --json). Every named error becomes one line on stderr (and
a JSON error object on stdout under --json) and the exit code the error or the report carries.

The package is a set of command groups, each a module with ``register(app)``; they share only
``_common`` and never import each other; this module wires them together.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Optional

import typer

from ._common import err, fail, out, run_guarded  # noqa: F401  (the public face of the old edgepack.cli)

app = typer.Typer(add_completion=True, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Quantize models for edge boards, package signed OTA bundles, deploy to a fleet.")


def _version(value: bool) -> None:
    if value:
        import device_agent

        from .. import __version__
        print(f"edgepack {__version__} (agent {device_agent.__version__}, Python {sys.version.split()[0]})")
        raise typer.Exit(0)


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", "-V", callback=_version, is_eager=True,
                                                 help="print edgepack's version and exit"),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="print only errors and the result (tables, "
                                     "progress and notes are left out; --json output is unchanged)"),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="also log what the library does (INFO) "
                                       "and show the cause of an error")) -> None:
    """Quantize models for edge boards, package signed OTA bundles, deploy to a fleet."""
    err.quiet = quiet
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        _common.VERBOSE = True


from . import _common, agent, fleet, llm, ota, project, pull, quantize, tflite  # noqa: E402

quantize.register(app)
ota.register(app)
agent.register(app)
fleet.register(app)
pull.register(app, fleet.fleet_app)
project.register(app)
llm.register(app)
tflite.register(app)

_TYPE_LABEL = {"int": "INTEGER", "float": "NUMBER", "str": "TEXT", "Path": "PATH", "bool": "BOOL"}


def _polish(cmd: Any) -> Any:
    """Help that reads like other tools': a flag shows no value type (Typer would print ``<bool>``),
    a value shows an upper-case name (``PATH``, not ``<list[Path]>``), and a repeatable option says so."""
    for p in getattr(cmd, "params", []):
        if hasattr(p, "is_flag"):  # an option (Typer vendors click: no isinstance on click's classes)
            if p.is_flag or p.count:
                p.metavar = ""
            elif p.metavar is None:
                raw = p.display_type(None) if hasattr(p, "display_type") else p.type.name
                inner = raw.strip("<>").removeprefix("list[").rstrip("]")
                p.metavar = _TYPE_LABEL.get(inner, inner.upper())
                if p.multiple and p.help and "repeat" not in p.help:
                    p.help += " (repeat the option for more)"
        elif p.metavar is None and p.name:  # an argument: RELEASE, not {release}; its type PATH, not <list[Path]>
            raw = p.display_type(None) if hasattr(p, "display_type") else ""
            inner = raw.strip("<>").removeprefix("list[").rstrip("]")
            label = _TYPE_LABEL.get(inner, inner.upper())
            p.metavar = p.name.upper()
            p.display_type_rich = lambda ctx, label=label: label
    _flag_help(cmd)
    for sub in getattr(cmd, "commands", {}).values():
        _polish(sub)
    return cmd


def _flag_help(cmd: Any) -> None:
    """-h/--help is made per call by click; it is a flag too."""
    make = cmd.get_help_option

    def get_help_option(ctx: Any) -> Any:
        opt = make(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt

    cmd.get_help_option = get_help_option


def command() -> Any:
    """The click command tree of ``edgepack`` (what ``main`` runs)."""
    return _polish(typer.main.get_command(app))


def main(argv: Optional[list[str]] = None) -> Any:
    """The console script: the project file's values (edgepack.toml) are every command's defaults."""
    try:
        dm = project.defaults(_common.current_project())
    except Exception as e:  # a broken project file is one line, like any other bad input
        from ..errors import EdgepackError
        if not isinstance(e, EdgepackError):
            raise
        from rich.text import Text
        err.print(Text.assemble(("error:", "bold red"), " ", _common.cell(e)), soft_wrap=True)
        return sys.exit(getattr(e, "exit_code", 2))
    args = list(sys.argv[1:] if argv is None else argv)
    if "--json" not in args:
        return command()(args=args, prog_name="edgepack", default_map=dm)
    # --json: a usage error (unknown option, missing argument) is a JSON error object on stdout too
    try:
        code = command()(args=args, prog_name="edgepack", default_map=dm, standalone_mode=False)
    except Exception as e:
        exit_code = getattr(e, "exit_code", None)
        if not isinstance(exit_code, int) or not hasattr(e, "format_message"):
            raise
        _common.dump({"ok": False, "error": {"type": "UsageError", "message": e.format_message(),
                                             "exit_code": exit_code}})
        e.show()
        sys.exit(exit_code)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main", "command", "fail", "run_guarded", "err"]

if __name__ == "__main__":
    sys.exit(main())
