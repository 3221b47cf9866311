"""The `edgepack` command: a thin shell over the library API.

Each command parses its arguments, calls one library function, and renders the returned
report (rich table on stderr/stdout, or JSON with --json). Every EdgepackError becomes one line
on stderr and a non-zero exit code.
"""
from __future__ import annotations

import sys
from typing import Callable

import typer
from rich.console import Console

from .errors import EdgepackError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Quantize models for edge boards, package signed OTA bundles, deploy to a fleet.")
err = Console(stderr=True)


def fail(exc: BaseException) -> None:
    """Print one line naming the problem and exit with the error's code."""
    from rich.text import Text

    from device_agent._internal.encoding import safe_text
    code = getattr(exc, "exit_code", 1)
    # the message may quote a bundle or a board (key ids, versions, paths): data, never markup or ANSI
    err.print(Text.assemble(("error:", "bold red"), " ", safe_text(exc, limit=2000)), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_guarded(fn: Callable[[], None]) -> None:
    try:
        fn()
    except EdgepackError as e:
        fail(e)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        raise typer.Exit(130)


# Command groups live in their own modules; each exposes register(app).
from . import cli_quantize  # noqa: E402
from . import cli_ota  # noqa: E402
from . import cli_agent  # noqa: E402
from . import cli_fleet  # noqa: E402
from . import cli_pull  # noqa: E402
from . import cli_tflite  # noqa: E402

cli_quantize.register(app)
cli_quantize.register_analyze(app)
cli_quantize.register_qat(app)
cli_ota.register(app)
cli_agent.register(app)
cli_fleet.register(app)
cli_pull.register(app)
cli_tflite.register(app)


def main() -> None:
    app(prog_name="edgepack")


if __name__ == "__main__":
    sys.exit(main())
