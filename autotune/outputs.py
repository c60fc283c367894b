"""Checks of output paths and optional dependencies, made before any measurement or
training starts: a run must not spend an hour and then fail on a path it could have
refused at once. Importing this module does not import torch."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from autotune.errors import UserError


def os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _probe_folder(folder: Path, what: str) -> None:
    """Create ``folder`` (and its parents) and write, then remove, a file in it."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write {what}: '{existing}' is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"cannot write {what} into '{folder}': {os_reason(exc)}") from None


def check_output_file(path: str | Path, what: str) -> Path:
    """``path`` can be written as a file: it is not a folder and its folder is writable.
    Creates the missing parent folders (the run would create them anyway)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder; give a file name")
    _probe_folder(path.parent, f"{what} '{path.name}'")
    return path


def check_output_folder(path: str | Path, what: str) -> Path:
    """``path`` is, or can be created as, a writable folder."""
    path = Path(path)
    _probe_folder(path, what)
    return path


def require_module(module: str, needed_for: str, extra: str) -> None:
    """One line naming the missing optional dependency and how to install it."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{needed_for} needs {module}: pip install 'arwgan-autotune[{extra}]'")


def atomic_write_bytes(path: str | Path, write) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; a plain open() would give 0666 less the umask,
        # which is what teammates and web servers reading the outputs expect.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
