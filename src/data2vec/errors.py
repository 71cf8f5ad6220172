"""Project exceptions: every message names the file, key or shape at fault and what was expected."""


class Data2VecError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(Data2VecError):
    """A config key that does not exist, a value of the wrong type, or an illegal combination."""


class DataError(Data2VecError):
    """Unreadable, empty or inconsistent input data (the message names the file).

    ``reason`` is the short word ``--skip-bad`` counts the file under ("unreadable", "empty",
    "not_utf8", "missing", "size_mismatch", ...); "bad" when no finer reason applies.
    """

    def __init__(self, message: str, reason: str = "bad") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep the reason when a DataLoader worker sends the error back
        return type(self), (str(self), self.reason)


class CheckpointError(Data2VecError):
    """A missing, truncated or incompatible checkpoint."""
