"""User-facing error types: each message says what is wrong and how to fix it."""


class GenctlError(Exception):
    """Base class of errors caused by user input (config, data, checkpoints, launch)."""


class ConfigError(GenctlError, ValueError):
    """A config field holds a value that cannot work; the message names field, value and fix."""


class DataError(GenctlError, ValueError):
    """A dataset, file or example cannot be read as asked."""


class CheckpointError(GenctlError, RuntimeError):
    """A checkpoint or work directory cannot be used as asked."""


class TrainingError(GenctlError, RuntimeError):
    """Training cannot go on (for example, too many non-finite updates in a row)."""
