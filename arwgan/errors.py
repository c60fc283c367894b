"""Exceptions that mean "the user asked for something impossible".

Library code raises these instead of exiting; the CLIs turn them into a one-line
message on stderr and exit code 2. Anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A bad value, path or file supplied by the user. The message is shown as is."""


class ConfigError(UserError):
    """A configuration value is out of range or inconsistent."""


class DataError(UserError):
    """The data folder is missing, empty, or holds no readable image."""


class CheckpointError(UserError):
    """A checkpoint or tuned file is missing, corrupt, or belongs to another configuration."""


class TrainingDiverged(RuntimeError):
    """Losses stayed non-finite for too many consecutive steps; a checkpoint was saved."""
