"""Fine-tuning learns at the README's settings: from random weights, each task beats chance on
the demo data's validation split, with a significance test rather than a fixed score.

- image-cls and text-cls: accuracy above the majority class (one-sided binomial test);
- audio-cls: mAP above the mAP of the same scores shuffled across clips (permutation test);
- asr: per-utterance CER below that of the most frequent training transcript, said for every
  utterance (one-sided Wilcoxon signed-rank test), and beam search with the bigram LM of the
  training transcripts no worse than greedy decoding on the same model. ASR starts from the
  committed pre-trained tiny encoder (``tests/data/make_speech_init.py``): from random weights
  CTC stays all-blank far longer than a CI test may run.

Fewer updates than the CLI defaults where the default run would not fit a CI test (< 60 s each).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import jiwer
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import binomtest, wilcoxon

from data2vec.build import build_model
from data2vec.cli import main
from data2vec.config import config_from_dict, to_dict
from data2vec.data.demo import prepare_demo
from data2vec.finetune.data import DIGIT_WORDS
from data2vec.finetune.metrics import mean_average_precision
from data2vec.train import checkpoint as ckpt

P_VALUE = 1e-3
SPEECH_INIT = Path(__file__).resolve().parent / "data" / "speech_tiny_init"


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    prepare_demo("image", home / "demo" / "image")
    prepare_demo("text", home / "demo" / "text")
    prepare_demo("speech", home / "speech", size=400)
    return home


@pytest.fixture(autouse=True)
def _home(demo_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA2VEC_HOME", str(demo_home))


def _finetune(task: str, out: Path, *args: str) -> None:
    assert main(["finetune", "--task", task, "--init", "scratch", "--out", str(out),
                 "--eval-every", "0", "threads=1", *args]) == 0


def _predictions(run: Path, *args: str) -> list[dict]:
    file = run / "predictions.jsonl"
    assert main(["evaluate", str(run), "--split", "valid", "--predictions", str(file),
                 *args]) == 0
    return [json.loads(line) for line in file.read_text().splitlines()]


def _beats_majority(records: list[dict], train_labels: list[str]) -> tuple[float, float, float]:
    """(accuracy, majority-class accuracy, one-sided binomial p-value)."""
    majority = collections.Counter(train_labels).most_common(1)[0][0]
    hits = sum(r["predicted"] == r["label"] for r in records)
    chance = sum(r["label"] == majority for r in records) / len(records)
    p = binomtest(hits, len(records), chance, alternative="greater").pvalue
    return hits / len(records), chance, p


def test_image_classification_beats_the_majority_class(tmp_path: Path, demo_home: Path) -> None:
    _finetune("image-cls", tmp_path / "img", "--label-fraction", "0.1")
    train = [p.parent.name for p in (demo_home / "demo" / "image" / "train").glob("*/*.png")]
    accuracy, chance, p = _beats_majority(_predictions(tmp_path / "img"), train)
    assert accuracy > chance and p < P_VALUE, (accuracy, chance, p)


def test_text_classification_beats_the_majority_class(tmp_path: Path, demo_home: Path) -> None:
    _finetune("text-cls", tmp_path / "txt", "max_labeled=300", "--max-steps", "200")
    rows = (demo_home / "demo" / "text" / "train.labelled.tsv").read_text().splitlines()
    accuracy, chance, p = _beats_majority(_predictions(tmp_path / "txt"),
                                          [r.split("\t", 1)[0] for r in rows])
    assert accuracy > chance and p < P_VALUE, (accuracy, chance, p)


def test_audio_tagging_beats_shuffled_scores(tmp_path: Path, demo_home: Path) -> None:
    _finetune("audio-cls", tmp_path / "tags", "--data", str(demo_home / "speech"))
    records = _predictions(tmp_path / "tags")
    classes = sorted({c for r in records for c in r["labels"]})
    truth = np.array([[c in r["labels"] for c in DIGIT_WORDS] for r in records], dtype=float)
    scores = np.array([r["logits"] for r in records])
    assert len(classes) == 10 and scores.shape == truth.shape
    observed = mean_average_precision(truth, scores)
    rng = np.random.default_rng(0)
    shuffled = [mean_average_precision(truth, scores[rng.permutation(len(scores))])
                for _ in range(200)]
    p = (1 + sum(s >= observed for s in shuffled)) / (1 + len(shuffled))
    assert observed > max(shuffled) and p < 0.01, (observed, max(shuffled))


# ---------------------------------------------------------------------------------- speech


@pytest.fixture(scope="module")
def asr_run(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed pre-trained encoder fine-tuned for CTC on the demo clips (350 updates)."""
    cfg = config_from_dict(json.loads((SPEECH_INIT / "config.json").read_text()))
    torch.manual_seed(0)
    model = build_model(cfg)
    state = model.state_dict()
    encoder = {k: v.float() for k, v in load_file(SPEECH_INIT / "encoder.safetensors").items()}
    state.update(encoder)
    state.update({k: encoder[k.replace("teacher.model.", "encoder.", 1)] for k in state
                  if k.startswith("teacher.model.")})  # the teacher plays no part here
    model.load_state_dict(state)
    init = tmp_path_factory.mktemp("init")
    ckpt.save_checkpoint(init / "checkpoints", 1, model, {"step": 1, "config": to_dict(cfg)})
    run = tmp_path_factory.mktemp("asr") / "run"
    assert main(["finetune", "--task", "asr", "--init", str(init), "--out", str(run),
                 "--data", str(demo_home / "speech"), "--max-steps", "350", "--eval-every",
                 "0", "threads=1"]) == 0
    return run


def test_speech_recognition_beats_a_constant_transcript(asr_run: Path, demo_home: Path) -> None:
    records = _predictions(asr_run)
    words = (demo_home / "speech" / "train.wrd").read_text().splitlines()
    constant = collections.Counter(words).most_common(1)[0][0]
    ours = np.array([jiwer.cer(r["reference"], r["hypothesis"]) for r in records])
    chance = np.array([jiwer.cer(r["reference"], constant) for r in records])
    p = wilcoxon(ours, chance, alternative="less").pvalue
    assert ours.mean() < chance.mean() and p < P_VALUE, (ours.mean(), chance.mean(), p)


def test_lm_beam_search_is_no_worse_than_greedy(asr_run: Path) -> None:
    def wer(records: list[dict]) -> float:
        return jiwer.wer([r["reference"] for r in records], [r["hypothesis"] for r in records])

    greedy = _predictions(asr_run)
    beam = _predictions(asr_run, "--beam", "8", "--lm", "train")
    assert 0.0 < wer(greedy) < 1.0  # a model that emits words, some of them wrong
    assert wer(beam) <= wer(greedy), (wer(beam), wer(greedy))
