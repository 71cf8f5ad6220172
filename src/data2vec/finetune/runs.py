"""A fine-tuning run directory, kept like a pre-training run (the same writers)::

    RUN/config.yaml          every setting: ``finetune`` (FinetuneConfig) and ``config`` (the model)
    RUN/metrics.jsonl        per update: loss, lr, grad_norm, steps_per_s; per validation:
                             ``valid/<metric>`` and ``valid/examples``
    RUN/tensorboard/         the same scalars (train/*, valid/*)
    RUN/train.log            the console log (settings, validations, checkpoints, summary)
    RUN/checkpoints/step-N/  the last weights (model.safetensors + state.pt: config, finetune,
                             labels); ``checkpoints/latest`` names it, so evaluate / export /
                             data2vec.load read the last model
    RUN/checkpoints/best/    the weights with the best validation score so far
    RUN/finetune.json        the summary: split, examples, metrics of the last model, best score
    RUN/tokenizer/           text: the BPE the model reads

Validations during training decode greedily (CTC); the final one uses the run's decoding
settings (beam, LM).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from data2vec.runtime import is_main_process
from data2vec.train.logging import MetricsWriter, setup_console_logging

log = logging.getLogger("data2vec")

SUMMARY_FILE = "finetune.json"


def main_metric(task: str, glue: str, classes: list[str] | None) -> tuple[str, bool]:
    """(metric that picks the best checkpoint, higher is better) of a task; ASR breaks WER ties
    (all 1.0 early on) by CER."""
    if task == "asr":
        return "wer", False
    if task == "audio-cls":
        return "mAP", True
    if task == "text-cls" and not classes:
        return "pearson", True  # regression (STS-B)
    if glue == "cola":
        return "mcc", True
    return "accuracy", True


def format_metrics(metrics: dict[str, float]) -> str:
    """``wer 0.8312, cer 0.4121``."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class FinetuneRun:
    """The run directory's writers: log file, metrics + TensorBoard, progress bar, best score."""

    def __init__(self, run_dir: Path, max_steps: int, metric: tuple[str, bool],
                 progress: bool = True, description: str = "finetune") -> None:
        self.run_dir, self.max_steps = Path(run_dir), max_steps
        self.metric, self.higher = metric
        self.best: float | None = None
        self.best_step = 0
        self._best_score: tuple[float, ...] | None = None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.main = is_main_process()
        setup_console_logging(self.run_dir, self.main)
        for stale in ("metrics.jsonl", SUMMARY_FILE):  # a new run replaces the old curves
            (self.run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
        self.writer = MetricsWriter(self.run_dir) if self.main else None
        self.bar = tqdm(total=max_steps, desc=description, dynamic_ncols=True,
                        disable=not (progress and self.main))
        self.started = time.perf_counter()
        self._last_step_time = self.started
        self._losses: list[float] = []
        self._postfix: dict[str, str] = {}

    def write_config(self, settings: dict[str, Any], config: dict[str, Any]) -> None:
        """RUN/config.yaml: the fine-tuning settings and the model's config."""
        text = yaml.safe_dump({"finetune": settings, "config": config}, sort_keys=False)
        (self.run_dir / "config.yaml").write_text(text)

    def step(self, step: int, stats: dict[str, float]) -> None:
        """Record optimizer update `step` (1-based)."""
        now = time.perf_counter()
        stats = {**stats, "steps_per_s": 1.0 / max(now - self._last_step_time, 1e-9)}
        self._last_step_time = now
        self._losses.append(stats["loss"])
        if self.writer is not None:
            self.writer.write(step, stats)
        recent = self._losses[-20:]
        self._postfix["loss"] = f"{sum(recent) / len(recent):.4f}"
        self._postfix["lr"] = f"{stats['lr']:.2e}"
        self.bar.update(1)
        self.bar.set_postfix(self._postfix, refresh=False)

    def validation(self, step: int, split: str, examples: int,
                   metrics: dict[str, float]) -> bool:
        """Record a validation at `step`; True when it is the best score so far."""
        if self.writer is not None:
            self.writer.write(step, {"examples": examples, **metrics}, group="valid")
        value = metrics.get(self.metric, math.nan)
        score = self._score(metrics)
        better = math.isfinite(value) and (self._best_score is None or score > self._best_score)
        if better:
            self.best, self.best_step, self._best_score = value, step, score
        self._postfix[f"{split} {self.metric}"] = f"{value:.4f}"
        self.bar.set_postfix(self._postfix, refresh=True)
        log.info("step %d/%d: %s (%d examples): %s%s", step, self.max_steps, split, examples,
                 format_metrics(metrics), " (best)" if better else "")
        return better

    def _score(self, metrics: dict[str, float]) -> tuple[float, ...]:
        """Larger is better: the main metric, then (WER ties) the CER."""
        sign = 1.0 if self.higher else -1.0
        tiebreak = -metrics["cer"] if self.metric == "wer" and "cer" in metrics else 0.0
        return sign * metrics.get(self.metric, math.nan), tiebreak

    @property
    def final_train_loss(self) -> float:
        """Mean loss of the last 20 updates."""
        recent = self._losses[-20:]
        return sum(recent) / len(recent) if recent else math.nan

    def finish(self, summary: dict[str, Any]) -> None:
        """Close the writers and write RUN/finetune.json."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.main:
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        """Release the writers after an error (idempotent)."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def summary_line(task: str, summary: dict[str, Any]) -> str:
    """The one line ``data2vec finetune`` prints at the end."""
    best = ""
    if summary.get("best_step"):
        best = (f"; best {summary['best_metric']} {summary['best']:.4f} at step "
                f"{summary['best_step']} (checkpoints/best)")
    return (f"finetune {task}: {summary['split']} split, {summary['examples']} examples: "
            f"{format_metrics(summary['metrics'])} (after {summary['steps']} updates on "
            f"{summary['train_examples']} training examples{best}); run {summary['run']}")


def error_of(metric: str, value: float) -> float:
    """The error a metric implies: WER / CER as they are, 1 − score for the others."""
    return value if metric in ("wer", "cer") else 1.0 - value


def comparison_line(task: str, pretrained: dict[str, Any], scratch: dict[str, Any]) -> str:
    """``--compare-scratch``: both runs' main metric (the one that picks the best checkpoint)
    on the same split, and the relative error reduction."""
    name = pretrained["best_metric"]
    ours, base = pretrained["metrics"][name], scratch["metrics"][name]
    err, base_err = error_of(name, ours), error_of(name, base)
    change = (base_err - err) / base_err if base_err > 0 else math.nan
    verdict = "reduces" if change >= 0 else "increases"
    return (f"compare {task} on {pretrained['split']} ({pretrained['examples']} examples): "
            f"{name} {ours:.4f} pre-trained vs {base:.4f} from scratch (same architecture and "
            f"settings; run {scratch['run']}): pre-training {verdict} the error by "
            f"{100 * abs(change):.0f} %")


__all__ = ["SUMMARY_FILE", "FinetuneRun", "comparison_line", "error_of", "format_metrics",
           "main_metric", "summary_line"]
