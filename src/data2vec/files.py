"""Reading user files as text: every failure is one error naming the file, never a traceback."""

from __future__ import annotations

from pathlib import Path

from data2vec.errors import Data2VecError, DataError


def read_text(path: str | Path, error: type[Data2VecError] = DataError,
              what: str = "file") -> str:
    """The UTF-8 text of `path`; missing, unreadable or undecodable -> `error` naming it.

    `what` says what the file is for ("manifest", "config file", ...), for the message.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _error(error, f"{what} not found: {path}", "missing") from None
    except IsADirectoryError:
        raise _error(error, f"{path}: expected a {what}, found a directory", "unreadable"
                     ) from None
    except OSError as e:
        raise _error(error, f"{path}: cannot read {what} ({e.strerror or e})", "unreadable"
                     ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _error(error, f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected "
                     f"a UTF-8 {what}", "not_utf8") from None


def _error(error: type[Data2VecError], message: str, reason: str) -> Data2VecError:
    return error(message, reason) if issubclass(error, DataError) else error(message)


__all__ = ["read_text"]
