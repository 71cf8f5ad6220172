"""``data2vec plot RUN_DIR``: a PNG of the training curves in metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from data2vec.errors import DataError
from data2vec.train.logging import read_metrics

PANELS = (("loss", "loss"), ("target_std", "target / prediction std"), ("tau", "EMA τ"),
          ("lr", "learning rate"))


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
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        ax.plot(steps, [float(r.get(key, "nan")) for r in records], label=key)
        if key == "target_std":
            ax.plot(steps, [float(r.get("pred_std", "nan")) for r in records], label="pred_std")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("update")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
