"""Process-level settings every command shares: torch threads and rank-0 output.

Threads: torch's default (one per core) collapses when another process shares the cores: its
OpenMP threads spin-wait for each other while the other process holds a core (a tiny speech run
went 2.19 it/s with 1 thread vs 0.87 with 2 beside a busy process). ``threads=0`` (the default of
``run.threads`` and the fine-tuning ``threads``) therefore takes :func:`default_threads`: the
cores this process may use minus the load already running on them, at least 1
(``benchmarks/threads.py`` measures the policy against fixed counts).
"""

from __future__ import annotations

import os
import sys


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """Threads for a run that did not ask: usable cores minus the 1-minute load average
    (rounded), at least 1 and at most the cores."""
    cores = usable_cores()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows): trust the core count
        busy = 0.0
    return max(1, min(cores, cores - round(busy)))


def set_threads(threads: int = 0) -> int:
    """Set torch's intra-op threads: `threads` when > 0, else :func:`default_threads`.
    Returns the count set."""
    import torch

    count = threads if threads > 0 else default_threads()
    torch.set_num_threads(count)
    return count


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give `path` (and, for a directory, everything under it) the modes a plain ``open`` /
    ``mkdir`` would have: some writers (safetensors, ``tempfile.mkdtemp``) create 0600 / 0700."""
    from pathlib import Path

    mask = current_umask()
    root = Path(path)
    for item in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if item.is_symlink():
            continue
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def is_main_process() -> bool:
    """False on every torchrun rank but 0 (RANK set by torchrun), so only one prints."""
    return os.environ.get("RANK", "0") == "0"


def say(*parts: object) -> None:
    """print() on the main process only (summaries, file lists): one copy under torchrun."""
    if is_main_process():
        print(*parts, file=sys.stdout, flush=True)


__all__ = ["current_umask", "default_threads", "honour_umask", "is_main_process", "say",
           "set_threads", "usable_cores"]
