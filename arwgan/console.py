"""The engine's console and command conventions, as ARWGAN's CLIs use them."""

from autotune.commands import (  # noqa: F401
    CONTEXT_SETTINGS, EXIT_INTERRUPTED, EXIT_USAGE, VersionFlag, entry_point,
    expand_optional_value, fail, run_typer, typer_app, version_text,
)
from autotune.console import console, error, note, say, warn  # noqa: F401

__all__ = [
    "CONTEXT_SETTINGS", "VersionFlag", "console", "error", "note", "say", "warn", "fail",
    "run_typer", "entry_point",
]
