"""CTC over letters: the vocabulary, greedy decoding, an ARPA n-gram word LM and a prefix beam
search that consults it.

Letters come from fairseq ``.ltr`` labels (``T H E | C A T |``): ``|`` ends a word. The CTC blank is
id 0. The LM is a plain back-off n-gram over words read from (or written to) an ARPA file, so no
compiled decoder is needed; log-probabilities in ARPA files are base 10.

Example::

    vocab = Vocabulary.from_ltr(["C A T |", "D O G |"])
    ids = vocab.encode("C A T |")                  # [2, 1, 6, 5]
    hyps = greedy_decode(log_probs, lengths)       # (B, T, V) -> id lists, repeats/blanks removed
    lm = NgramLM.from_arpa(Path("lm.arpa"))
    text = beam_search(log_probs[0], vocab, lm, beam=16, lm_weight=1.0, word_score=0.0)
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data2vec.errors import DataError
from data2vec.files import read_text

BLANK = "<blank>"
WORD_END = "|"
LN10 = math.log(10.0)
NEG_INF = -math.inf
UNK, BOS, EOS = "<unk>", "<s>", "</s>"


# ---------------------------------------------------------------------------------- vocabulary


@dataclass
class Vocabulary:
    """Letters of a CTC head: id 0 is the blank, then the symbols in sorted order."""

    symbols: list[str]

    @classmethod
    def from_ltr(cls, lines: Iterable[str]) -> Vocabulary:
        """Every space-separated symbol of the ``.ltr`` lines (``|`` included), blank first."""
        seen = sorted({s for line in lines for s in line.split()})
        if not seen:
            raise DataError("no letters in the .ltr labels: cannot build a CTC vocabulary")
        return cls([BLANK, *seen])

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def word_end(self) -> int:
        """Id of ``|`` (-1 when absent)."""
        return self.symbols.index(WORD_END) if WORD_END in self.symbols else -1

    def encode(self, ltr: str) -> list[int]:
        """Ids of a ``.ltr`` line; an unknown letter is an error naming it."""
        index = {s: i for i, s in enumerate(self.symbols)}
        try:
            return [index[s] for s in ltr.split()]
        except KeyError as e:
            raise DataError(f"letter {e.args[0]!r} is not in the CTC vocabulary "
                            f"({''.join(self.symbols[1:])})") from None

    def to_words(self, ids: Iterable[int]) -> str:
        """Collapsed ids -> words separated by single spaces (``|`` = word end)."""
        text = "".join(" " if i == self.word_end else self.symbols[i] for i in ids if i > 0)
        return " ".join(text.split())


def ltr_to_words(ltr: str) -> str:
    """``T H E | C A T |`` -> ``THE CAT``."""
    return " ".join("".join(ltr.split()).replace(WORD_END, " ").split())


# ---------------------------------------------------------------------------------- greedy


def collapse(path: Iterable[int], blank: int = 0) -> list[int]:
    """Best-path CTC rule: merge repeated ids, then drop blanks (``a a - a`` -> ``a a``)."""
    out, previous = [], None
    for i in path:
        if i != previous and i != blank:
            out.append(int(i))
        previous = i
    return out


def greedy_decode(log_probs: Tensor, lengths: Tensor | None = None) -> list[list[int]]:
    """Argmax per frame, collapsed; log_probs (B, T, V), lengths (B,) real frames."""
    best = log_probs.argmax(-1).cpu()  # (B, T)
    if lengths is None:
        lengths = torch.full((best.shape[0],), best.shape[1])
    return [collapse(best[b, :int(lengths[b])].tolist()) for b in range(best.shape[0])]


# ---------------------------------------------------------------------------------- n-gram LM


@dataclass
class NgramLM:
    """Back-off n-gram word LM (ARPA semantics): log10 probabilities and back-off weights."""

    order: int
    probs: dict[tuple[str, ...], float] = field(default_factory=dict)
    backoffs: dict[tuple[str, ...], float] = field(default_factory=dict)

    @classmethod
    def from_arpa(cls, path: Path) -> NgramLM:
        """Read an ARPA file (``\\data\\``, ``\\N-grams:`` sections, ``\\end\\``)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"LM file not found: {path}")
        lm, section = cls(order=0), 0
        for number, raw in enumerate(read_text(path, DataError, "ARPA LM").splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("ngram ") or line in ("\\data\\", "\\end\\"):
                continue
            if line.startswith("\\") and line.endswith("-grams:"):
                section = int(line[1:line.index("-")])
                lm.order = max(lm.order, section)
                continue
            parts = line.split()
            if section == 0 or len(parts) < section + 1:
                raise DataError(f"{path}:{number}: not an ARPA entry: {raw[:60]!r}")
            words = tuple(parts[1:1 + section])
            lm.probs[words] = float(parts[0])
            if len(parts) > section + 1:
                lm.backoffs[words] = float(parts[section + 1])
        if lm.order == 0 or not lm.probs:
            raise DataError(f"{path}: no n-grams found (expected an ARPA file)")
        return lm

    def log10_prob(self, word: str, history: tuple[str, ...]) -> float:
        """log10 P(word | history) with ARPA back-off; unknown words use ``<unk>`` (or -99)."""
        history = history[-(self.order - 1):] if self.order > 1 else ()
        if (word,) not in self.probs:
            word = UNK
        penalty = 0.0
        while True:
            key = (*history, word)
            if key in self.probs:
                return self.probs[key] + penalty
            if not history:
                return -99.0 + penalty  # not even <unk> in the model
            penalty += self.backoffs.get(history, 0.0)
            history = history[1:]

    def contains(self, word: str) -> bool:
        """Whether `word` is in the unigram vocabulary."""
        return (word,) in self.probs


def write_arpa(sentences: Iterable[str], path: Path, order: int = 2,
               discount: float = 0.5) -> Path:
    """A small back-off LM over whitespace-split sentences, written as ARPA.

    Absolute discounting: every seen n-gram gives up `discount` counts, which go to the lower
    order through a back-off weight chosen so each history's distribution sums to one. Unigrams
    hand their mass to ``<unk>``. Enough for demo transcripts; use KenLM for real corpora.
    """
    if order < 1:
        raise DataError(f"LM order must be >= 1, got {order}")
    counts: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(order + 1)]
    for sentence in sentences:
        words = [BOS, *sentence.split(), EOS]
        for n in range(1, order + 1):
            for i in range(len(words) - n + 1):
                gram = tuple(words[i:i + n])
                if n == 1 and gram == (BOS,):
                    continue
                counts[n][gram] += 1
    if not counts[1]:
        raise DataError("no words to build an LM from")
    probs: dict[tuple[str, ...], float] = {}
    total = sum(counts[1].values())
    kept = {g: c - discount for g, c in counts[1].items()}
    for gram, c in kept.items():
        probs[gram] = c / total
    probs[(UNK,)] = discount * len(kept) / total
    probs[(BOS,)] = 0.0
    backoffs: dict[tuple[str, ...], float] = {}
    for n in range(2, order + 1):
        by_history: dict[tuple[str, ...], dict[str, int]] = defaultdict(dict)
        for gram, c in counts[n].items():
            by_history[gram[:-1]][gram[-1]] = c
        for history, followers in by_history.items():
            h_total = sum(followers.values())
            for word, c in followers.items():
                probs[(*history, word)] = (c - discount) / h_total
            left = discount * len(followers) / h_total
            lower = sum(_lower_prob(probs, history[1:], w) for w in followers)
            backoffs[history] = left / max(1e-12, 1.0 - lower)
    _write(path, order, probs, backoffs)
    return Path(path)


def _lower_prob(probs: dict[tuple[str, ...], float], history: tuple[str, ...], word: str) -> float:
    key = (*history, word)
    while key not in probs and len(key) > 1:
        key = key[1:]
    return probs.get(key, 0.0)


def _write(path: Path, order: int, probs: dict[tuple[str, ...], float],
           backoffs: dict[tuple[str, ...], float]) -> None:
    def log10(p: float) -> float:
        return math.log10(p) if p > 0 else -99.0

    lines = ["\\data\\"]
    for n in range(1, order + 1):
        lines.append(f"ngram {n}={sum(1 for g in probs if len(g) == n)}")
    for n in range(1, order + 1):
        lines += ["", f"\\{n}-grams:"]
        for gram in sorted(g for g in probs if len(g) == n):
            entry = f"{log10(probs[gram]):.6f}\t{' '.join(gram)}"
            if n < order and gram in backoffs:
                entry += f"\t{log10(backoffs[gram]):.6f}"
            lines.append(entry)
    lines += ["", "\\end\\", ""]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines), encoding="utf-8")


# ---------------------------------------------------------------------------------- beam search


@dataclass
class _Beam:
    blank: float = NEG_INF  # ln P(prefix, path ends in blank)
    non_blank: float = NEG_INF  # ln P(prefix, path ends in its last letter)
    lm: float = 0.0  # weighted LM score + word bonuses of the finished words
    words: tuple[str, ...] = ()
    partial: str = ""

    @property
    def acoustic(self) -> float:
        return float(np.logaddexp(self.blank, self.non_blank))


def _lm_bonus(lm: NgramLM | None, word: str, history: tuple[str, ...], lm_weight: float,
              word_score: float) -> float:
    bonus = word_score
    if lm is not None:
        bonus += lm_weight * lm.log10_prob(word, (BOS, *history)) * LN10
    return bonus


def beam_search(log_probs: Tensor, vocab: Vocabulary, lm: NgramLM | None = None, beam: int = 16,
                lm_weight: float = 1.0, word_score: float = 0.0,
                prune_log_prob: float = -12.0) -> str:
    """CTC prefix beam search over one utterance's (T, V) log-probabilities -> words.

    A word gets its LM score (times `lm_weight`, natural log) plus `word_score` when its ``|`` is
    emitted and, for the last word, at the end (with ``</s>``). Letters below `prune_log_prob`
    in a frame are not expanded. Without an LM it is a plain prefix search.
    """
    lp = log_probs.detach().float().cpu().numpy()  # (T, V)
    end = vocab.word_end
    beams: dict[tuple[int, ...], _Beam] = {(): _Beam(blank=0.0)}
    for t in range(lp.shape[0]):
        frame = lp[t]
        candidates = [c for c in np.flatnonzero(frame > prune_log_prob).tolist() if c != 0]
        nxt: dict[tuple[int, ...], _Beam] = {}

        def entry(prefix: tuple[int, ...], like: _Beam, nxt=nxt) -> _Beam:
            if prefix not in nxt:
                nxt[prefix] = _Beam(lm=like.lm, words=like.words, partial=like.partial)
            return nxt[prefix]

        for prefix, b in beams.items():
            total = b.acoustic
            stay = entry(prefix, b)  # blank, or the last letter repeated, keeps the prefix
            stay.blank = np.logaddexp(stay.blank, total + frame[0])
            if prefix:
                stay.non_blank = np.logaddexp(stay.non_blank, b.non_blank + frame[prefix[-1]])
            for c in candidates:
                if c == end and (not prefix or prefix[-1] == end):
                    if not prefix:  # a leading word end is silence: it acts as a blank
                        stay.blank = np.logaddexp(stay.blank, total + frame[c])
                    continue
                # a repeated letter needs a blank in between (b.blank); otherwise any path
                via = b.blank if prefix and c == prefix[-1] else total
                new = prefix + (c,)
                if new not in nxt:
                    nxt[new] = _extend(b, c, vocab, lm, lm_weight, word_score)
                nxt[new].non_blank = np.logaddexp(nxt[new].non_blank, via + frame[c])
        ranked = sorted(nxt.items(), key=lambda kv: kv[1].acoustic + kv[1].lm, reverse=True)
        beams = dict(ranked[:beam])
    return _best_words(beams, lm, lm_weight, word_score)


def _extend(b: _Beam, c: int, vocab: Vocabulary, lm: NgramLM | None, lm_weight: float,
            word_score: float) -> _Beam:
    """The beam state after appending letter `c` (scores the word that `|` completes)."""
    if c == vocab.word_end:
        bonus = _lm_bonus(lm, b.partial, b.words, lm_weight, word_score)
        return _Beam(lm=b.lm + bonus, words=(*b.words, b.partial), partial="")
    return _Beam(lm=b.lm, words=b.words, partial=b.partial + vocab.symbols[c])


def _best_words(beams: dict[tuple[int, ...], _Beam], lm: NgramLM | None, lm_weight: float,
                word_score: float) -> str:
    best, best_score = "", NEG_INF
    for b in beams.values():
        words, score = b.words, b.acoustic + b.lm
        if b.partial:
            score += _lm_bonus(lm, b.partial, words, lm_weight, word_score)
            words = (*words, b.partial)
        if lm is not None:
            score += lm_weight * lm.log10_prob(EOS, (BOS, *words)) * LN10
        if score > best_score:
            best, best_score = " ".join(words), score
    return best


__all__ = ["BLANK", "WORD_END", "NgramLM", "Vocabulary", "beam_search", "collapse",
           "greedy_decode", "ltr_to_words", "write_arpa"]
