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


# glibc mallopt() parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
MALLOC_TRIM_THRESHOLD = 1 << 30
"""Free memory kept by the process before it is returned to the system (1 GiB)."""


def tune_malloc(enable: bool = True) -> bool:
    """glibc only: serve every allocation from the heap and keep freed memory for reuse.

    By default glibc hands each allocation above its mmap threshold (128 KiB, rising to at most
    32 MiB) to ``mmap`` and gives it back with ``munmap`` when freed, so every large activation
    of every step (GELU outputs, attention scores, target layers) is page-faulted in afresh and
    zeroed by the kernel. ``M_MMAP_MAX=0`` keeps them on the heap and a 1 GiB trim threshold
    stops the heap from being shrunk after each step: the same as starting the process with
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824``, but settable from Python at any
    time (``mallopt``). ``enable=False`` restores glibc's defaults. Returns False where there is
    no glibc (macOS, musl, Windows): nothing changed. ``benchmarks/speed.py`` measures the effect.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if enable:
        ok = mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    else:  # glibc's defaults: 65536 mmapped chunks at most, 128 KiB trim threshold
        ok = mallopt(M_MMAP_MAX, 65536) and mallopt(M_TRIM_THRESHOLD, 128 * 1024)
    return bool(ok)


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
           "set_threads", "tune_malloc", "usable_cores"]
