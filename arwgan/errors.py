"""Exceptions that mean "the user asked for something impossible".

The generic ones are the engine's (:mod:`autotune.errors`), so that one ``except
UserError`` covers both packages; ARWGAN adds its data and divergence errors.
"""

from autotune.errors import CheckpointError, ConfigError, GpuNotUsable, UserError

__all__ = ["CheckpointError", "ConfigError", "DataError", "GpuNotUsable", "TrainingDiverged", "UserError"]


class DataError(UserError):
    """The data folder is missing, empty, or holds no readable image."""


class TrainingDiverged(RuntimeError):
    """Losses stayed non-finite for too many consecutive steps; a checkpoint was saved."""
