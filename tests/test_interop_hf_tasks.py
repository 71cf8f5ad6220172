"""HuggingFace task models (…ForCTC, …ForSequenceClassification, …ForImageClassification)
imported as our fine-tuned runs: logits equal HF's (with padding), labels and the CTC blank
carried over, tokenizer files copied, export gives the HF weights back, refusals by name.

The reference is HuggingFace's own code, on random models of small configs saved to a temp dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from data2vec.cli import main
from data2vec.data.tokenizer import BPETokenizer
from data2vec.finetune.ctc import BLANK
from data2vec.finetune.loop import load_finetuned

TOL = 1e-5
AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             conv_dim=[16, 16, 16], conv_kernel=[10, 3, 2], conv_stride=[5, 2, 2],
             num_conv_pos_embeddings=2, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4)
TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=40, type_vocab_size=1,
            layer_norm_eps=1e-5)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              image_size=16, patch_size=4, use_mean_pooling=True,
              use_relative_position_bias=True, layer_scale_init_value=0.1,
              layer_norm_eps=1e-12)  # HF's default: our fc_norm takes it over


def _save_hf(tmp_path: Path, cls_name: str, config: dict, seed: int = 0):
    cls = getattr(transformers, cls_name)
    config_cls = getattr(transformers, cls_name.split("For")[0] + "Config")
    torch.manual_seed(seed)
    hf = cls(config_cls(**config)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    return hf


def _tokenizer_files(directory: Path) -> BPETokenizer:
    """RoBERTa-format vocab.json + merges.txt, as HF text model directories ship them."""
    corpus = directory / "corpus.txt"
    corpus.write_text("the cat sat on the mat\na dog ate the bone\n" * 20)
    tok = BPETokenizer.train([corpus], vocab_size=300, out_dir=directory / "bpe")
    for name in ("vocab.json", "merges.txt"):
        (directory / "hf" / name).write_bytes((directory / "bpe" / name).read_bytes())
    return tok


def _import(tmp_path: Path, capsys) -> str:
    assert main(["import", "--from", "hf", str(tmp_path / "hf"), "--out",
                 str(tmp_path / "run")]) == 0
    return capsys.readouterr().out


CASES = [
    ("Data2VecAudioForSequenceClassification",
     dict(AUDIO, num_labels=3, id2label={0: "dog", 1: "cat", 2: "car"}, classifier_proj_size=24)),
    ("Data2VecTextForSequenceClassification", dict(TEXT, num_labels=2, id2label={0: "neg",
                                                                                 1: "pos"})),
    ("Data2VecTextForSequenceClassification", dict(TEXT, num_labels=1, problem_type="regression")),
    ("Data2VecVisionForImageClassification", dict(VISION, num_labels=5)),
]


@pytest.mark.parametrize(("cls_name", "config"), CASES)
def test_hf_classification_model_imports_with_equal_logits(tmp_path: Path, capsys,
                                                           cls_name: str, config: dict) -> None:
    hf = _save_hf(tmp_path, cls_name, config)
    if "Text" in cls_name:
        _tokenizer_files(tmp_path)
    assert "fine-tuned" in _import(tmp_path, capsys)
    model, ft, cfg, labels, _ = load_finetuned(tmp_path / "run")
    model.eval()
    if "Audio" in cls_name:
        source = torch.randn(2, 4000)
        padding = torch.zeros(2, 4000, dtype=torch.bool)
        padding[1, 2500:] = True
        source[padding] = 0.0  # what a padding collator gives HF
        hf_kwargs = {"attention_mask": (~padding).long()}
        assert cfg.model.frontend.pos_conv_padding == "input"  # HF's, for equal padded rows
    elif "Text" in cls_name:
        source = torch.randint(5, 100, (2, 12))
        source[1, 8:] = 1  # RoBERTa <pad>
        padding = source == 1
        hf_kwargs = {"attention_mask": (~padding).long()}
    else:
        source, padding, hf_kwargs = torch.randn(2, 3, 16, 16), None, {}
    with torch.no_grad():
        ours, _ = model(source, padding)
        theirs = hf(source, **hf_kwargs).logits
    assert ours.shape == theirs.shape
    assert float((ours - theirs).abs().max()) <= TOL
    num_labels = config["num_labels"]
    expected = [] if num_labels == 1 else [config["id2label"].get(i, f"LABEL_{i}")
                                           for i in range(num_labels)] \
        if "id2label" in config else [f"LABEL_{i}" for i in range(num_labels)]
    assert labels["classes"] == expected
    assert ft.task == {"Audio": "audio-cls", "Text": "text-cls", "Vision": "image-cls"}[
        cls_name[8:].split("For")[0]]


def test_hf_ctc_model_imports_with_its_letters_and_blank(tmp_path: Path, capsys) -> None:
    # HF's blank is pad_token_id; here it is id 2, ours must become id 0 (rows reordered)
    symbols = ["|", "A", "<pad>", "B", "C", "D"]
    hf = _save_hf(tmp_path, "Data2VecAudioForCTC",
                  dict(AUDIO, vocab_size=len(symbols), pad_token_id=2, final_dropout=0.1))
    (tmp_path / "hf" / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}))
    out = _import(tmp_path, capsys)
    assert "'<pad>' (id 2)" in out
    model, ft, _, labels, _ = load_finetuned(tmp_path / "run")
    model.eval()
    assert labels["vocab"].symbols == [BLANK, "|", "A", "B", "C", "D"]
    assert ft.task == "asr" and ft.dropout == 0.1
    source = torch.randn(2, 4000)
    with torch.no_grad():
        ours, _ = model(source)
        theirs = hf(source).logits
    order = [2, 0, 1, 3, 4, 5]
    assert float((ours - theirs[..., order]).abs().max()) <= TOL


def test_imported_task_run_exports_back_to_the_same_hf_weights(tmp_path: Path, capsys) -> None:
    _save_hf(tmp_path, "Data2VecTextForSequenceClassification", dict(TEXT, num_labels=2))
    _tokenizer_files(tmp_path)
    _import(tmp_path, capsys)
    assert main(["export", "--to", "hf", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    before = load_file(tmp_path / "hf" / "model.safetensors")
    after = load_file(tmp_path / "back" / "model.safetensors")
    assert set(after) <= set(before)
    assert all(torch.equal(after[k], before[k]) for k in after)
    # what HF has and we do not: the position-id buffer only
    assert {k for k in set(before) - set(after)} <= {"data2vec_text.embeddings.position_ids",
                                                     "data2vec_text.embeddings.token_type_ids"}


def test_text_tokenizer_files_travel_with_the_import(tmp_path: Path, capsys) -> None:
    _save_hf(tmp_path, "Data2VecTextForSequenceClassification", dict(TEXT, num_labels=2))
    tok = _tokenizer_files(tmp_path)
    _import(tmp_path, capsys)
    _, _, _, _, loaded = load_finetuned(tmp_path / "run")
    assert loaded.encode("the cat") == tok.encode("the cat")


def test_ctc_without_vocab_and_options_without_equivalent_are_named(tmp_path: Path,
                                                                    capsys) -> None:
    args = ["import", "--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]
    _save_hf(tmp_path, "Data2VecAudioForCTC", dict(AUDIO, vocab_size=6))
    assert main(args) == 2
    assert "needs vocab.json" in capsys.readouterr().err
    _save_hf(tmp_path, "Data2VecAudioForSequenceClassification",
             dict(AUDIO, num_labels=2, use_weighted_layer_sum=True))
    assert main(args) == 2
    assert "use_weighted_layer_sum=true" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing half-written
