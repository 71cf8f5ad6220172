"""A run directory belongs to one run at a time: a lock while it writes, no silent overwrite.

``RUN/.lock`` holds the pid (and host) of the process writing the run and is locked with
``flock``: the kernel drops that lock when the process dies, however it dies, so a lock file left
by a dead process is stale and simply taken over. Starting a run in a directory that already
holds one (checkpoints or metrics) is refused unless the caller resumes it or asks to overwrite.

Example::

    check_run_dir(run_dir, resume=False, overwrite=False)   # fails early, creates nothing
    with RunLock(run_dir):                                   # held while the run writes
        ...
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
from pathlib import Path
from types import TracebackType

from data2vec.errors import Data2VecError

try:
    import fcntl
except ImportError:  # Windows: fall back to the pid check alone
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("data2vec")

LOCK_FILE = ".lock"
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "config.yaml", "train.log",
               "curves.png")
"""What a pre-training run writes into its directory (removed by --overwrite)."""


class RunDirError(Data2VecError):
    """The run directory is in use, or already holds a run that would be overwritten."""


def _read_holder(path: Path) -> tuple[int | None, str]:
    """(pid, host) written in a lock file; (None, "") when unreadable."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").split()
        return int(lines[0]), lines[1] if len(lines) > 1 else ""
    except (OSError, ValueError, IndexError):
        return None, ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _busy(run_dir: Path, pid: int | None, host: str) -> RunDirError:
    who = f"process {pid}" if pid else "another process"
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return RunDirError(f"{run_dir} is in use by {who}{where} (lock {run_dir / LOCK_FILE}); wait "
                       "for that run to end or stop it, or choose another --out")


def lock_holder(run_dir: Path) -> int | None:
    """The pid holding `run_dir`'s lock, or None when nobody holds it (creates nothing)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        pid, _ = _read_holder(path)
        if fcntl is None:
            return pid if pid and pid != os.getpid() and _pid_alive(pid) else None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return pid or -1
        except OSError:  # no flock on this file system: trust a live pid
            return pid if pid and pid != os.getpid() and _pid_alive(pid) else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """Exclusive lock on a run directory (created if needed); see the module docstring."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunDirError` naming the process that holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not self._lock(fd):
                pid, host = _read_holder(self.path)
                os.close(fd)
                raise _busy(self.run_dir, pid, host)
            try:  # a releasing holder may have unlinked the file we opened: then retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            stale, _ = _read_holder(self.path)
            if stale is not None and stale != os.getpid():
                log.info("took over the stale lock of process %d (no longer running) in %s",
                         stale, self.run_dir)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise RunDirError(f"could not lock {self.path}: it keeps changing under us")

    def _lock(self, fd: int) -> bool:
        """True when this process now holds the lock on `fd`."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as e:  # no flock here (some network file systems): pid check below
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        pid, _ = _read_holder(self.path)
        return pid is None or pid == os.getpid() or not _pid_alive(pid)

    def release(self) -> None:
        """Drop the lock and remove the lock file."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


def existing_run(run_dir: Path) -> str | None:
    """What in `run_dir` shows a run already lives there ("checkpoint step-0000100", ...)."""
    from data2vec.train.checkpoint import WEIGHTS, list_checkpoints

    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir / "checkpoints")
    if found:
        return f"checkpoint {found[-1].name}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return "metrics.jsonl"
    if (run_dir / WEIGHTS).is_file():
        return f"a checkpoint ({WEIGHTS})"
    return None


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Fail early, creating nothing, when `run_dir` is locked or would be overwritten."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pick one")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir}: exists and is not a directory")
    holder = lock_holder(run_dir)
    if holder is not None:
        raise _busy(run_dir, holder if holder > 0 else None, "")
    found = existing_run(run_dir) if run_dir.is_dir() else None
    if found and not resume and not overwrite:
        raise RunDirError(f"{run_dir} already holds a run ({found}); pass --resume to continue "
                          "it, --overwrite to replace it, or choose another --out")


def clear_run(run_dir: Path) -> None:
    """Remove what an earlier run wrote into `run_dir` (``--overwrite``; hold the lock)."""
    from data2vec.train.checkpoint import STATE, WEIGHTS

    for name in (*RUN_OUTPUTS, WEIGHTS, STATE):
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


__all__ = ["LOCK_FILE", "RunDirError", "RunLock", "check_run_dir", "clear_run", "existing_run",
           "lock_holder"]
