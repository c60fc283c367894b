"""Exceptions that mean "the user asked for something impossible".

Library code raises these instead of exiting; the CLIs turn them into a one-line
message on stderr and exit code 2. Anything else is a bug and keeps its traceback.
A workload's own errors should subclass :class:`UserError` to get the same treatment.
"""


class UserError(ValueError):
    """A bad value, path or file supplied by the user. The message is shown as is."""


class ConfigError(UserError):
    """A configuration value is out of range or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint or tuned file is missing, corrupt, or belongs to another configuration."""


class GpuNotUsable(UserError):
    """NVML sees a GPU that this torch cannot use (a wheel built for a newer CUDA than
    the driver's, or a CPU-only wheel). Not a typo to correct: the CLIs exit 1."""

    exit_code = 1
