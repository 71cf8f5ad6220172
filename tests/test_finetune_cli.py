"""`data2vec finetune` + `data2vec evaluate` end to end on small demo data, one run per task,
and initialisation from a pre-training run (student or EMA teacher)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from data2vec.cli import main
from data2vec.data.demo import prepare_demo
from data2vec.finetune.loop import FinetuneConfig, load_backbone
from data2vec.train import checkpoint as ckpt

TINY = ["model.encoder.depth=1", "model.objective.top_k=1", "threads=1", "--max-steps", "3",
        "--batch-size", "4"]


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    prepare_demo("image", home / "demo" / "image")
    prepare_demo("text", home / "demo" / "text")
    prepare_demo("speech", home / "speech", size=30)  # not the default size: passed as --data
    return home


@pytest.fixture(autouse=True)
def _home(demo_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA2VEC_HOME", str(demo_home))


def _last_json(out: str) -> dict[str, float]:
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def _finetune_then_evaluate(args: list[str], run: Path, capsys: pytest.CaptureFixture,
                            eval_args: tuple[str, ...] = ()) -> tuple[dict, dict]:
    assert main(["finetune", *args, "--out", str(run), "--json", *TINY]) == 0
    trained = _last_json(capsys.readouterr().out)
    assert main(["evaluate", str(run), "--split", "valid", "--json", *eval_args]) == 0
    return trained, _last_json(capsys.readouterr().out)


def test_image_classification(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trained, scored = _finetune_then_evaluate(
        ["--task", "image-cls", "--init", "scratch", "--label-fraction", "0.1", "mixup=0.8",
         "cutmix=1.0"], tmp_path / "img", capsys)
    assert trained["train_examples"] == pytest.approx(144, abs=5)  # 10 % of 1,439, per class
    assert 0.0 <= scored["accuracy"] <= scored["top5"] <= 1.0
    assert scored["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-4)  # reload = same


def test_text_classification(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trained, scored = _finetune_then_evaluate(
        ["--task", "text-cls", "--init", "scratch", "max_labeled=40"], tmp_path / "txt", capsys)
    assert trained["train_examples"] == 40
    assert scored["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-4)


def test_glue_pairs_and_regression(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    glue = tmp_path / "STS-B"
    glue.mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2" \
             "\tscore\n"
    rows = [f"{i}\tg\tf\ty\t{i}\ts\ts\tA cat number {i}.\tA dog number {i % 3}.\t{i % 5}.0\n"
            for i in range(12)]
    (glue / "train.tsv").write_text(header + "".join(rows))
    (glue / "dev.tsv").write_text(header + "".join(rows[:6]))
    trained, scored = _finetune_then_evaluate(
        ["--task", "text-cls", "--init", "scratch", "--glue", "stsb", "--data", str(glue)],
        tmp_path / "stsb", capsys)
    assert -1.0 <= scored["pearson"] <= 1.0 and -1.0 <= scored["spearman"] <= 1.0
    assert scored["pearson"] == pytest.approx(trained["pearson"], abs=1e-4)


def test_speech_recognition_greedy_and_lm_beam(tmp_path: Path, demo_home: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    data = str(demo_home / "speech")
    trained, scored = _finetune_then_evaluate(
        ["--task", "asr", "--init", "scratch", "--data", data, "--labeled-minutes", "0.3",
         "freeze_encoder_steps=1"], tmp_path / "asr", capsys)
    assert trained["train_examples"] < 24  # 0.3 minutes of the 24 training clips
    assert scored["wer"] == pytest.approx(trained["wer"], abs=1e-6)
    assert main(["evaluate", str(tmp_path / "asr"), "--split", "valid", "--beam", "4", "--lm",
                 "train", "--json"]) == 0
    beam = _last_json(capsys.readouterr().out)
    assert math.isfinite(beam["wer"]) and math.isfinite(beam["cer"])
    arpa = (tmp_path / "asr" / "train.2gram.arpa").read_text()
    assert "\\2-grams:" in arpa and "\t<s> " in arpa  # bigrams of the training words


def test_audio_classification(tmp_path: Path, demo_home: Path,
                              capsys: pytest.CaptureFixture) -> None:
    trained, scored = _finetune_then_evaluate(
        ["--task", "audio-cls", "--init", "scratch", "--data", str(demo_home / "speech")],
        tmp_path / "tags", capsys)
    assert 0.0 < scored["mAP"] <= 1.0 and not math.isnan(scored["mAP"])
    assert scored["mAP"] == pytest.approx(trained["mAP"], abs=1e-6)


def test_init_from_pretraining_run_student_or_teacher(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "pre"
    assert main(["pretrain", "--modality", "image", "--out", str(run), "--max-steps", "2",
                 "run.progress=false", "run.tensorboard=false", "run.threads=1",
                 "model.encoder.depth=1", "model.objective.top_k=1"]) == 0
    saved = ckpt.load_weights(ckpt.find_checkpoint(run))
    student = FinetuneConfig(task="image-cls", init=str(run))
    _, model = load_backbone(student)
    key = "encoder.blocks.0.mlp.fc1.weight"
    assert torch.equal(model.encoder.state_dict()["blocks.0.mlp.fc1.weight"], saved[key])
    teacher = FinetuneConfig(task="image-cls", init=str(run), from_teacher=True)
    _, model = load_backbone(teacher)
    teacher_key = "teacher.model.encoder.blocks.0.mlp.fc1.weight"
    assert not torch.equal(saved[key], saved[teacher_key])  # the EMA lags the student
    assert torch.equal(model.encoder.state_dict()["blocks.0.mlp.fc1.weight"], saved[teacher_key])
    trained, scored = _finetune_then_evaluate(
        ["--task", "image-cls", "--init", str(run), "--init-from-teacher", "--linear-probe"],
        tmp_path / "probe", capsys)
    assert scored["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-4)
    code = main(["finetune", "--task", "asr", "--init", str(run), "--out", str(tmp_path / "x")])
    assert code == 2 and "needs speech" in capsys.readouterr().err


def test_compare_scratch_runs_the_same_architecture_from_random_weights(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "pre"
    assert main(["pretrain", "--modality", "image", "--out", str(run), "--max-steps", "2",
                 "run.progress=false", "run.tensorboard=false", "run.threads=1",
                 "model.encoder.depth=1", "model.objective.top_k=1"]) == 0
    saved = ckpt.load_weights(ckpt.find_checkpoint(run))
    torch.manual_seed(3)
    cfg, model = load_backbone(FinetuneConfig(task="image-cls", init=str(run), random_init=True))
    assert cfg.model.encoder.depth == 1  # the checkpoint's architecture, not the preset's
    weights = model.state_dict()
    assert weights.keys() == saved.keys()
    key = "encoder.blocks.0.mlp.fc1.weight"
    assert weights[key].shape == saved[key].shape and not torch.equal(weights[key], saved[key])
    out = tmp_path / "cmp"
    assert main(["finetune", "--task", "image-cls", "--init", str(run), "--out", str(out),
                 "--compare-scratch", "--label-fraction", "0.1", *TINY[2:]]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    pretrained = json.loads((out / "finetune.json").read_text())
    scratch = json.loads((out / "scratch" / "finetune.json").read_text())
    assert scratch["split"] == pretrained["split"] and scratch["steps"] == pretrained["steps"]
    assert printed.startswith("compare image-cls on valid") and "from scratch" in printed
    ours, base = pretrained["metrics"]["accuracy"], scratch["metrics"]["accuracy"]
    assert f"{ours:.4f} pre-trained vs {base:.4f} from scratch" in printed
    code = main(["finetune", "--task", "image-cls", "--init", "scratch", "--compare-scratch",
                 "--out", str(tmp_path / "x")])
    assert code == 2 and "--compare-scratch" in capsys.readouterr().err


@pytest.mark.parametrize(("options", "message"), [
    (["--lr", "-1"], "fine-tuning option 'lr': -1.0 is out of range, expected > 0"),
    (["--label-fraction", "0"], "fine-tuning option 'label_fraction': 0.0 is out of range"),
    (["mask_prob=nan"], "fine-tuning option 'mask_prob': nan is not a finite number"),
    (["betas=[0.9,1.5]"], "fine-tuning option 'betas[1]': 1.5 is out of range"),
    (["tri_stage=[0.5,0.5,0.5]"], "fine-tuning option 'tri_stage': [0.5, 0.5, 0.5] sums to"),
    (["crop_scale=[0.9,0.5]"], "fine-tuning option 'crop_scale': [0.9, 0.5], expected low"),
])
def test_out_of_range_options_are_named_before_any_work(options: list[str], message: str,
                                                         tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    code = main(["finetune", "--task", "image-cls", "--init", "scratch", "--out", str(run),
                 *options])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_a_config_built_in_python_is_checked_too(tmp_path: Path) -> None:
    from data2vec.errors import ConfigError
    from data2vec.finetune.loop import finetune

    with pytest.raises(ConfigError, match="'batch_size': 0 is out of range"):
        finetune(FinetuneConfig(task="image-cls", batch_size=0), tmp_path / "run")
    assert not (tmp_path / "run").exists()
