"""Demo corpora: sizes, splits, formats, alignment of transcripts, caching and determinism."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from sklearn.datasets import load_digits

from data2vec.data.audio import read_manifest
from data2vec.data.demo import (
    MARKER,
    SPLIT_FRACTIONS,
    SPLITS,
    TEXT_FAMILIES,
    letters,
    prepare_demo,
    utterance_spec,
)
from data2vec.data.text import read_labelled_tsv, split_documents
from data2vec.data.tokenizer import BPETokenizer
from data2vec.errors import DataError


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_demo("image", tmp_path_factory.mktemp("demo") / "image", seed=0)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_demo("text", tmp_path_factory.mktemp("demo") / "text", seed=0, vocab_size=512)


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_demo("speech", tmp_path_factory.mktemp("demo") / "speech", seed=0, size=30)


def test_image_demo_has_every_digit_once_split_80_10_10_per_class(image_dir: Path) -> None:
    digits = load_digits()
    files = sorted(image_dir.rglob("*.png"))
    assert len(files) == len(digits.images)
    assert len({f.stem for f in files}) == len(files)  # each source image exactly once
    counts = Counter((f.parts[-3], int(f.parts[-2])) for f in files)
    for label in range(10):
        total = int((digits.target == label).sum())
        for split, fraction in zip(SPLITS, SPLIT_FRACTIONS, strict=True):
            assert abs(counts[split, label] - fraction * total) <= 1.5, (split, label)


def test_image_demo_pngs_are_32x32_upsampled_digits(image_dir: Path) -> None:
    digits = load_digits()
    files = sorted(image_dir.rglob("*.png"))
    assert {Image.open(f).size for f in files} == {(32, 32)}
    for f in files[::200]:
        index, label = int(f.stem), int(f.parts[-2])
        assert digits.target[index] == label
        small = np.asarray(Image.open(f).resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
        corr = np.corrcoef(small.ravel(), digits.images[index].ravel())[0, 1]
        assert corr > 0.9, (f, corr)


def test_demo_is_cached_and_rebuilt_on_force(image_dir: Path) -> None:
    marker = image_dir / MARKER
    before = marker.stat().st_mtime_ns
    assert prepare_demo("image", image_dir, seed=0) == image_dir
    assert marker.stat().st_mtime_ns == before  # cache hit: nothing rewritten
    other = prepare_demo("image", image_dir.parent / "image_seed1", seed=1)
    split_of = {f.name: f.parts[-3] for f in image_dir.rglob("*.png")}
    moved = sum(split_of[f.name] != f.parts[-3] for f in other.rglob("*.png"))
    assert moved > 100  # another seed gives another split
    assert not list(image_dir.parent.glob(".*tmp*"))  # no temporary directory left behind
    foreign = image_dir.parent / "photos"
    foreign.mkdir()
    (foreign / "keep.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not a demo corpus"):
        prepare_demo("image", foreign)
    assert (foreign / "keep.jpg").read_bytes() == b"x"


def test_text_demo_documents_are_unique_and_labelled(text_dir: Path) -> None:
    docs = []
    for split in SPLITS:
        lines = (text_dir / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        split_docs = split_documents(lines)
        assert len(split_docs) > 10
        docs.extend("\n".join(d) for d in split_docs)
    assert len(set(docs)) == len(docs)
    for split in SPLITS:
        rows = read_labelled_tsv(text_dir / f"{split}.labelled.tsv")
        labels = Counter(label for label, _ in rows)
        assert len(labels) >= 3 and set(labels) <= set(TEXT_FAMILIES)
        assert all(len(text.split()) >= 8 for _, text in rows)
    tokenizer = BPETokenizer.load(text_dir / "tokenizer")
    assert tokenizer.vocab_size == 512
    sample = docs[0].splitlines()[0]
    assert len(tokenizer.encode(sample)) < len(sample.encode())  # merges compress English prose


def test_speech_demo_manifest_audio_and_transcripts_align(speech_dir: Path) -> None:
    listed, durations, letter_counts = 0, [], []
    for split in SPLITS:
        root, entries = read_manifest(speech_dir / f"{split}.tsv")
        assert root == speech_dir
        words = (speech_dir / f"{split}.wrd").read_text().splitlines()
        ltr = (speech_dir / f"{split}.ltr").read_text().splitlines()
        assert len(words) == len(ltr) == len(entries) > 0
        for (rel, size), wrd, ltr_line in zip(entries, words, ltr, strict=True):
            info = sf.info(str(root / rel))
            assert info.samplerate == 16_000 and info.frames == size and info.channels == 1
            spec = utterance_spec(0, int(Path(rel).stem))
            assert wrd == " ".join(spec["words"]).upper()
            assert ltr_line == letters(spec["words"]) and ltr_line.replace(" ", "").replace(
                "|", "") == wrd.replace(" ", "")
            wave, _ = sf.read(str(root / rel))
            assert np.sqrt(np.mean(wave**2)) > 0.02 and np.abs(wave).max() > 0.1  # not silent
            durations.append(size)
            letter_counts.append(len(wrd.replace(" ", "")))
        listed += len(entries)
    assert listed == len(list(speech_dir.rglob("*.wav"))) == 30
    # transcripts belong to their clips: longer transcripts are longer audio
    assert np.corrcoef(durations, letter_counts)[0, 1] > 0.6


def test_speech_demo_is_deterministic(tmp_path: Path, speech_dir: Path) -> None:
    def digests(root: Path) -> dict[str, str]:
        return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob("*.wav")}

    # Clip i depends on (seed, i) only: a 6-clip build reproduces the first clips of the
    # 30-clip build bit for bit, whatever split they landed in.
    small = digests(prepare_demo("speech", tmp_path / "small", seed=0, size=6))
    large = digests(speech_dir)
    assert len(small) == 6 and all(large[name] == digest for name, digest in small.items())
    other = digests(prepare_demo("speech", tmp_path / "other", seed=1, size=6))
    assert not set(other.values()) & set(small.values())
    spec_a, spec_b = utterance_spec(3, 0), utterance_spec(4, 0)
    assert spec_a != spec_b
    assert 120 <= spec_a["rate"] <= 220 and 20 <= spec_a["pitch"] <= 80
