"""Assertions shared by the CLI tests."""

from __future__ import annotations


def assert_one_error_line(text: str, fragment: str) -> None:
    """A user's mistake is exactly one line 'error: ...' naming ``fragment``, no traceback."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("error: "), text
    assert fragment in lines[0], text
    assert "Traceback" not in text
