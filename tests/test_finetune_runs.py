"""A fine-tuning run is a first-class run: config.yaml, train.log, metrics.jsonl + TensorBoard
with validations every N updates, best and last checkpoints, a summary line naming the split,
its size and the run; evaluate names split and count and writes per-example predictions; plot
draws the fine-tuning curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import data2vec
from data2vec.cli import main
from data2vec.data.demo import prepare_demo
from data2vec.train.logging import read_metrics

TINY = ["model.encoder.depth=1", "model.objective.top_k=1", "threads=1", "--batch-size", "4"]


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    prepare_demo("image", home / "demo" / "image")
    return home


@pytest.fixture(scope="module")
def run(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    mp = pytest.MonkeyPatch()
    mp.setenv("DATA2VEC_HOME", str(demo_home))
    out = tmp_path_factory.mktemp("runs") / "img"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["finetune", "--task", "image-cls", "--init", "scratch", "--label-fraction",
                     "0.05", "--max-steps", "5", "--eval-every", "2", "--out", str(out),
                     *TINY]) == 0
    mp.undo()
    return out, printed.getvalue()


@pytest.fixture(autouse=True)
def _home(demo_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA2VEC_HOME", str(demo_home))


def test_run_directory_holds_what_a_pretraining_run_holds(run: tuple[Path, str]) -> None:
    out, _ = run
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["finetune"]["task"] == "image-cls" and config["finetune"]["eval_every"] == 2
    assert config["config"]["model"]["encoder"]["depth"] == 1  # the architecture, too
    log = (out / "train.log").read_text()
    assert "training and" in log and "step 2/5: valid" in log and "checkpoint" in log
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid/accuracy" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert all(r["steps_per_s"] > 0 and "lr" in r and "grad_norm" in r for r in train)
    assert [r["step"] for r in valid] == [2, 4, 5]  # every 2 updates and after the last one
    assert all(r["valid/examples"] == valid[0]["valid/examples"] > 0 for r in valid)


def test_best_and_last_checkpoints(run: tuple[Path, str]) -> None:
    out, _ = run
    records = [r for r in read_metrics(out / "metrics.jsonl") if "valid/accuracy" in r]
    best = max(records, key=lambda r: (r["valid/accuracy"], -r["step"]))
    last = data2vec.load(out)  # `latest` names the last step
    assert last.state["step"] == 5
    kept = data2vec.load(out / "checkpoints" / "best")
    assert kept.state["step"] == best["step"] and kept.task == "image-cls"
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["best_step"] == best["step"]
    assert summary["best"] == pytest.approx(best["valid/accuracy"])


def test_summary_line_names_split_examples_metric_and_run(run: tuple[Path, str]) -> None:
    out, printed = run
    line = printed.strip().splitlines()[-1]
    summary = json.loads((out / "finetune.json").read_text())
    assert line.startswith("finetune image-cls: valid split, ")
    assert f"{summary['examples']} examples" in line and "accuracy" in line
    assert line.endswith(f"run {out}")


def test_evaluate_names_split_and_count_and_writes_predictions(run: tuple[Path, str],
                                                               tmp_path: Path,
                                                               capsys) -> None:
    out, _ = run
    predictions = tmp_path / "pred.jsonl"
    assert main(["evaluate", str(out), "--split", "test", "--predictions",
                 str(predictions)]) == 0
    line = capsys.readouterr().out.strip()
    rows = [json.loads(r) for r in predictions.read_text().splitlines()]
    assert line.startswith(f"evaluate {out}: test split, {len(rows)} examples: accuracy ")
    assert all(Path(r["input"]).is_file() and r["label"] in "0123456789" for r in rows)
    accuracy = sum(r["label"] == r["predicted"] for r in rows) / len(rows)
    assert f"accuracy {accuracy:.4f}" in line  # the file's predictions are the scored ones


def test_plot_draws_finetuning_curves(run: tuple[Path, str], tmp_path: Path) -> None:
    import matplotlib.image

    from data2vec.train.plot import FINETUNE_PANELS, is_finetune

    out, _ = run
    assert is_finetune(read_metrics(out / "metrics.jsonl"))
    assert main(["plot", str(out), "--out", str(tmp_path / "c.png")]) == 0
    image = matplotlib.image.imread(tmp_path / "c.png")
    assert image.shape[1] >= 4 * 100 * len(FINETUNE_PANELS) * 0.9  # a panel per curve group
    assert image.std() > 0.05  # lines were drawn, not empty panels


def test_best_asr_checkpoint_breaks_wer_ties_by_cer(tmp_path: Path) -> None:
    from data2vec.finetune.runs import FinetuneRun, main_metric

    run = FinetuneRun(tmp_path / "asr", 30, main_metric("asr", "", None), progress=False)
    seen = [run.validation(step, "valid", 9, {"wer": 1.0, "cer": cer})
            for step, cer in ((10, 0.95), (20, 0.90), (30, 0.92))]
    run.close()
    assert seen == [True, True, False] and run.best_step == 20 and run.best == 1.0
