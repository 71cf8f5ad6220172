"""``data2vec plot RUN_DIR``: a PNG of the training curves in metrics.jsonl.

Pre-training runs get loss, target / prediction std (joint runs: one line per modality), EMA τ
and learning rate; fine-tuning runs (records with ``valid/*`` metrics, no τ) get training loss,
the validation metrics, learning rate and gradient norm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data2vec.errors import DataError
from data2vec.train.logging import read_metrics

PANELS = (("loss", "loss"), ("target_std", "target / prediction std"), ("tau", "EMA τ"),
          ("lr", "learning rate"))
FINETUNE_PANELS = (("loss", "training loss"), ("valid/", "validation"), ("lr", "learning rate"),
                   ("grad_norm", "gradient norm"))


def is_finetune(records: list[dict[str, Any]]) -> bool:
    """A fine-tuning run's metrics: validation records, no EMA τ."""
    keys = {k for r in records for k in r}
    return any(k.startswith("valid/") for k in keys) or "tau" not in keys


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry `key`."""
    have = [r for r in records if key in r]
    return [r["step"] for r in have], [float(r[key]) for r in have]


def joint_modalities(records: list[dict[str, Any]]) -> list[str]:
    """A joint pre-training run's modalities (it logs ``<modality>/loss``), else []."""
    return sorted({k.split("/")[0] for r in records for k in r
                   if k.endswith("/loss") and not k.startswith("valid/")})


def _draw(ax, records: list[dict[str, Any]], key: str) -> None:
    joint = joint_modalities(records)
    if joint and key in ("loss", "target_std"):  # the overall value jumps between modalities
        for modality in joint:
            line = ax.plot(*_series(records, f"{modality}/{key}"), label=f"{modality}/{key}")
            if key == "target_std":
                ax.plot(*_series(records, f"{modality}/pred_std"), linestyle=":",
                        color=line[0].get_color(), label=f"{modality}/pred_std")
        ax.legend(fontsize=7)
        return
    if key == "valid/":  # one line per validation metric, points where it was measured
        names = sorted({k for r in records for k in r
                        if k.startswith("valid/") and k != "valid/examples"})
        for name in names:
            ax.plot(*_series(records, name), marker="o", label=name.removeprefix("valid/"))
        if names:
            ax.legend()
        return
    ax.plot(*_series(records, key), label=key)
    if key == "target_std":
        ax.plot(*_series(records, "pred_std"), label="pred_std")
        ax.legend()


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write RUN_DIR/curves.png (or `out`) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = Path(run_dir) / "metrics.jsonl"
    if not metrics_path.is_file():
        raise DataError(f"no metrics.jsonl in {run_dir}")
    records = read_metrics(metrics_path)
    if not records:
        raise DataError(f"{metrics_path} is empty")
    panels = FINETUNE_PANELS if is_finetune(records) else PANELS
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels, strict=True):
        _draw(ax, records, key)
        ax.set_title(title)
        ax.set_xlabel("update")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

