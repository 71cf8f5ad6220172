"""`data2vec.load` and `data2vec extract`: one loader for every kind of checkpoint, features equal
to the model's own block outputs, and padding safety, for 3 modalities x 2 versions.

The reference for "the model's layer outputs" is the network itself, read with forward hooks on
its blocks (the loader uses the encoder's explicit layer API instead).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import data2vec
from data2vec.build import build_model
from data2vec.cli import main
from data2vec.config import load_config
from data2vec.data.tokenizer import BPETokenizer
from data2vec.errors import DataError
from data2vec.extract import read_features
from data2vec.interop.common import ImportReport, write_run

TOL = 1e-5
SMALL = ["model.encoder.depth=2", "model.objective.top_k=1"]
V2_SMALL = {"image": ["model.v2.prenet_depth=0"], "text": [], "speech": []}
TEXT = ["the quick brown fox jumps over the lazy dog", "a cat", "data to vec in three words",
        "hello world, this line is somewhat longer than the others are"]


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero everywhere: zero-initialised tables and tokens would hide position mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _run(tmp_path: Path, modality: str, version: int, *extra: str) -> Path:
    overrides = [*SMALL, *(V2_SMALL[modality] if version == 2 else []), *extra]
    cfg = load_config(modality, "tiny", version, None, overrides)
    model = build_model(cfg)
    _perturb(model)
    run = tmp_path / f"{modality}-v{version}"
    write_run(run, cfg, model, ImportReport("test"))
    if modality == "text":
        BPETokenizer.train(iter(TEXT * 20), 300, run / "tokenizer")
    return run


def _inputs(tmp_path: Path, modality: str) -> list:
    """Raw inputs of different lengths (images: different sizes, resized by the model)."""
    rng = np.random.default_rng(0)
    if modality == "text":
        return TEXT
    paths = []
    for i, size in enumerate((5200, 3400, 8000)):
        path = tmp_path / f"in{i}.{'wav' if modality == 'speech' else 'png'}"
        if modality == "speech":
            sf.write(path, rng.normal(0, 0.1, size).astype(np.float32), 16000)
        else:
            side = 20 + 6 * i
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _block_outputs(model: data2vec.LoadedModel, source, padding) -> list[torch.Tensor]:
    """Each block's output read with hooks from the network's own forward."""
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o[0]))
             for b in model.encoder.blocks]
    try:
        with torch.no_grad():
            out, _ = model.network.encode(source, padding)
    finally:
        for h in hooks:
            h.remove()
    return [*seen, out.x]


CASES = [(m, v) for m in ("speech", "image", "text") for v in (1, 2)]


@pytest.mark.parametrize(("modality", "version"), CASES)
def test_features_are_the_block_outputs_and_padding_safe(tmp_path: Path, modality: str,
                                                         version: int) -> None:
    model = data2vec.load(_run(tmp_path, modality, version))
    assert model.task is None and model.version == version and not model.training
    items = _inputs(tmp_path, modality)
    source, padding = model.preprocess(items)
    if modality != "image":
        assert padding is not None and padding.any()  # the test really pads
    features = model.extract_features(source, "all", padding)
    assert sorted(features.layers) == list(range(model.depth + 1))
    blocks = _block_outputs(model, source, padding)
    for i in range(1, model.depth + 1):  # layer i = output of block i, every position
        assert torch.allclose(features.layers[i], blocks[i - 1], atol=TOL)
    final = model.encoder.final_norm(features.layers[model.depth])
    assert torch.allclose(final, blocks[-1], atol=TOL)  # the encoder's own output
    for index, item in enumerate(items):  # a padded item equals the item alone
        alone = model.extract_features([item], "all")
        for layer, x in features.item(index).items():
            assert x.shape == alone.item(0)[layer].shape
            assert torch.allclose(x, alone.item(0)[layer], atol=TOL), (index, layer)


def test_speech_features_are_padding_safe_for_a_model_that_zeroes_padding_once(
        tmp_path: Path) -> None:
    """HF / fairseq 1.0 models (pos_conv_padding 'input') leak padding into real frames in their
    own forward; extraction still gives each item's features alone."""
    model = data2vec.load(_run(tmp_path, "speech", 1, "model.frontend.pos_conv_padding=input"))
    items = _inputs(tmp_path, "speech")
    source, padding = model.preprocess(items)
    own = _block_outputs(model, source, padding)[-1]
    alone = model.extract_features([items[1]], -1).item(0)[model.depth]
    batched = model.extract_features(source, -1, padding).item(1)[model.depth]
    assert not torch.allclose(own[1, :len(alone)], alone, atol=1e-3)  # the model's own way leaks
    assert torch.allclose(batched, alone, atol=TOL)


def test_extract_cli_writes_npy_and_safetensors_equal_to_the_model(tmp_path: Path,
                                                                    capsys) -> None:
    run = _run(tmp_path, "text", 1)
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(TEXT) + "\n\n")  # the blank line is not an input
    model = data2vec.load(run)
    expected = [model.extract_features([t], [1, 2]).stacked(0).numpy() for t in TEXT]
    for fmt in ("npy", "safetensors"):
        out = tmp_path / fmt
        assert main(["extract", str(run), str(lines), "--layer", "all", "--out", str(out),
                     "--format", fmt, "--batch-size", "3"]) == 0
        meta = json.loads((out / "extract.json").read_text())
        assert meta["count"] == len(TEXT) and meta["layers"] == [0, 1, 2]
        records = [json.loads(r) for r in (out / "index.jsonl").read_text().splitlines()]
        assert [r["input"] for r in records] == [f"{lines}:{n}" for n in range(1, 5)]
        arrays = read_features(out)
        for got, want in zip(arrays, expected, strict=True):
            assert got.shape == (3, *want.shape[1:])
            np.testing.assert_allclose(got[1:], want, atol=TOL)
    assert main(["extract", str(run), str(lines), "--layer", "2", "--out",
                 str(tmp_path / "one")]) == 0
    assert read_features(tmp_path / "one")[0].shape[0] == 1
    assert "4 inputs" in capsys.readouterr().out


def test_extract_errors_are_one_line(tmp_path: Path, capsys) -> None:
    run = _run(tmp_path, "image", 1)
    assert main(["extract", str(run), str(tmp_path / "nope.png"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    images = _inputs(tmp_path, "image")
    assert main(["extract", str(run), str(images[0]), "--layer", "9", "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "layer 9 does not exist" in err and "\n" not in err
    with pytest.raises(DataError, match="'all' or layer numbers"):
        data2vec.load(run).layer_indices("last")


def test_load_reads_a_fine_tuned_run_an_hf_directory_and_a_fairseq_file(tmp_path: Path) -> None:
    from data2vec.finetune.ctc import Vocabulary
    from data2vec.interop.hf import export_hf

    # pre-trained -> HF directory: the HF export loads back with the same features
    run = _run(tmp_path, "speech", 1)
    ours = data2vec.load(run)
    export_hf(run, tmp_path / "hf")
    hf = data2vec.load(tmp_path / "hf")
    items = _inputs(tmp_path, "speech")[:1]
    assert torch.allclose(ours.extract_features(items, -1).layers[2],
                          hf.extract_features(items, -1).layers[2], atol=TOL)
    # a fine-tuned run (the CTC head written as `data2vec finetune` writes it)
    from data2vec.build import build_task_model
    from data2vec.config import to_dict
    from data2vec.finetune.loop import FinetuneConfig

    vocab = Vocabulary(["<blank>", "A", "B", "|"])
    task = build_task_model(ours.cfg, "asr", len(vocab))
    write_run(tmp_path / "ft", ours.cfg, task, ImportReport("test"),
              finetune=to_dict(FinetuneConfig(task="asr")), labels={"vocab": vocab.symbols})
    tuned = data2vec.load(tmp_path / "ft")
    assert tuned.task == "asr" and tuned.labels["vocab"].symbols == vocab.symbols
    source, padding = tuned.preprocess(items)
    assert tuned(source, padding).shape[-1] == len(vocab)
    # a released fairseq file, read straight from the .pt
    fairseq = Path(__file__).parent / "data" / "fairseq" / "text_v1.pt"
    loaded = data2vec.load(fairseq)
    assert loaded.modality == "text" and loaded.task is None
    ids = torch.tensor([[0, 5, 9, 2]])
    assert loaded.extract_features(ids, "all").layers[loaded.depth].shape == (1, 4,
                                                                              loaded.frontend.dim)
    with pytest.raises(TypeError, match="extract_features"):
        loaded(ids)
