"""Text data: plain-text files (or a saved HuggingFace dataset) cut into blocks of BPE tokens.

File format (fairseq's ``complete_doc`` convention): one paragraph or sentence per line, a blank
line between documents. Every block is ``<s> … </s>`` and at most ``tokens_per_sample`` long.

- ``complete_doc``: a block never crosses a document boundary; a long document is split into
  consecutive blocks, the last one shorter (padded in the batch).
- ``none``: all documents form one stream (``</s>`` between documents), cut into equal blocks.

A saved HuggingFace dataset (a folder written by ``save_to_disk``) is read through the optional
``datasets`` package, imported only then: each row's ``text`` is a document.

Example::

    ds = TokenBlockDataset.from_path(Path("corpus/"), "train", tokenizer, 128, "complete_doc")
    ds[0]      # LongTensor [0, ..., 2], at most 128 ids
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data2vec.data.tokenizer import BPETokenizer
from data2vec.errors import DataError
from data2vec.files import read_text

BREAK_MODES = ("none", "complete_doc")
Document = list[str]  # the non-empty lines of one document


def is_hf_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or ((path / "state.json").is_file()
                                  and (path / "dataset_info.json").is_file()))


def text_files(path: str | Path, split: str = "train") -> list[Path]:
    """The .txt files for `split`: a file (or comma-separated files) as given, else
    ``<dir>/<split>.txt``, else (train only) every .txt file under the directory."""
    parts = [Path(p.strip()).expanduser() for p in str(path).split(",") if p.strip()]
    if len(parts) > 1 or (parts and parts[0].is_file()):
        missing = [p for p in parts if not p.is_file()]
        if missing:
            raise DataError(f"text file not found: {missing[0]}")
        return parts
    folder = parts[0] if parts else Path(".")
    if not folder.is_dir():
        raise DataError(f"text data not found: {folder}")
    if (folder / f"{split}.txt").is_file():
        return [folder / f"{split}.txt"]
    if split != "train":
        raise DataError(f"no {split}.txt in {folder}")
    held_out = {"valid.txt", "test.txt"}

    def corpus(p: Path) -> bool:  # not the tokenizer trained beside it (merges.txt), not hidden
        parts = p.relative_to(folder).parts
        return (p.name not in held_out and p.is_file() and parts[0] != "tokenizer"
                and not any(part.startswith(".") for part in parts))

    files = sorted(p for p in folder.rglob("*.txt") if corpus(p))
    if not files:
        raise DataError(f"no .txt files under {folder}")
    return files


def split_documents(lines: list[str]) -> list[Document]:
    """Blank lines separate documents; whitespace-only lines count as blank."""
    docs: list[Document] = []
    current: Document = []
    for line in lines:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            docs.append(current)
            current = []
    if current:
        docs.append(current)
    return docs


def read_documents(path: Path) -> list[Document]:
    """Documents of one UTF-8 text file; an empty or undecodable file -> DataError naming it."""
    text = read_text(path, DataError, "text file")
    docs = split_documents(text.splitlines())
    if not docs:
        raise DataError(f"{path}: empty text file (no non-blank line)", "empty")
    return docs


def usable_text_files(files: list[Path], skip_bad: bool = False,
                      messages: list[str] | None = None) -> tuple[list[Path], Counter[str]]:
    """(files that read as text, skipped counts by reason): a bad file raises, or with
    `skip_bad` is left out (its one-line reason appended to `messages`)."""
    usable: list[Path] = []
    skipped: Counter[str] = Counter()
    for file in files:
        try:
            read_documents(file)
        except DataError as e:
            if not skip_bad:
                raise
            skipped[e.reason] += 1
            if messages is not None:
                messages.append(str(e))
            continue
        usable.append(file)
    if not usable:
        where = f" ({files[0].parent})" if files else ""
        raise DataError(f"no readable text file among {len(files)}{where}; skipped "
                        f"{dict(skipped)}")
    return usable, skipped


def hf_documents(path: Path, split: str) -> list[Document]:
    """Documents of a saved HuggingFace dataset: one per row of its ``text`` column."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a saved HuggingFace dataset; reading it needs the optional "
                        "'datasets' package (pip install datasets)") from None
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path}: no split {split!r}; it has {sorted(data)}")
        data = data[split]
    if "text" not in data.column_names:
        raise DataError(f"{path}: no 'text' column; columns are {data.column_names}")
    docs = [doc for row in data["text"] for doc in split_documents(str(row).splitlines())]
    if not docs:
        raise DataError(f"{path}: no non-empty text in split {split!r}")
    return docs


def load_documents(path: str | Path, split: str = "train", skip_bad: bool = False,
                   messages: list[str] | None = None) -> tuple[list[Document], Counter[str]]:
    """(documents, skipped counts by reason) from .txt files or a saved HuggingFace dataset;
    with `skip_bad` each skipped file's one-line reason is appended to `messages`."""
    skipped: Counter[str] = Counter()
    if is_hf_dataset(Path(path).expanduser()):
        return hf_documents(Path(path).expanduser(), split), skipped
    docs: list[Document] = []
    for file in text_files(path, split):
        try:
            docs.extend(read_documents(file))
        except DataError as e:
            if not skip_bad:
                raise
            skipped[e.reason] += 1
            if messages is not None:
                messages.append(str(e))
    if not docs:
        raise DataError(f"no readable text in {path} (skipped {dict(skipped)})")
    return docs, skipped


def encode_document(doc: Document, tokenizer: BPETokenizer) -> np.ndarray:
    """Token ids of a document's lines, each after the first encoded with a leading space (so
    the byte-level BPE sees the line break as a word boundary)."""
    ids = [t for number, line in enumerate(doc)
           for t in tokenizer.encode(line if number == 0 else " " + line)]
    return np.array(ids, dtype=np.int32)


def make_blocks(documents: list[np.ndarray], tokens_per_sample: int, break_mode: str,
                bos_id: int, eos_id: int) -> list[np.ndarray]:
    """Cut token-id documents into ``[bos] + body + [eos]`` blocks of <= tokens_per_sample ids."""
    if break_mode not in BREAK_MODES:
        raise DataError(f"data.break_mode={break_mode!r} is not one of {BREAK_MODES}")
    body = tokens_per_sample - 2  # room left by <s> and </s>
    if body < 1:
        raise DataError(f"data.tokens_per_sample={tokens_per_sample} must be >= 3")
    if break_mode == "none":  # one stream, </s> between documents
        separator = np.array([eos_id], dtype=np.int32)
        pieces = [p for doc in documents for p in (doc, separator)][:-1]
        documents = [np.concatenate(pieces)] if pieces else []
    blocks = []
    for doc in documents:
        for start in range(0, len(doc), body):
            blocks.append(np.concatenate(([bos_id], doc[start:start + body], [eos_id]))
                          .astype(np.int32))
    return blocks


class TokenBlockDataset:
    """Blocks of token ids kept in one flat array; ``ds[i]`` is a (L,) LongTensor."""

    def __init__(self, blocks: list[np.ndarray]) -> None:
        if not blocks:
            raise DataError("no text blocks: the corpus produced no tokens")
        self.sizes = np.array([len(b) for b in blocks], dtype=np.int64)
        self.offsets = np.concatenate(([0], np.cumsum(self.sizes)))
        self.tokens = np.concatenate(blocks).astype(np.int32)
        self.skipped: Counter[str] = Counter()
        self.skip_messages: list[str] = []

    @classmethod
    def from_path(cls, path: str | Path, split: str, tokenizer: BPETokenizer,
                  tokens_per_sample: int, break_mode: str = "complete_doc",
                  skip_bad: bool = False) -> TokenBlockDataset:
        """Read, tokenise and block the corpus of `split`."""
        messages: list[str] = []
        docs, skipped = load_documents(path, split, skip_bad, messages)
        encoded = [encode_document(doc, tokenizer) for doc in docs]
        dataset = cls(make_blocks(encoded, tokens_per_sample, break_mode, tokenizer.bos_id,
                                  tokenizer.eos_id))
        dataset.skipped, dataset.skip_messages = skipped, messages
        return dataset

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> Tensor:
        start, end = self.offsets[index], self.offsets[index + 1]
        return torch.from_numpy(self.tokens[start:end].astype(np.int64))


def read_labelled_tsv(path: Path) -> list[tuple[str, str]]:
    """Rows ``label<TAB>text`` of a labelled text file (the demo's family task)."""
    rows = []
    for number, line in enumerate(read_text(path, DataError, "labelled TSV").splitlines(),
                                  start=1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or not label or not text.strip():
            raise DataError(f"{path}:{number}: expected 'label<TAB>text', got {line[:60]!r}")
        rows.append((label, text))
    if not rows:
        raise DataError(f"{path}: empty labelled file")
    return rows


__all__ = ["BREAK_MODES", "TokenBlockDataset", "encode_document", "hf_documents", "is_hf_dataset",
           "load_documents", "make_blocks", "read_documents", "read_labelled_tsv",
           "split_documents", "text_files", "usable_text_files"]
