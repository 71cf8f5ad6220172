"""Project exceptions: every message names the file, key or shape at fault and what was expected."""


class Data2VecError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(Data2VecError):
    """A config key that does not exist, a value of the wrong type, or an illegal combination."""


class DataError(Data2VecError):
    """Unreadable, empty or inconsistent input data (the message names the file)."""


class CheckpointError(Data2VecError):
    """A missing, truncated or incompatible checkpoint."""
