"""`data2vec pretrain` end to end on demo data: runs, resumes exactly, errors are one line, and a
2-process gloo run equals a 1-process run with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data2vec.cli import main
from data2vec.data.demo import prepare_demo

FAST = ["run.progress=false", "run.tensorboard=false", "run.log_every=1", "run.threads=1"]


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    prepare_demo("image", home / "demo" / "image")
    return home


@pytest.fixture(autouse=True)
def _home(demo_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA2VEC_HOME", str(demo_home))


def metrics(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    args = ["pretrain", "--modality", "image", *FAST, "run.checkpoint_every=3"]
    assert main([*args, "--out", str(tmp_path / "full"), "--max-steps", "6"]) == 0
    # interrupted after update 3 (the schedule still spans 6), then resumed
    assert main([*args, "--out", str(tmp_path / "cut"), "--max-steps", "6", "run.stop_at=3"]) == 0
    assert main([*args, "--out", str(tmp_path / "cut"), "--max-steps", "6", "--resume"]) == 0
    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert sorted(full) == sorted(cut) == list(range(1, 7))
    for step in full:
        assert abs(full[step]["loss"] - cut[step]["loss"]) <= 1e-6, step


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["pretrain", "--modality", "image", "--out", str(tmp_path),
                 "model.encoder.detph=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "did you mean 'depth'" in err
    code = main(["pretrain", "--modality", "image", "--out", str(tmp_path), "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no checkpoint" in err
    code = main(["pretrain", "--modality", "image", "--data", str(tmp_path / "nowhere")])
    assert code == 2 and "nowhere" in capsys.readouterr().err


def test_plot_writes_png(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["pretrain", "--modality", "image", "--out", str(run), "--max-steps", "2",
                 *FAST]) == 0
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_with_same_global_batch(tmp_path: Path, demo_home: Path) -> None:
    common = ["pretrain", "--modality", "image", "--max-steps", "4", *FAST,
              "model.encoder.dropout=0.0", "model.encoder.attention_dropout=0.0",
              "model.encoder.drop_path=0.0"]
    assert main([*common, "--out", str(tmp_path / "one"), "data.batch_size=8"]) == 0
    env = {**os.environ, "DATA2VEC_HOME": str(demo_home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "data2vec.cli", *common, "--out", str(tmp_path / "two"), "data.batch_size=4"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done:") == 1  # the summary comes from rank 0 only
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert abs(one[step]["loss"] - two[step]["loss"]) <= 1e-5, step
        assert two[step]["samples"] == one[step]["samples"] == 8


def test_init_continues_from_another_checkpoint(tmp_path: Path) -> None:
    from data2vec.train.checkpoint import find_checkpoint, load_weights

    first = tmp_path / "first"
    assert main(["pretrain", "--modality", "image", "--out", str(first), "--max-steps", "2",
                 *FAST, "model.encoder.depth=3", "model.objective.top_k=2"]) == 0
    second = tmp_path / "second"
    assert main(["pretrain", "--modality", "image", "--out", str(second), "--max-steps", "1",
                 "--init", str(first), *FAST, "optim.lr=1e-12"]) == 0
    # architecture from the checkpoint (depth 3); with lr 1e-12 (0 is refused) one AdamW update
    # moves a weight by about 1e-12: the student weights carry over
    a, b = load_weights(find_checkpoint(first)), load_weights(find_checkpoint(second))
    assert sum(1 for k in b if k.startswith("encoder.blocks.") and k.endswith("norm1.weight")) == 3
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-9)
               for k in a if k.startswith(("encoder.", "frontend.")))


@pytest.mark.parametrize("folder", ["ok #2", "2024", "[x]: y"])
def test_data_paths_are_taken_literally(folder: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--data is a path, never YAML: 'ok #2' is not 'ok', '2024' is not a number."""
    import yaml
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok").mkdir()  # what YAML would have made of 'ok #2': must not be used
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / "ok" / f"{i}.png")
    (tmp_path / folder).mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (10, 60 * i, 90)).save(tmp_path / folder / f"{i}.png")
    assert main(["pretrain", "--modality", "image", "--data", folder, "--out", "run",
                 "--max-steps", "1", "data.batch_size=2", *FAST]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["path"] == folder
