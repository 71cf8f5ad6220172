"""Shared benchmark helpers: machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """CPU model, the bf16-relevant instruction sets, cores and library versions."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
        flags = re.search(r"flags\s*:\s*(.*)", cpuinfo)
        info["cpu"] = model.group(1).strip() if model else platform.processor()
        have = set(flags.group(1).split()) if flags else set()
        info["cpu_features"] = sorted(have & {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f",
                                              "avx2"})
    except OSError:
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["loadavg_at_write"] = list(os.getloadavg())  # other jobs on the cores slow every figure
    return info


def write_result(name: str, payload: dict[str, Any], directory: Path = RESULTS) -> Path:
    """<directory>/<name>.json (default benchmarks/results/) with the command line and the
    machine."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    record = {"command": "python " + " ".join(sys.argv), "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain fixed-width table."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)
