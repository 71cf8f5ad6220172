"""Labelled data for fine-tuning, built on the data package: examples, subsets and batches.

Every task reads a split into a :class:`Labelled` set (a ``get(i, gen)`` that loads example i,
augmenting it when a generator is given, and a target per example), and :func:`batches` cuts it
into seeded batches collated into :class:`~data2vec.batch.Batch` objects.

Formats:

- ``asr``: fairseq manifests ``{split}.tsv`` + ``{split}.ltr`` (the demo speech data).
- ``audio-cls``: the manifest + an AudioSet-style ``{split}.csv`` (``YTID, start, end,
  "label,label"``; a row matches the audio file whose stem is its YTID) with the class list in
  ``class_labels_indices.csv`` (``index,mid,display_name``) or, without them, the demo task read
  from ``{split}.wrd``: which of the ten digit words a clip contains.
- ``image-cls``: an image folder ``{split}/<class>/*.png``.
- ``text-cls``: GLUE TSVs (``--glue TASK``: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE; split
  ``valid`` reads ``dev.tsv``, ``dev_matched.tsv`` for MNLI) or ``{split}.labelled.tsv``
  (``label<TAB>text``, the demo task).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data2vec.batch import Batch
from data2vec.data.collate import derive_seed, generator, pad_right
from data2vec.errors import DataError
from data2vec.files import read_text

STREAM_FT_ORDER, STREAM_FT_AUG = 10, 11

DIGIT_WORDS = ("ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE")


@dataclass
class Labelled:
    """A labelled split: ``get(i, gen)`` -> input tensor (augmented when gen is not None);
    ``targets[i]`` the label (class id, float score, multi-hot vector or letter ids);
    ``sizes[i]`` the input length (speech samples, tokens; 1 for images); ``info`` per-example
    lists (``names``: the file or text of each example; ``ltr``: transcripts) and other facts."""

    get: Callable[[int, torch.Generator | None], Tensor]
    targets: list[Any]
    sizes: np.ndarray
    classes: list[str]
    info: dict[str, Any]

    def __len__(self) -> int:
        return len(self.targets)


# ---------------------------------------------------------------------------------- subsets


def subset_by_duration(sizes: np.ndarray, minutes: float, sample_rate: int,
                       seed: int) -> list[int]:
    """Random utterances (seeded) until their total passes `minutes` of audio (Libri-light
    style low-resource split); indices in their original order."""
    order = np.random.default_rng(derive_seed(seed, 7)).permutation(len(sizes))
    budget = minutes * 60 * sample_rate
    total, keep = 0, []
    for i in order.tolist():
        if total >= budget:
            break
        keep.append(i)
        total += int(sizes[i])
    return sorted(keep)


def stratified_subset(labels: list[int], fraction: float, seed: int) -> list[int]:
    """About `fraction` of each class (at least one), seeded; indices in original order."""
    rng = np.random.default_rng(derive_seed(seed, 8))
    keep: list[int] = []
    labels_arr = np.asarray(labels)
    for c in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == c)
        n = max(1, int(round(fraction * len(members))))
        keep += rng.choice(members, size=n, replace=False).tolist()
    return sorted(keep)


def take(data: Labelled, indices: list[int]) -> Labelled:
    """The examples `indices` of `data` (per-example ``info`` lists follow them)."""
    index = list(indices)
    info = {k: [v[i] for i in index] if isinstance(v, list) and len(v) == len(data) else v
            for k, v in data.info.items()}
    return Labelled(lambda i, gen: data.get(index[i], gen), [data.targets[i] for i in index],
                    data.sizes[index], data.classes, {**info, "subset": len(index)})


# ---------------------------------------------------------------------------------- speech


def _audio(path: Path, split: str, max_sample_size: int):
    from data2vec.data.audio import AudioDataset

    dataset = AudioDataset.from_path(path, split, normalize=True, min_sample_size=0)
    if max_sample_size > 0 and int(dataset.sizes.max()) > max_sample_size:
        keep = np.flatnonzero(dataset.sizes <= max_sample_size)
        if len(keep) == 0:
            raise DataError(f"every {split} clip in {path} is longer than max_sample_size="
                            f"{max_sample_size}")
    else:
        keep = np.arange(len(dataset))
    return dataset, keep.tolist()


def speech_asr(path: Path, split: str, vocab, max_sample_size: int = 0) -> Labelled:
    """Waveforms (normalised per utterance) and letter ids from ``{split}.ltr``."""
    dataset, keep = _audio(path, split, max_sample_size)
    if "ltr" not in dataset.labels:
        raise DataError(f"no {split}.ltr beside the {split}.tsv manifest in {path}")
    texts = [dataset.labels["ltr"][i] for i in keep]
    targets = [vocab.encode(t) for t in texts]
    return Labelled(lambda i, gen: dataset[keep[i]], targets, dataset.sizes[keep], [],
                    {"ltr": texts, "names": [str(dataset.path(i)) for i in keep]})


def read_ltr(path: Path, split: str) -> list[str]:
    """The ``.ltr`` lines of a split (for the vocabulary)."""
    file = Path(path) / f"{split}.ltr"
    if not file.is_file():
        raise DataError(f"letter labels not found: {file}")
    return read_text(file, DataError, "letter transcript").splitlines()


def _audioset_labels(path: Path, split: str, files: list[str]) -> tuple[list[list[str]],
                                                                         list[str]] | None:
    table = Path(path) / f"{split}.csv"
    if not table.is_file():
        return None
    by_id: dict[str, list[str]] = {}
    for row in csv.reader(read_text(table, DataError, "label CSV").splitlines(),
                          skipinitialspace=True):
        if not row or row[0].startswith("#"):
            continue
        if len(row) < 4:
            raise DataError(f"{table}: expected 'YTID, start, end, \"labels\"', got {row}")
        by_id[row[0]] = [x for x in row[3].split(",") if x]
    labels = []
    for rel in files:
        stem = Path(rel).stem
        if stem not in by_id:
            raise DataError(f"{table}: no labels for audio file {rel} (YTID {stem})")
        labels.append(by_id[stem])
    index_file = Path(path) / "class_labels_indices.csv"
    if index_file.is_file():
        text = read_text(index_file, DataError, "class index CSV")
        rows = [r for r in csv.reader(text.splitlines()) if r and r[0] != "index"]
        classes = [r[1] for r in sorted(rows, key=lambda r: int(r[0]))]
    else:
        classes = sorted({x for row in labels for x in row})
    return labels, classes


def speech_tags(path: Path, split: str, classes: list[str] | None = None,
                max_sample_size: int = 0) -> Labelled:
    """Clip-level multi-hot targets: AudioSet CSV labels, else the demo digit-word task."""
    dataset, keep = _audio(path, split, max_sample_size)
    files = [dataset.files[i] for i in keep]
    found = _audioset_labels(path, split, files)
    if found is not None:
        labels, own_classes = found
    elif "wrd" in dataset.labels:
        labels = [sorted(set(dataset.labels["wrd"][i].split()) & set(DIGIT_WORDS)) for i in keep]
        own_classes = list(DIGIT_WORDS)
    else:
        raise DataError(f"no {split}.csv (AudioSet labels) or {split}.wrd in {path}")
    classes = classes or own_classes
    column = {c: j for j, c in enumerate(classes)}
    targets = []
    for row in labels:
        hot = torch.zeros(len(classes))
        for label in row:
            if label not in column:
                raise DataError(f"label {label!r} of split {split} is not among the "
                                f"{len(classes)} classes")
            hot[column[label]] = 1.0
        targets.append(hot)
    return Labelled(lambda i, gen: dataset[keep[i]], targets, dataset.sizes[keep], classes,
                    {"names": [str(dataset.path(i)) for i in keep]})


# ---------------------------------------------------------------------------------- images


def image_folder(path: Path, split: str, image_size: int, in_channels: int, stats,
                 crop_scale: tuple[float, float] = (0.35, 1.0), hflip: bool = False) -> Labelled:
    """An image folder split; augmentation (random resized crop, flip) only with a generator."""
    from data2vec.data.images import ImageFolderDataset, eval_transform, train_transform

    folder = Path(path) / split
    if not folder.is_dir():
        raise DataError(f"no {split}/ folder in {path}")
    dataset = ImageFolderDataset(folder, in_channels)
    if dataset.targets and dataset.targets[0] < 0:
        raise DataError(f"{folder}: images must sit in class subfolders for classification")

    def get(i: int, gen: torch.Generator | None) -> Tensor:
        image = dataset.load(i)
        if gen is None:
            return eval_transform(image, image_size, stats)
        return train_transform(image, image_size, crop_scale, hflip, stats, gen)

    return Labelled(get, list(dataset.targets), np.ones(len(dataset), dtype=np.int64),
                    list(dataset.classes), {"names": [str(f) for f in dataset.files]})


# ---------------------------------------------------------------------------------- text

# task -> (file of the valid split, sentence-1 column, sentence-2 column or None, label column,
# header row?, classes (None = regression))
GLUE: dict[str, tuple[str, int | str, int | str | None, int | str, bool, list[str] | None]] = {
    "cola": ("dev.tsv", 3, None, 1, False, ["0", "1"]),
    "sst2": ("dev.tsv", "sentence", None, "label", True, ["0", "1"]),
    "mrpc": ("dev.tsv", "#1 String", "#2 String", "Quality", True, ["0", "1"]),
    "stsb": ("dev.tsv", "sentence1", "sentence2", "score", True, None),
    "qqp": ("dev.tsv", "question1", "question2", "is_duplicate", True, ["0", "1"]),
    "mnli": ("dev_matched.tsv", "sentence1", "sentence2", "gold_label", True,
             ["contradiction", "entailment", "neutral"]),
    "qnli": ("dev.tsv", "question", "sentence", "label", True, ["entailment", "not_entailment"]),
    "rte": ("dev.tsv", "sentence1", "sentence2", "label", True, ["entailment", "not_entailment"]),
}
GLUE_METRICS = {"cola": "mcc", "stsb": "pearson_spearman", "mrpc": "accuracy_f1",
                "qqp": "accuracy_f1"}


def read_glue(path: Path, task: str, split: str) -> tuple[list[tuple[str, str | None]],
                                                          list[str], list[str] | None]:
    """(sentence pairs, raw labels, classes) of a GLUE task's TSV (split train | valid)."""
    if task not in GLUE:
        raise DataError(f"unknown GLUE task {task!r}; choose from {', '.join(GLUE)}")
    valid_file, col_a, col_b, col_y, header, classes = GLUE[task]
    file = Path(path) / ("train.tsv" if split == "train" else valid_file)
    if not file.is_file():
        raise DataError(f"GLUE {task}: file not found: {file}")
    lines = read_text(file, DataError, "GLUE TSV").splitlines()
    rows = [line.split("\t") for line in lines if line.strip()]
    names = rows[0] if header else []
    if header:
        rows = rows[1:]

    def column(key: int | str) -> int:
        if isinstance(key, int):
            return key
        if key not in names:
            raise DataError(f"{file}: no column {key!r} in the header {names}")
        return names.index(key)

    a, b, y = column(col_a), column(col_b) if col_b is not None else None, column(col_y)
    pairs, labels = [], []
    for number, row in enumerate(rows, start=2 if header else 1):
        if len(row) <= max(a, y, b or 0):
            raise DataError(f"{file}:{number}: expected more than {max(a, y, b or 0)} columns")
        pairs.append((row[a], row[b] if b is not None else None))
        labels.append(row[y])
    return pairs, labels, classes


def text_pairs(path: Path, split: str, glue: str) -> tuple[list[tuple[str, str | None]],
                                                           list[str], list[str] | None]:
    """GLUE rows or the demo ``{split}.labelled.tsv`` rows (classes from train)."""
    if glue:
        return read_glue(path, glue, split)
    from data2vec.data.text import read_labelled_tsv

    rows = read_labelled_tsv(Path(path) / f"{split}.labelled.tsv")
    train = read_labelled_tsv(Path(path) / "train.labelled.tsv")
    return [(t, None) for _, t in rows], [y for y, _ in rows], sorted({y for y, _ in train})


def encode_pair(tokenizer, a: str, b: str | None, max_len: int) -> Tensor:
    """``<s> A </s>`` or RoBERTa's pair form ``<s> A </s></s> B </s>``, truncated to max_len."""
    ids_a = tokenizer.encode(a)
    if b is None:
        body = ids_a[:max_len - 2]
        return torch.tensor([tokenizer.bos_id, *body, tokenizer.eos_id])
    ids_b = tokenizer.encode(b)
    room = max_len - 4
    while len(ids_a) + len(ids_b) > room:  # trim the longer side first
        if len(ids_a) >= len(ids_b):
            ids_a = ids_a[:-1]
        else:
            ids_b = ids_b[:-1]
    return torch.tensor([tokenizer.bos_id, *ids_a, tokenizer.eos_id, tokenizer.eos_id, *ids_b,
                         tokenizer.eos_id])


def text_labelled(path: Path, split: str, glue: str, tokenizer, max_len: int,
                  classes: list[str] | None = None) -> Labelled:
    """Token ids and targets (class ids, or float scores for STS-B)."""
    pairs, raw, own = text_pairs(path, split, glue)
    classes = own if classes is None else classes
    encoded = [encode_pair(tokenizer, a, b, max_len) for a, b in pairs]
    if classes:
        unknown = sorted(set(raw) - set(classes))
        if unknown:
            raise DataError(f"labels {unknown[:5]} of {split} are not among {classes}")
        targets: list[Any] = [classes.index(y) for y in raw]
    else:
        targets = [float(y) for y in raw]
    names = [a if b is None else f"{a}\t{b}" for a, b in pairs]
    return Labelled(lambda i, gen: encoded[i], targets,
                    np.array([len(e) for e in encoded], dtype=np.int64), classes or [],
                    {"names": names})


# ---------------------------------------------------------------------------------- batches


def collate(data: Labelled, indices: list[int], task: str, pad_id: int,
            gens: list[torch.Generator] | None) -> Batch:
    """Examples `indices` -> a Batch with `target` (and `target_lengths` for CTC)."""
    inputs = [data.get(i, gens[k] if gens else None) for k, i in enumerate(indices)]
    targets = [data.targets[i] for i in indices]
    if task == "image-cls":
        return Batch(source=torch.stack(inputs), target=torch.tensor(targets))
    source, padding = pad_right(inputs, pad_id if task == "text-cls" else 0.0)
    if task == "asr":
        labels, _ = pad_right([torch.tensor(t, dtype=torch.long) for t in targets], 0)
        lengths = torch.tensor([len(t) for t in targets])
        return Batch(source=source, padding_mask=padding, target=labels, target_lengths=lengths)
    if task == "audio-cls":
        return Batch(source=source, padding_mask=padding, target=torch.stack(targets))
    dtype = torch.float32 if isinstance(targets[0], float) else torch.long
    return Batch(source=source, padding_mask=padding, target=torch.tensor(targets, dtype=dtype))


def batches(data: Labelled, task: str, batch_size: int, seed: int, pad_id: int = 1,
            train: bool = True) -> Iterator[Batch]:
    """Training: endless seeded epochs (length-sorted chunks for speech, shuffled), augmented.
    Evaluation (train=False): one ordered pass, no augmentation."""
    n = len(data)
    if not train:
        for start in range(0, n, batch_size):
            yield collate(data, list(range(start, min(n, start + batch_size))), task, pad_id, None)
        return
    epoch = 0
    while True:
        rng = np.random.default_rng(derive_seed(seed, STREAM_FT_ORDER, epoch))
        order = rng.permutation(n)
        if task in ("asr", "audio-cls"):  # similar lengths together: less padding
            order = order[np.argsort(data.sizes[order], kind="stable")]
        chunks = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
        for j in rng.permutation(len(chunks)).tolist():
            gens = [generator(seed, STREAM_FT_AUG, epoch, i) for i in chunks[j]]
            yield collate(data, chunks[j], task, pad_id, gens)
        epoch += 1


__all__ = ["DIGIT_WORDS", "GLUE", "GLUE_METRICS", "Labelled", "batches", "collate",
           "encode_pair", "image_folder", "read_glue", "read_ltr", "speech_asr", "speech_tags",
           "stratified_subset", "subset_by_duration", "take", "text_labelled"]
