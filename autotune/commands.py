"""The command-line conventions of every CLI (the engine's and ARWGAN's): one-line usage
errors, ``-h``, ``--version``, exit codes, on the one console of :mod:`autotune.console`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated

import typer

from autotune.console import console, error, note, say, warn

__all__ = [
    "CONTEXT_SETTINGS", "VersionFlag", "console", "error", "note", "say", "warn", "fail",
    "run_typer", "entry_point",
]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Every command: ``-h`` as well as ``--help``.
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"arwgan-autotune {version('arwgan-autotune')}"
    except PackageNotFoundError:
        return "arwgan-autotune (not installed: version unknown)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


#: ``--version``: print the package version on stdout and exit, before anything else.
VersionFlag = Annotated[
    bool,
    typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
]


def typer_app(**settings) -> typer.Typer:
    """A typer app with this project's conventions: plain help (never truncated at a
    narrow terminal, no markup read from the text), no completion commands, our own
    one-line errors instead of typer's pretty tracebacks, ``-h`` as well as ``--help``."""
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                       context_settings=CONTEXT_SETTINGS, **settings)


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``error: message`` as one line on stderr; return the Exit to raise."""
    error(message)
    return typer.Exit(code)


def run_typer(app: typer.Typer, argv: Sequence[str] | None = None) -> int:
    """Run a typer app so that a usage error is ONE line (click prints a usage block).

    typer vendors click in recent releases and uses the real one in older ones, so the
    exceptions are recognised by what they carry (``exit_code``, ``format_message``)
    rather than by class.
    """
    command = typer.main.get_command(app)
    try:
        # Without standalone mode, click returns typer.Exit's code instead of exiting.
        code = command.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except Exception as exc:
        kind = type(exc).__name__
        if kind == "Exit":
            return int(getattr(exc, "exit_code", 0))
        if kind == "Abort":
            say("aborted")
            return EXIT_INTERRUPTED
        if kind == "NoArgsIsHelpError":
            ctx = getattr(exc, "ctx", None)
            # typer's get_help() prints the help itself (and returns ''); click's returns it.
            text = ctx.get_help() if ctx is not None else ""
            if text:
                console.print(text, markup=False, highlight=False)
            return EXIT_USAGE
        if hasattr(exc, "format_message") and getattr(exc, "exit_code", None) == EXIT_USAGE:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            error(f"{exc.format_message()}{hint}")
            return EXIT_USAGE
        raise
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else 0


def expand_optional_value(argv: Sequence[str], option: str, default: str) -> list[str]:
    """Let ``option`` be given without its value (``--from-tuned`` alone means
    ``--from-tuned DEFAULT``): typer has no optional-value options."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == option and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, default)
            break
    return out


def entry_point(
    app: typer.Typer, optional_values: dict[str, str] | None = None
) -> Callable[[], None]:
    def run() -> None:
        argv = sys.argv[1:]
        for option, default in (optional_values or {}).items():
            argv = expand_optional_value(argv, option, default)
        sys.exit(run_typer(app, argv))

    def main() -> None:
        """Under torchrun (which sets these variables), ``record`` puts an uncaught
        exception's traceback into the file the launcher reads, so its failure summary
        names the rank and the cause. Elsewhere it is not imported: it imports torch,
        and ``--help`` or a bad flag must answer at once."""
        if {"TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE"} & set(os.environ):
            from torch.distributed.elastic.multiprocessing.errors import record

            record(run)()
        else:
            run()

    return main
