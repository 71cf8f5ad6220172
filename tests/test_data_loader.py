"""The pre-training loader: determinism, exact resume, epochs, workers, and the rank split."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data2vec.batch import Batch
from data2vec.config import Config, load_config
from data2vec.data.audio import write_manifest
from data2vec.data.demo import prepare_demo
from data2vec.data.loader import (
    PretrainLoader,
    build_pretrain_loader,
    load_or_train_tokenizer,
    resolve_data_path,
    sync_text_vocab,
)
from data2vec.errors import ConfigError, DataError
from data2vec.modalities.speech import frame_lengths, parse_conv_spec


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_demo("image", tmp_path_factory.mktemp("demo") / "image")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_demo("text", tmp_path_factory.mktemp("demo") / "text", vocab_size=512)


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 noise bursts of 0.4-1.6 s in a folder, with a train manifest."""
    root = tmp_path_factory.mktemp("speech")
    (root / "audio").mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        wave = 0.1 * rng.standard_normal(int(rng.integers(6_400, 25_600)))
        sf.write(root / "audio" / f"{i:02d}.wav", wave, 16_000, subtype="PCM_16")
    write_manifest(root / "audio", root)
    return root


def config(modality: str, path: Path, *overrides: str) -> Config:
    cfg = load_config(modality, "tiny", overrides=[f"data.path={path}", *overrides])
    if modality == "text":
        sync_text_vocab(cfg, load_or_train_tokenizer(cfg))
    return cfg


def take(loader: PretrainLoader, n: int) -> list[Batch]:
    return list(islice(loader, n))


def same(a: Batch, b: Batch) -> bool:
    def equal(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    return all(equal(getattr(a, f), getattr(b, f)) for f in
               ("source", "padding_mask", "mask", "student_source"))


MODALITY_ARGS = [("image", ("data.batch_size=16",)), ("text", ("data.batch_size=8",)),
                 ("speech", ("data.batch_size=4", "data.max_sample_size=12000",
                             "data.min_sample_size=4000"))]


@pytest.fixture
def data_dirs(image_dir: Path, text_dir: Path, speech_dir: Path) -> dict[str, Path]:
    return {"image": image_dir, "text": text_dir, "speech": speech_dir}


@pytest.mark.parametrize(("modality", "args"), MODALITY_ARGS)
def test_same_seed_same_batches_other_seed_other_batches(
        modality: str, args: tuple[str, ...], data_dirs: dict[str, Path]) -> None:
    first = take(build_pretrain_loader(config(modality, data_dirs[modality], *args)), 3)
    again = take(build_pretrain_loader(config(modality, data_dirs[modality], *args)), 3)
    other = take(build_pretrain_loader(config(modality, data_dirs[modality], *args,
                                              "run.seed=7")), 3)
    assert all(same(a, b) for a, b in zip(first, again, strict=True))
    assert not any(same(a, b) for a, b in zip(first, other, strict=True))
    assert all(b.mask is not None and b.mask.any() for b in first)


@pytest.mark.parametrize(("modality", "args"), MODALITY_ARGS)
def test_resume_from_state_dict_continues_exactly(
        modality: str, args: tuple[str, ...], data_dirs: dict[str, Path]) -> None:
    cfg = config(modality, data_dirs[modality], *args)
    reference = build_pretrain_loader(cfg)
    take(reference, 3)
    state = reference.state_dict()
    assert state == {"epoch": 0, "position": 3}
    expected = take(reference, 4)
    resumed = build_pretrain_loader(cfg)
    resumed.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(take(resumed, 4), expected, strict=True))


def test_epochs_advance_reshuffle_and_resume_across_the_boundary(image_dir: Path) -> None:
    cfg = config("image", image_dir, "data.batch_size=400")  # 1437 train images: 3 per epoch
    loader = build_pretrain_loader(cfg)
    assert loader.batches_per_epoch() == 3
    epoch0 = take(loader, 3)
    assert loader.state_dict() == {"epoch": 0, "position": 3}
    state = loader.state_dict()
    epoch1 = take(loader, 2)
    assert loader.state_dict() == {"epoch": 1, "position": 2}
    assert not same(epoch0[0], epoch1[0])  # reshuffled and re-augmented
    seen = {tuple(b.source[:, 0, 16, 16].tolist()) for b in epoch0}
    assert len(seen) == 3
    resumed = build_pretrain_loader(cfg)
    resumed.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(take(resumed, 2), epoch1, strict=True))


def test_workers_give_the_same_batches(image_dir: Path) -> None:
    cfg = config("image", image_dir, "data.batch_size=16")
    serial = take(build_pretrain_loader(cfg), 4)
    cfg.data.num_workers = 2
    parallel = build_pretrain_loader(cfg)
    take(parallel, 1)
    parallel.load_state_dict({"epoch": 0, "position": 1})  # restart the workers mid-epoch
    assert all(same(a, b) for a, b in zip(take(parallel, 3), serial[1:], strict=True))
    parallel.close()


def _rows(batch: Batch, i: int) -> tuple[torch.Tensor, ...]:
    """Example i's tensors without its padding (ranks pad to their own longest row)."""
    keep = slice(None) if batch.padding_mask is None else ~batch.padding_mask[i]
    student = () if batch.student_source is None else (batch.student_source[i][keep],)
    return (batch.source[i][keep], batch.mask[i][keep], *student)


@pytest.mark.parametrize(("modality", "args"), [("image", ()), ("text", ())])
def test_two_ranks_together_see_the_global_batch(
        modality: str, args: tuple[str, ...], data_dirs: dict[str, Path]) -> None:
    single = take(build_pretrain_loader(config(modality, data_dirs[modality], *args,
                                               "data.batch_size=8")), 2)
    ranks = [take(build_pretrain_loader(config(modality, data_dirs[modality], *args,
                                               "data.batch_size=4"), rank=r, world_size=2), 2)
             for r in range(2)]
    for step in range(2):
        together = [_rows(ranks[r][step], i) for r in range(2) for i in range(4)]
        alone = [_rows(single[step], i) for i in range(8)]
        for a, b in zip(together, alone, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_speech_batches_crop_to_shortest_or_pad(speech_dir: Path) -> None:
    args = ("data.batch_size=4", "data.max_sample_size=20000", "data.min_sample_size=4000")
    cropped = take(build_pretrain_loader(config("speech", speech_dir, *args)), 5)
    for batch in cropped:
        assert batch.padding_mask is None and batch.source.shape[1] <= 20_000
        std = batch.source.std(dim=1)  # crops of normalised utterances stay near unit scale
        assert torch.all((std > 0.8) & (std < 1.2))
        assert batch.mask.shape[0] == batch.source.shape[0]
        assert len(set(batch.mask.sum(1).tolist())) == 1  # same masked count per row
    cfg = config("speech", speech_dir, *args, "data.crop_to_shortest=false")
    padded = take(build_pretrain_loader(cfg), 5)
    assert any(b.padding_mask is not None for b in padded)
    for batch in padded:
        if batch.padding_mask is None:
            continue
        lengths = (~batch.padding_mask).sum(1)
        assert torch.all(batch.source[batch.padding_mask] == 0)
        frames = frame_lengths(lengths, parse_conv_spec(cfg.model.frontend.conv_spec))
        assert lengths.max() == batch.source.shape[1]
        for row, n in zip(batch.mask, frames.tolist(), strict=True):
            assert not row[max(n, 0):].any()  # padding frames are never masked


def test_speech_max_tokens_bounds_the_batch(speech_dir: Path) -> None:
    cfg = config("speech", speech_dir, "data.max_tokens=40000", "data.max_sample_size=20000",
                 "data.min_sample_size=4000", "data.crop_to_shortest=false")
    loader = build_pretrain_loader(cfg)
    sizes = [len(b) for b in take(loader, loader.batches_per_epoch())]
    batches = take(build_pretrain_loader(cfg), len(sizes))
    assert all(b.source.numel() <= 40_000 for b in batches)
    assert sum(sizes) == 40 - loader.skipped["short"] and max(sizes) >= 2


def test_v2_clones_give_independent_masks(image_dir: Path, text_dir: Path) -> None:
    image = next(build_pretrain_loader(config("image", image_dir, "data.batch_size=4",
                                              "version=2", "model.v2.clone_batch=3")))
    assert image.source.shape[0] == 4 and image.mask.shape[0] == 12
    assert not torch.equal(image.mask[0], image.mask[1])
    assert len(set(image.mask.sum(1).tolist())) == 1
    text = next(build_pretrain_loader(config("text", text_dir, "data.batch_size=4", "version=2",
                                             "model.v2.clone_batch=3")))
    assert text.mask.shape == (12, text.source.shape[1])
    assert text.student_source.shape == text.mask.shape
    assert torch.equal(text.student_source[~text.mask],
                       text.source.repeat_interleave(3, 0)[~text.mask])


def test_text_vocab_must_match_the_tokenizer(text_dir: Path) -> None:
    cfg = load_config("text", "tiny", overrides=[f"data.path={text_dir}",
                                                 "model.frontend.vocab_size=600"])
    with pytest.raises(ConfigError, match="vocab_size"):
        build_pretrain_loader(cfg)
    tokenizer = load_or_train_tokenizer(cfg)
    assert sync_text_vocab(cfg, tokenizer).model.frontend.vocab_size == tokenizer.vocab_size
    batch = next(build_pretrain_loader(cfg, tokenizer=tokenizer))
    assert int(batch.student_source.max()) < tokenizer.vocab_size
    assert torch.all(batch.source[:, 0] == tokenizer.bos_id)


def test_speech_batches_are_dealt_round_robin_to_ranks(speech_dir: Path) -> None:
    args = ("data.batch_size=4", "data.max_sample_size=12000", "data.min_sample_size=4000")
    single = take(build_pretrain_loader(config("speech", speech_dir, *args)), 4)
    ranks = [take(build_pretrain_loader(config("speech", speech_dir, *args), rank=r,
                                        world_size=2), 2) for r in range(2)]
    assert same(ranks[0][0], single[0]) and same(ranks[1][0], single[1])
    assert same(ranks[0][1], single[2]) and same(ranks[1][1], single[3])


def test_demo_data_is_prepared_when_no_path_is_given(tmp_path: Path) -> None:
    cfg = load_config("image", "tiny", overrides=[f"data.demo_dir={tmp_path}"])
    assert resolve_data_path(cfg) == tmp_path / "image"
    assert len(list((tmp_path / "image").rglob("*.png"))) == 1797
    cfg.data.path = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere"):
        resolve_data_path(cfg)


def test_tokenizer_is_trained_beside_the_corpus_once(tmp_path: Path, text_dir: Path) -> None:
    lines = (text_dir / "valid.txt").read_text().splitlines()
    (tmp_path / "corpus.txt").write_text("\n".join(lines[:400]) + "\n")
    cfg = load_config("text", "tiny", overrides=[f"data.path={tmp_path}", "data.vocab_size=300"])
    trained = load_or_train_tokenizer(cfg)
    assert trained.vocab_size == 300 and (tmp_path / "tokenizer" / "vocab.json").is_file()
    loaded = load_or_train_tokenizer(cfg)
    assert loaded.encode(lines[0]) == trained.encode(lines[0])
    sync_text_vocab(cfg, loaded)
    batch = next(build_pretrain_loader(cfg, tokenizer=loaded))
    assert int(batch.source.max()) < 300 and batch.source.shape[1] <= cfg.data.tokens_per_sample
