"""Messages for humans: one line each, never wrapped, user text never read as markup.

Every command prints through this module. Progress, tables and messages go to stderr
so that stdout stays clean for ``--json``. A message is plain text with an optional
coloured prefix (``error:``, ``warning:``); paths and commands inside it are printed
exactly as given (``runs/sweep[v1]`` stays ``runs/sweep[v1]``) and on one line
whatever the terminal width, so that a user can copy them. Tables stay rich tables.
"""

from __future__ import annotations

import math
import threading
import time

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


def interactive(to: Console | None = None) -> bool:
    """Is the console a terminal (rich bars and spinners) rather than a log or pipe?"""
    return (to or console).is_terminal


class ProgressLines:
    """Progress for a log file: plain timestamped lines instead of a bar or spinner.

    :meth:`update` records the current state and prints it when it changed and at least
    ``every_s`` passed since the last line (``force`` prints at once). While the context
    is entered, a daemon thread repeats the latest state with its age whenever nothing
    was printed for ``every_s``: one trial or one validation pass can last minutes, and a
    silent log cannot be told from a hung job. A terminal gets rich's bars instead.
    """

    def __init__(self, every_s: float = 5.0, *, to: Console | None = None, clock=time.monotonic) -> None:
        self.every_s = every_s
        self.to = to
        self.clock = clock
        self.text = ""
        self._since = clock()
        self._shown = False
        self._last_line = -math.inf
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _print(self, text: str) -> None:
        say(f"{time.strftime('%H:%M:%S')} {text}", to=self.to)
        self._last_line = self.clock()
        self._shown = True

    def begin(self, text: str) -> None:
        """Record the state without a line: whatever ends within ``every_s`` (a user
        error found while probing) needs none, anything longer gets the heartbeat."""
        with self._lock:
            self.text, self._since, self._shown = text, self.clock(), True
            self._last_line = self._since

    def due(self) -> bool:
        """Would :meth:`update` print now? (Lets a caller skip computing a line.)"""
        return self.clock() - self._last_line >= self.every_s

    def update(self, text: str, force: bool = False) -> None:
        with self._lock:
            if text != self.text:
                self.text, self._since, self._shown = text, self.clock(), False
            if force or self.clock() - self._last_line >= self.every_s:
                self._print(text)

    def heartbeat(self) -> None:
        """Print the latest state when the log went quiet: as is when it was never
        printed, else with how long it has lasted."""
        with self._lock:
            now = self.clock()
            if self.text and now - self._last_line >= self.every_s:
                age = f" (for {now - self._since:.0f} s)" if self._shown else ""
                self._print(self.text + age)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s / 4):
            self.heartbeat()

    def __enter__(self) -> ProgressLines:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="progress-lines", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class _Spinner:
    """rich's status spinner with the interface of :class:`ProgressLines`."""

    def __init__(self, text: str, to: Console | None) -> None:
        self._status = (to or console).status(text)

    def update(self, text: str, force: bool = False) -> None:
        self._status.update(text)

    def __enter__(self) -> _Spinner:
        self._status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._status.__exit__(*exc)


def status(text: str, *, to: Console | None = None, every_s: float = 5.0):
    """A spinner on a terminal, timestamped lines elsewhere; ``update(text)`` either way."""
    if interactive(to):
        return _Spinner(text, to)
    lines = ProgressLines(every_s, to=to)
    lines.begin(text)
    return lines
