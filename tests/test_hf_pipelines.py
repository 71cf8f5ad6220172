"""HF exports that HuggingFace's own tools use: AutoTokenizer gives our token ids, and the real
``transformers.pipeline`` runs on every kind of export (feature extraction, text and image
classification, speech recognition transcribing like ``data2vec evaluate``); exported files
honour the umask. Offline: every model is built here, nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import transformers

import data2vec
from data2vec.build import build_model, build_task_model
from data2vec.config import load_config, to_dict
from data2vec.data.demo import prepare_demo
from data2vec.data.tokenizer import BPETokenizer
from data2vec.finetune.loop import FinetuneConfig
from data2vec.interop.common import ImportReport, write_run
from data2vec.interop.hf import export_hf

pytestmark = pytest.mark.slow
TOL = 1e-4
SMALL = ["model.encoder.depth=2", "model.objective.top_k=1"]
TEXT = ["the quick brown fox jumps over the lazy dog", "a cat sat", "data to vec, in words",
        "Hello world; <mask> marks a hidden word", "naïve café – ünïcode"]


def _perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _pretrained(tmp_path: Path, modality: str) -> Path:
    cfg = load_config(modality, "tiny", 1, None, SMALL)
    model = build_model(cfg)
    _perturb(model)
    run = tmp_path / f"pre-{modality}"
    write_run(run, cfg, model, ImportReport("test"))
    if modality == "text":
        BPETokenizer.train(iter(TEXT * 20), 320, run / "tokenizer")
    return run


def _finetuned(tmp_path: Path, modality: str, task: str, labels: dict) -> Path:
    """A fine-tuned run as `data2vec finetune` writes it (random but non-trivial weights)."""
    pre = data2vec.load(_pretrained(tmp_path, modality))
    outputs = len(labels["vocab"]) if "vocab" in labels else len(labels["classes"])
    model = build_task_model(pre.cfg, task, outputs)
    state = model.state_dict()
    state.update({k: v for k, v in pre.network.state_dict().items() if k in state})
    model.load_state_dict(state)
    _perturb(model.head, 0.5)  # decisive logits: argmax does not hinge on 1e-6
    run = tmp_path / f"ft-{task}"
    write_run(run, pre.cfg, model, ImportReport("test"), finetune=to_dict(FinetuneConfig(task)),
              labels=labels, final_norm=model.use_final_norm)
    if modality == "text":
        BPETokenizer.load(pre.source.replace("checkpoints/step-0000000", "tokenizer")) \
            .save(run / "tokenizer")
    return run


def test_text_export_carries_the_tokenizer_and_runs_feature_extraction(tmp_path: Path) -> None:
    run = _pretrained(tmp_path, "text")
    export_hf(run, tmp_path / "hf")
    ours = data2vec.load(run)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXT:
        assert hf_tok(text)["input_ids"] == ours.tokenizer.encode_sentence(text)
    assert hf_tok(TEXT[0], TEXT[1])["input_ids"][-1] == ours.tokenizer.eos_id
    extractor = transformers.pipeline("feature-extraction", model=str(tmp_path / "hf"))
    for text in TEXT[:2]:
        theirs = torch.tensor(extractor(text))[0]  # (T, D): the last hidden state
        mine = ours.extract_features([text], -1).item(0)[ours.depth]
        assert theirs.shape == mine.shape and (theirs - mine).abs().max() <= TOL


def test_text_classification_pipeline_on_a_finetuned_export(tmp_path: Path) -> None:
    run = _finetuned(tmp_path, "text", "text-cls", {"classes": ["code", "prose", "science"]})
    export_hf(run, tmp_path / "hf")
    ours = data2vec.load(run)
    classify = transformers.pipeline("text-classification", model=str(tmp_path / "hf"),
                                     top_k=None)
    for text in TEXT[:3]:
        source, padding = ours.preprocess([text])
        with torch.no_grad():
            probs = ours(source, padding).softmax(-1)[0]
        scores = {r["label"]: r["score"] for r in classify([text])[0]}
        assert set(scores) == {"code", "prose", "science"}
        for i, name in enumerate(["code", "prose", "science"]):
            assert abs(scores[name] - float(probs[i])) <= TOL


def test_image_classification_pipeline_on_the_readme_image_run(tmp_path: Path) -> None:
    """The image tiny preset has a final LayerNorm (BEiT pre-training); fine-tuning with mean
    pooling skips it as BEiT does, so the run exports and HF classifies like us."""
    from PIL import Image

    assert load_config("image", "tiny").model.encoder.final_norm
    home = tmp_path / "demo"
    images = sorted((prepare_demo("image", home) / "test").rglob("*.png"))[:4]
    run = _finetuned(tmp_path, "image", "image-cls", {"classes": [str(d) for d in range(10)]})
    export_hf(run, tmp_path / "hf")
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert type(processor).__name__ == "BeitImageProcessorPil"  # no torchvision needed
    ours = data2vec.load(run)
    classify = transformers.pipeline("image-classification", model=str(tmp_path / "hf"))
    for path in images:
        pixels = processor(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        assert torch.allclose(pixels[0], ours.read_input(path), atol=1e-5)  # same transform
        source, _ = ours.preprocess([path])
        with torch.no_grad():
            probs = ours(source).softmax(-1)[0]
        scores = {r["label"]: r["score"] for r in classify(str(path), top_k=10)}
        for digit in range(10):
            assert abs(scores[str(digit)] - float(probs[digit])) <= TOL


def test_speech_recognition_pipeline_transcribes_like_evaluate(tmp_path: Path,
                                                               monkeypatch) -> None:
    from data2vec.finetune import data as ft_data
    from data2vec.finetune.ctc import Vocabulary
    from data2vec.finetune.loop import evaluate_split

    demo = prepare_demo("speech", tmp_path / "speech", size=8)
    vocab = Vocabulary.from_ltr(ft_data.read_ltr(demo, "train") + ft_data.read_ltr(demo, "valid"))
    run = _finetuned(tmp_path, "speech", "asr", {"vocab": vocab.symbols})
    export_hf(run, tmp_path / "hf")
    assert isinstance(transformers.AutoProcessor.from_pretrained(tmp_path / "hf"),
                      transformers.Wav2Vec2Processor)
    ours = data2vec.load(run)
    ft = FinetuneConfig(task="asr", data=str(demo), batch_size=4)
    split = ft_data.speech_asr(demo, "valid", vocab)
    records = evaluate_split(ours.network, ft, ours.cfg, ours.labels, None, split).records
    recognise = transformers.pipeline("automatic-speech-recognition",
                                      model=str(tmp_path / "hf"))
    assert any(r["hypothesis"] for r in records)  # something to compare
    for record in records:  # HF reads files through ffmpeg (not installed): give it samples
        wave, rate = soundfile.read(record["input"], dtype="float32")
        text = recognise({"raw": wave, "sampling_rate": rate})["text"]
        # HF keeps a double space where the model emits two word ends around a blank; the
        # words are the same
        assert text.split() == record["hypothesis"].split(), record["input"]


def test_audio_export_has_a_feature_extractor_and_files_honour_the_umask(tmp_path: Path) -> None:
    run = _pretrained(tmp_path, "speech")
    old = os.umask(0o027)
    try:
        export_hf(run, tmp_path / "hf")
    finally:
        os.umask(old)
    for f in (tmp_path / "hf").iterdir():
        assert f.stat().st_mode & 0o777 == 0o640, f  # safetensors alone would write 0600
    extractor = transformers.AutoFeatureExtractor.from_pretrained(tmp_path / "hf")
    wave = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    theirs = extractor(wave, sampling_rate=16000, return_tensors="pt")["input_values"][0]
    ours = data2vec.load(run).read_input(wave)
    var = float(wave.astype(np.float64).var())  # HF's variance epsilon is 1e-7, ours 1e-5
    assert torch.allclose(theirs, ours * np.sqrt((var + 1e-5) / (var + 1e-7)), atol=1e-5)
    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hidden = hf(theirs.unsqueeze(0)).last_hidden_state[0]
    mine = data2vec.load(run).extract_features(theirs.unsqueeze(0), -1).layers[2][0]
    assert (hidden - mine).abs().max() <= TOL
