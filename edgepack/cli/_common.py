"""What every command group shares: the consoles, one-line errors, JSON output, the common options.

Nothing here imports a command module, and no command module imports another: ``edgepack.cli``
(the package) wires the groups together, so the CLI has no import cycle and the library never
imports the CLI.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from device_agent.wire.encoding import safe_text
from device_agent.errors import OtaError

from ..errors import EdgepackError

err = Console(stderr=True)   # tables, progress and messages: stdout stays for --json
out = Console()              # the commands whose table *is* the result (quantize, targets, keys, bundle)
errors = Console(stderr=True)  # the one-line errors: printed under --quiet too

JSON_OPT = typer.Option(False, "--json", help="print the result as JSON on stdout (an error as a JSON object)")


def cell(v: Any, style: str = "") -> Text:
    """A value from a bundle, a board or a user (model, version, paths, error text) as plain text:
    never Rich markup (``[[boards]]`` stays), control characters escaped."""
    return Text("–" if v is None else safe_text(v, limit=2000), style=style)


class Notes:
    """Advice that does not fit a table cell: the cell says ``see (n)`` and the whole text is printed
    under the table on its own lines, so the fix a note gives is never cut off or split by borders."""

    SHORT = 28

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def cell(self, who: str, text: Any) -> Text:
        t = "" if text is None else str(text)
        if len(t) <= self.SHORT:
            return cell(t)
        self.items.append((who, t))
        return cell(f"see ({len(self.items)})")

    def print(self, console: Any) -> None:
        for i, (who, t) in enumerate(self.items, 1):
            console.print(Text.assemble((f"({i}) ", "bold"), cell(f"{who}: ").plain, cell(t)), soft_wrap=True)


def fmt(v: Any, nd: int = 3) -> str:
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _plain(o: Any) -> Any:
    """JSON for what json does not know: numpy scalars and arrays as numbers, the rest as text."""
    if hasattr(o, "item") and hasattr(o, "dtype"):
        return o.item() if getattr(o, "ndim", 0) == 0 else o.tolist()
    return str(o)


def dump(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_plain) + "\n")


def _json_mode() -> bool:
    """Whether the running command was given --json (read from the command's own context)."""
    try:
        from typer._click.globals import get_current_context  # Typer vendors its own copy of click
    except ImportError:  # pragma: no cover - older Typer uses click itself
        from click import get_current_context
    ctx = get_current_context(silent=True)
    return bool(ctx is not None and ctx.params.get("as_json"))


def error_object(exc: BaseException, code: int) -> dict[str, Any]:
    """The JSON a failed command prints on stdout under --json (the agent's shape)."""
    return {"ok": False, "error": {"type": type(exc).__name__, "message": safe_text(exc, limit=2000),
                                   "exit_code": code}}


def fail(exc: BaseException) -> None:
    """One line on stderr naming the problem (and, under --json, the error object on stdout), then
    exit with the error's own code."""
    code = getattr(exc, "exit_code", 1)
    if _json_mode():
        dump(error_object(exc, code))
    # the message may quote a bundle or a board (key ids, versions, paths): data, never markup or ANSI
    errors.print(Text.assemble(("error:", "bold red"), " ", safe_text(exc, limit=2000)), highlight=False,
                 soft_wrap=True)
    cause = exc.__cause__ or exc.__context__
    if VERBOSE and cause is not None:  # --verbose: what the library caught on the way
        errors.print(Text.assemble(("cause:", "dim"), " ", f"{type(cause).__name__}: ", safe_text(cause, limit=2000)),
                  soft_wrap=True)
    raise typer.Exit(code)


def run_guarded(fn: Callable[[], Any]) -> None:
    """Run a command body: every named error (host or board side) becomes one line and its exit code."""
    try:
        fn()
    except (EdgepackError, OtaError) as e:
        fail(e)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        raise typer.Exit(INTERRUPTED)


def finish(report: Any) -> None:
    """Exit with the code the report carries (0: nothing)."""
    code = getattr(report, "exit_code", 0)
    if code:
        raise typer.Exit(code)


class RichProgress:
    """Adapter from the library's Progress protocol to rich bars (on stderr)."""

    def __init__(self, enabled: bool = True):
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled,
                          transient=True)
        self.task: Optional[Any] = None

    def __enter__(self) -> "RichProgress":
        self.p.__enter__()
        return self

    def __exit__(self, *a: Any) -> None:
        self.p.__exit__(*a)

    def start(self, description: str, total: int) -> None:
        self.task = self.p.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.p.advance(self.task, n)

    def update(self, completed: int, total: int) -> None:
        if self.task is not None:
            self.p.update(self.task, total=total, completed=completed)

    def done(self) -> None:
        if self.task is not None:
            self.p.remove_task(self.task)
            self.task = None


__all__ = ["err", "out", "JSON_OPT", "Notes", "cell", "fmt", "dump", "error_object", "fail", "run_guarded", "finish",
           "RichProgress"]

VERBOSE = False  # --verbose: an error also shows its cause
INTERRUPTED = 130  # the shell's code for Ctrl-C (128 + SIGINT)

_PROJECT: list = []


def current_project() -> Any:
    """The project file in effect (``edgepack.toml`` here or above, or ``EDGEPACK_PROJECT``), or None."""
    if not _PROJECT:
        from ..project import find_project
        _PROJECT.append(find_project())
    return _PROJECT[0]


def fleet_of(path: Any) -> Any:
    """--fleet FILE, else the project's fleet, else the embedded default board under ./.edgepack."""
    from ..fleet import Fleet, load_fleet
    if path:
        return load_fleet(path)
    proj = current_project()
    return proj.fleet() if proj else Fleet.default()


def output_path(given: Any, default_name: str) -> Any:
    """One rule for outputs: -o wins; else the project's out folder (or the current one) and
    ``default_name``; the parent folder is created, before any work, when it is missing."""
    from pathlib import Path

    from ..errors import UsageError
    proj = current_project()
    p = Path(given) if given else (proj.out_dir if proj else Path(".")) / default_name
    if p.exists() and p.is_dir():
        raise UsageError(f"output {p} is a folder; give a file name, e.g. -o {p / default_name}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output folder {p.parent}: {e.strerror}; choose another -o") from None
    return p


# Model formats other than ONNX, by the command module that handles them (cli/tflite.py registers
# ``tflite``): ``quantize --format NAME`` and ``analyze MODEL.SUFFIX`` dispatch here, so the
# quantize commands name no other command module.
QUANTIZE_FORMATS: dict[str, Callable[..., Any]] = {}
ANALYZE_SUFFIXES: dict[str, Callable[..., Any]] = {}
