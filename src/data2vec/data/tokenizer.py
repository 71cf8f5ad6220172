"""Byte-level BPE (GPT-2 / RoBERTa style) on top of HuggingFace ``tokenizers``.

Special tokens of a vocabulary trained here have fixed ids::

    <s> = 0   <pad> = 1   </s> = 2   <unk> = 3   <mask> = 4

This is RoBERTa's order (``<s> <pad> </s> <unk>``, so pad_index 1 and the position convention
carry over) except that ``<mask>`` comes fifth instead of last (RoBERTa puts it at 50264, after
the BPE merges): a fixed small id keeps every special below ``NUM_SPECIAL_TOKENS``.
A vocabulary loaded from a GPT-2 / RoBERTa ``vocab.json`` keeps that file's ids; it must hold all
five specials (RoBERTa's does; GPT-2's has no ``<mask>`` and is refused).

Example::

    tok = BPETokenizer.train(["corpus.txt"], vocab_size=4096, out_dir=Path("bpe"))
    ids = tok.encode_sentence("Hello world")   # [0, ..., 2]
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data2vec.errors import DataError
from data2vec.files import read_text

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, PAD, EOS, UNK, MASK)
"""In id order for a vocabulary trained here."""
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"


def _byte_level(model: models.BPE) -> Tokenizer:
    """A GPT-2 style tokenizer around a BPE model: byte-level pre-tokenizer and decoder."""
    tok = Tokenizer(model)
    # No prefix space: RoBERTa's default, so "Hello" and " Hello" stay different tokens.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_vocab(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        vocab = json.loads(read_text(path, DataError, "JSON vocabulary"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not a valid JSON vocabulary: {e}") from None
    if not isinstance(vocab, dict) or not vocab or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in vocab.items()):
        raise DataError(f"{path}: expected a non-empty JSON object mapping token -> integer id")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    lines = read_text(path, DataError, "BPE merges file").splitlines()
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise DataError(f"{path}:{number}: expected two space-separated tokens, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _lines(files: Sequence[str | Path]) -> Iterator[str]:
    """Every line of every file, checked for existence first so a typo fails before training."""
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise DataError(f"corpus file not found: {path}")
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as handle:
            yield from handle


class BPETokenizer:
    """Byte-level BPE with ``<s> <pad> </s> <unk> <mask>`` specials; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, source: str = "<memory>") -> None:
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise DataError(f"{source}: vocabulary lacks the special token(s) {missing}; "
                            f"data2vec text needs all of {list(SPECIAL_TOKENS)}")
        self._ids = {t: vocab[t] for t in SPECIAL_TOKENS}
        self._vocab_size = max(vocab.values()) + 1
        # Split the specials off raw text as whole tokens (RoBERTa does): "a <mask> b" -> mask id.
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))

    # construction -------------------------------------------------------------------------------

    @classmethod
    def train(cls, files: Sequence[str | Path] | Iterable[str], vocab_size: int,
              out_dir: Path | None = None) -> BPETokenizer:
        """Learn merges from text files or raw text; save vocab.json + merges.txt when out_dir set.

        `files`: a list/tuple of paths, or any other iterable of text (e.g. ``iter(lines)``; a
        list of str is read as paths). Deterministic: the same corpus and size give the same
        vocabulary and merges.
        """
        if vocab_size <= NUM_SPECIAL_TOKENS + 256:
            raise DataError(f"vocab_size={vocab_size} must exceed the {NUM_SPECIAL_TOKENS} "
                            "specials + 256 byte symbols")
        is_paths = isinstance(files, list | tuple) and all(isinstance(f, str | Path)
                                                           for f in files)
        lines = _lines(files) if is_paths else iter(files)
        tok = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, show_progress=False,
            special_tokens=list(SPECIAL_TOKENS),  # the trainer gives them ids 0..4 in this order
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte: no <unk> ever
        tok.train_from_iterator(lines, trainer=trainer)
        out = cls(tok)
        if out.special_ids != set(range(NUM_SPECIAL_TOKENS)):
            raise DataError(f"trained vocabulary gave specials the ids {out._ids}, "
                            f"expected 0..{NUM_SPECIAL_TOKENS - 1}")
        if out_dir is not None:
            out.save(out_dir)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> BPETokenizer:
        """Read ``vocab.json`` + ``merges.txt`` (ours, or GPT-2 / RoBERTa's with their ids)."""
        directory = Path(directory)
        vocab_path, merges_path = directory / VOCAB_FILE, directory / MERGES_FILE
        vocab, merges = _read_vocab(vocab_path), _read_merges(merges_path)
        unknown = next(((a, b) for a, b in merges if a + b not in vocab), None)
        if unknown is not None:
            raise DataError(f"{merges_path}: merge {unknown} makes {''.join(unknown)!r}, "
                            f"which {vocab_path} does not contain")
        try:
            model = models.BPE(vocab=vocab, merges=merges)
        except Exception as e:  # the Rust side raises a bare Exception on bad input
            raise DataError(f"{directory}: cannot build a BPE model from {VOCAB_FILE} + "
                            f"{MERGES_FILE}: {e}") from None
        return cls(_byte_level(model), source=str(vocab_path))

    def save(self, directory: str | Path) -> None:
        """Write ``vocab.json`` and ``merges.txt`` into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.model.save(str(directory))

    # use ----------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without <s> / </s>."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_sentence(self, text: str) -> list[int]:
        """``[<s>] + encode(text) + [</s>]`` (one document line, as RoBERTa feeds it)."""
        return [self.bos_id, *self.encode(text), self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are written out as their strings."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary entry, or None."""
        return self._tok.token_to_id(token)

    @property
    def bos_id(self) -> int:
        return self._ids[BOS]

    @property
    def pad_id(self) -> int:
        return self._ids[PAD]

    @property
    def eos_id(self) -> int:
        return self._ids[EOS]

    @property
    def unk_id(self) -> int:
        return self._ids[UNK]

    @property
    def mask_id(self) -> int:
        return self._ids[MASK]

    @property
    def special_ids(self) -> set[int]:
        """Ids that masking must never touch nor draw as random replacements."""
        return set(self._ids.values())

    @property
    def vocab_size(self) -> int:
        """Rows the token embedding needs: one past the largest id."""
        return self._vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, specials={self._ids})"


__all__ = ["BOS", "EOS", "MASK", "NUM_SPECIAL_TOKENS", "PAD", "SPECIAL_TOKENS", "UNK",
           "BPETokenizer"]
