"""Messages for humans: one line each, never wrapped, user text never read as markup.

Every command prints through this module. Progress, tables and messages go to stderr
so that stdout stays clean for ``--json``. A message is plain text with an optional
coloured prefix (``error:``, ``warning:``); paths and commands inside it are printed
exactly as given (``runs/sweep[v1]`` stays ``runs/sweep[v1]``) and on one line
whatever the terminal width, so that a user can copy them. Tables stay rich tables.
"""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions
from rich.text import Text

#: Off a terminal (a pipe, a log file, a test), lines are laid out at least this wide:
#: a file has no width, and wrapping tables at the 80 columns rich assumes only breaks
#: words apart for whoever greps the log.
OFF_TERMINAL_WIDTH = 200


class HumanConsole(Console):
    """A rich Console that lays tables out at :data:`OFF_TERMINAL_WIDTH` or wider when
    its output is not a terminal; on a terminal, tables follow the terminal's width."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if not self.is_terminal:
            return ConsoleDimensions(max(size.width, OFF_TERMINAL_WIDTH), size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        width, height = new_size
        self._width, self._height = width, height


#: The one console for humans (stderr).
console = HumanConsole(stderr=True, highlight=False)


def message_text(message: str, prefix: str = "", style: str = "") -> Text:
    """``prefix message`` as a rich Text: the prefix styled, the message literal."""
    text = Text()
    if prefix:
        text.append(prefix, style=style or None)
        text.append(" ")
    text.append(str(message))
    return text


def say(message: str, prefix: str = "", style: str = "", *, to: Console | None = None) -> None:
    """Print one message line (``to``: another console, e.g. a trainer's)."""
    (to or console).print(message_text(message, prefix, style), soft_wrap=True, markup=False, highlight=False)


def warn(message: str, *, to: Console | None = None) -> None:
    say(message, "warning:", "yellow", to=to)


def note(message: str, *, to: Console | None = None) -> None:
    say(message, "note:", "cyan", to=to)


def error(message: str, *, to: Console | None = None) -> None:
    say(message, "error:", "bold red", to=to)
