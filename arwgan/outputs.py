"""Output-path and optional-dependency checks: the engine's (:mod:`autotune.outputs`)."""

from autotune.outputs import (  # noqa: F401
    atomic_write_bytes, check_output_file, check_output_folder, os_reason, require_module,
)
