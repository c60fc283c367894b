"""Run folders: which checkpoint ``--resume`` means, and whether ``--out`` may be used.

A run folder holds one run: ``log.csv`` (one header, one row per epoch), ``last.pt``,
the per-epoch sample grids and, with ``--tensorboard``, its event files. A second run
written into it would append rows under another run's header and replace its
checkpoint, so a non-empty ``--out`` is refused unless the run continues it
(``--resume``) or the user asks to start it over (``--overwrite``). Importing this
module does not import torch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from arwgan.errors import UserError

CHECKPOINT_NAME = "last.pt"
LOG_NAME = "log.csv"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"
#: What a training run writes into its folder; ``--overwrite`` removes only these.
RUN_FILES = (CHECKPOINT_NAME, LOG_NAME, SAMPLES_DIR, TENSORBOARD_DIR)

RUNS_ROOT = Path("runs")
#: What a bare ``--resume`` stands for (not a path a user would type).
LATEST = "@latest"


def latest_checkpoint(root: str | Path = RUNS_ROOT) -> Path:
    """The most recently written ``last.pt`` in a run folder under ``root``."""
    root = Path(root)
    found = [p for p in root.glob(f"*/{CHECKPOINT_NAME}") if p.is_file()]
    if not found:
        raise UserError(f"--resume alone continues the latest run, but no '{root}/*/{CHECKPOINT_NAME}' exists")
    return max(found, key=lambda p: p.stat().st_mtime)


def resolve_resume(value: str | Path, root: str | Path = RUNS_ROOT) -> Path:
    """The checkpoint ``--resume VALUE`` means: a checkpoint file, a run folder (its
    ``last.pt``) or, for a bare ``--resume``, the latest run under ``root``."""
    if str(value) == LATEST:
        return latest_checkpoint(root)
    path = Path(value)
    if path.is_dir():
        checkpoint = path / CHECKPOINT_NAME
        if not checkpoint.is_file():
            raise UserError(f"run folder '{path}' holds no {CHECKPOINT_NAME}")
        return checkpoint
    if not path.exists():
        raise UserError(f"checkpoint '{path}' does not exist")
    if _looks_like_json(path):
        raise UserError(
            f"'{path}' is a JSON file, not a checkpoint (a tuned file? use --from-tuned)"
        )
    return path


def _looks_like_json(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(64).lstrip()
    except OSError:
        return False
    return head[:1] in (b"{", b"[")


def prepare_run_folder(out: str | Path, resume: Path | None, overwrite: bool) -> Path:
    """Check that ``out`` may receive this run, before anything is measured or trained.

    Refused: a file; a folder with anything in it, unless this run continues the
    checkpoint that lives there (``resume``) or ``overwrite`` is set, which removes
    the files of the earlier run (:data:`RUN_FILES`, nothing else).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder '{out}' is a file")
    continues = resume is not None and out.resolve() == resume.parent.resolve()
    if out.is_dir() and any(out.iterdir()) and not continues:
        if not overwrite:
            raise UserError(
                f"output folder '{out}' is not empty; continue its run with --resume '{out}', "
                "start it over with --overwrite, or choose another --out"
            )
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return out
