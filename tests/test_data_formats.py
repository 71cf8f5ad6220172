"""Data building blocks: manifests, bucketing, waveform ops, crops, token blocks, seeding."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from data2vec.data.audio import (
    AudioDataset,
    length_bucketed_batches,
    normalize_wave,
    random_crop,
    read_manifest,
    write_manifest,
)
from data2vec.data.collate import derive_seed, generator, pad_right
from data2vec.data.images import (
    HALF_STATS,
    IMAGENET_STATS,
    eval_transform,
    random_resized_crop_box,
    to_tensor,
    train_transform,
)
from data2vec.data.text import (
    is_hf_dataset,
    load_documents,
    make_blocks,
    split_documents,
    text_files,
)
from data2vec.errors import DataError


def test_manifest_round_trip_with_valid_split_and_labels(tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    lengths = [4_000 + 1_000 * i for i in range(10)]
    for i, n in enumerate(lengths):
        (audio / f"spk{i % 2}").mkdir(parents=True, exist_ok=True)
        sf.write(audio / f"spk{i % 2}" / f"{i}.flac", np.zeros(n) + 0.01 * (i + 1), 16_000)
    train, valid = write_manifest(audio, tmp_path, valid_fraction=0.2, seed=0)
    root, train_rows = read_manifest(train)
    _, valid_rows = read_manifest(valid)
    assert root == audio.resolve() and len(train_rows) == 8 and len(valid_rows) == 2
    assert sorted(n for _, n in train_rows + valid_rows) == lengths
    assert not {r for r, _ in train_rows} & {r for r, _ in valid_rows}
    (tmp_path / "train.wrd").write_text("".join(f"W{i}\n" for i in range(8)))
    ds = AudioDataset.from_path(tmp_path, "train", min_sample_size=6_000)
    kept = [i for i, (_, n) in enumerate(train_rows) if n >= 6_000]
    assert ds.labels["wrd"] == [f"W{i}" for i in kept]  # labels filtered with their files
    assert ds.skipped["short"] == 8 - len(kept)
    (tmp_path / "train.ltr").write_text("A |\n")
    with pytest.raises(DataError, match="train.ltr"):
        AudioDataset.from_path(tmp_path, "train")


def test_relative_manifest_root_is_relative_to_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "a.wav", np.zeros(100), 16_000)
    (tmp_path / "train.tsv").write_text("clips\na.wav\t100\n")
    root, rows = read_manifest(tmp_path / "train.tsv")
    assert root == tmp_path / "clips" and rows == [("a.wav", 100)]


@pytest.mark.parametrize(("max_tokens", "batch_size"), [(50_000, 0), (0, 5)])
def test_length_buckets_cover_every_example_within_budget(max_tokens: int,
                                                          batch_size: int) -> None:
    sizes = np.random.default_rng(0).integers(2_000, 30_000, size=200)
    batches = length_bucketed_batches(sizes, max_tokens, batch_size, np.random.default_rng(1),
                                      max_sample_size=20_000)
    assert sorted(i for b in batches for i in b) == list(range(200))
    capped = np.minimum(sizes, 20_000)
    for batch in batches:
        if max_tokens:
            assert len(batch) * capped[batch].max() <= max_tokens
        else:
            assert len(batch) <= batch_size
    # bucketing: within-batch spread is far below the spread of the data
    spread = np.mean([capped[b].max() - capped[b].min() for b in batches])
    assert spread < 0.1 * (capped.max() - capped.min())
    again = length_bucketed_batches(sizes, max_tokens, batch_size, np.random.default_rng(1),
                                    max_sample_size=20_000)
    assert again == batches


def test_normalize_and_crop() -> None:
    wave = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 3 + 2
    norm = normalize_wave(wave.numpy())
    assert norm.dtype == np.float32
    assert abs(float(norm.mean())) < 1e-5 and abs(float(norm.std()) - 1) < 1e-4
    crop = random_crop(wave, 1_000, generator(1, 2, 3))
    start = int(torch.nonzero(wave == crop[0])[0])
    assert crop.shape == (1_000,) and torch.equal(wave[start:start + 1_000], crop)
    assert torch.equal(random_crop(wave, 20_000, generator(0)), wave)


def test_random_resized_crop_box_respects_scale_and_ratio() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(64, 48, (0.3, 0.9), gen)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 64 and 0 <= top < bottom <= 48
        assert 0.25 < w * h / (64 * 48) < 0.95  # rounding moves the area a little
        assert 3 / 4 - 0.1 < w / h < 4 / 3 + 0.1
    # impossible scale -> central crop within the ratio range
    left, top, right, bottom = random_resized_crop_box(100, 10, (2.0, 3.0), gen)
    assert (right - left) / (bottom - top) == pytest.approx(4 / 3, abs=0.1)


def test_image_transforms_normalise_and_flip() -> None:
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, :16] = 255  # left half white
    image = Image.fromarray(pixels)
    x = to_tensor(image, HALF_STATS)
    assert x.shape == (3, 32, 32) and x.min() == -1 and x.max() == 1
    imagenet = to_tensor(image, IMAGENET_STATS)
    assert imagenet[0, 0, 0] == pytest.approx((1 - 0.485) / 0.229)
    full = (1.0, 1.0)  # whole image, so only the flip changes anything
    flips = [train_transform(image, 32, full, True, HALF_STATS, generator(0, i))
             for i in range(20)]
    left_white = [bool(f[0, 16, 2] > 0) for f in flips]
    assert 0 < sum(left_white) < 20  # both outcomes occur
    same = train_transform(image, 32, full, False, HALF_STATS, generator(0, 5))
    assert float(same[0, 16, 2]) > 0  # flip off: never mirrored
    assert eval_transform(image.resize((40, 30)), 24, HALF_STATS).shape == (3, 24, 24)


def test_token_blocks_respect_documents_and_length() -> None:
    docs = [np.arange(100 * d + 10, 100 * d + 10 + n, dtype=np.int32)
            for d, n in enumerate([5, 30, 1, 61])]
    blocks = make_blocks(docs, 16, "complete_doc", bos_id=0, eos_id=2)
    assert all(len(b) <= 16 and b[0] == 0 and b[-1] == 2 for b in blocks)
    bodies = [b[1:-1] for b in blocks]
    assert all(len(set(x // 100 for x in body.tolist())) == 1 for body in bodies)  # one doc each
    assert np.array_equal(np.concatenate(bodies), np.concatenate(docs))
    assert len(blocks) == sum(math.ceil(len(d) / 14) for d in docs)
    stream = make_blocks(docs, 16, "none", bos_id=0, eos_id=2)
    assert all(len(b) == 16 for b in stream[:-1])
    joined = np.concatenate([b[1:-1] for b in stream])
    assert np.array_equal(joined[joined != 2], np.concatenate(docs))
    with pytest.raises(DataError):
        make_blocks(docs, 2, "none", 0, 2)


def test_documents_and_text_file_selection(tmp_path: Path) -> None:
    assert split_documents(["a", "b", "", "  ", "c", ""]) == [["a", "b"], ["c"]]
    for name in ("train.txt", "valid.txt", "more.txt"):
        (tmp_path / name).write_text("x\n")
    assert text_files(tmp_path, "valid") == [tmp_path / "valid.txt"]
    assert text_files(tmp_path, "train") == [tmp_path / "train.txt"]
    (tmp_path / "train.txt").unlink()
    assert text_files(tmp_path, "train") == [tmp_path / "more.txt"]  # held-out files excluded
    both = f"{tmp_path / 'more.txt'},{tmp_path / 'valid.txt'}"
    assert text_files(both) == [tmp_path / "more.txt", tmp_path / "valid.txt"]
    with pytest.raises(DataError, match="test.txt"):
        text_files(tmp_path, "test")


def test_seeds_and_padding() -> None:
    seeds = {derive_seed(1, 2, epoch, index) for epoch in range(10) for index in range(100)}
    assert len(seeds) == 1_000 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(-1, 5) == derive_seed(-1, 5) != derive_seed(1, 5)
    a = torch.rand(5, generator=generator(3, 4))
    assert torch.equal(a, torch.rand(5, generator=generator(3, 4)))
    padded, mask = pad_right([torch.tensor([1, 2, 3]), torch.tensor([4])], 9)
    assert padded.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert mask.tolist() == [[False, False, False], [False, True, True]]
    assert pad_right([torch.tensor([1]), torch.tensor([2])], 0)[1] is None


class _FakeDataset:
    """Just enough of a ``datasets.Dataset`` for the reader: a column list and column access."""

    def __init__(self, rows: list[str]) -> None:
        self.rows, self.column_names = rows, ["text"]

    def __getitem__(self, column: str) -> list[str]:
        return self.rows


def test_saved_huggingface_dataset_is_read_through_datasets(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train"]}')
    assert is_hf_dataset(tmp_path) and not is_hf_dataset(tmp_path / "missing")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: a clear error
    with pytest.raises(DataError, match="pip install datasets"):
        load_documents(tmp_path)
    fake = types.ModuleType("datasets")
    fake.DatasetDict = dict
    fake.load_from_disk = lambda path: {"train": _FakeDataset(["One doc.\nLine two.", "",
                                                               "Next doc.\n\nThird."])}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    docs, _ = load_documents(tmp_path, "train")
    assert docs == [["One doc.", "Line two."], ["Next doc."], ["Third."]]
    with pytest.raises(DataError, match="no split 'valid'"):
        load_documents(tmp_path, "valid")
