"""Run logging: metrics.jsonl, TensorBoard events, a progress bar and the collapse alarm."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger("data2vec")


def setup_console_logging(run_dir: Path | None, is_main: bool) -> None:
    """INFO to stderr (main process only) and to RUN/train.log."""
    root = logging.getLogger("data2vec")
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(fmt)
        root.addHandler(file)
    root.propagate = False


class MetricsWriter:
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float], group: str = "train") -> None:
        """Record `metrics` for optimizer update `step`; keys of another group than 'train'
        (fine-tuning's 'valid') are written as ``group/key`` in both files."""
        clean = {k if group == "train" else f"{group}/{k}":
                 (float(v) if math.isfinite(float(v)) else str(float(v)))
                 for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(f"{group}/{key}", float(value), step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> int | None:
    """The step of one metrics line; None for a line cut short by a killed process."""
    try:
        record = json.loads(line)
        return int(record["step"])
    except (ValueError, KeyError, TypeError):
        return None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines after `last_step` (a resumed run rewrites them) and any line a killed run
    left half-written; the file is replaced atomically."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = [line for line in lines if (step := _step_of(line)) is not None and step <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def collapse_alarm(target_std: float, pred_std: float, min_target: float,
                   min_pred: float) -> str | None:
    """A message when the representation looks collapsed, else None."""
    problems = []
    if target_std < min_target:
        problems.append(f"target std {target_std:.4f} < {min_target}")
    if pred_std < min_pred:
        problems.append(f"prediction std {pred_std:.4f} < {min_pred}")
    return "; ".join(problems) or None


class ModalityMeans:
    """Joint runs: each modality's step metrics, averaged over its updates between two log
    lines, as ``<modality>/<metric>`` (e.g. ``image/loss``) plus ``<modality>/updates``."""

    def __init__(self) -> None:
        self._sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, modality: str | None, metrics: dict[str, float]) -> None:
        """Record one update of `modality` (None: a single-modality run, nothing recorded)."""
        if modality is None:
            return
        self._counts[modality] += 1
        for key, value in metrics.items():
            self._sums[modality][key] += float(value)

    def flush(self) -> dict[str, float]:
        """The means since the last flush, then start over."""
        out = {}
        for modality, count in sorted(self._counts.items()):
            out.update({f"{modality}/{k}": v / count for k, v in self._sums[modality].items()})
            out[f"{modality}/updates"] = float(count)
        self._sums.clear()
        self._counts.clear()
        return out
