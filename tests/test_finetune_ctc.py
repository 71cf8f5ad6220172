"""CTC decoding and the n-gram LM: greedy collapse, LM-guided beam search, ARPA round trip."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from data2vec.finetune.ctc import (
    NgramLM,
    Vocabulary,
    beam_search,
    collapse,
    greedy_decode,
    ltr_to_words,
    write_arpa,
)


def _frames(vocab: Vocabulary, rows: list[dict[str, float]]) -> torch.Tensor:
    """(T, V) log-probs: each row gives the probability of some symbols, the rest to blank."""
    out = torch.full((len(rows), len(vocab)), 1e-6)
    for t, row in enumerate(rows):
        for sym, p in row.items():
            out[t, vocab.symbols.index(sym)] = p
        out[t, 0] = max(1e-6, 1.0 - sum(row.values()))
    return (out / out.sum(1, keepdim=True)).log()


def test_greedy_collapses_repeats_and_blanks() -> None:
    vocab = Vocabulary.from_ltr(["A B |"])  # <blank> A B |
    assert vocab.symbols == ["<blank>", "A", "B", "|"]
    # path: A A - A | B B - -> "A A | B": repeats merge, a blank separates the two As
    path = [1, 1, 0, 1, 3, 2, 2, 0]
    assert collapse(path) == [1, 1, 3, 2]
    log_probs = torch.nn.functional.one_hot(torch.tensor([path]), 4).float().log()
    assert greedy_decode(log_probs, torch.tensor([5])) == [[1, 1, 3]]  # frames after 5 cut
    assert vocab.to_words(greedy_decode(log_probs)[0]) == "AA B"
    assert ltr_to_words("T H E | C A T |") == "THE CAT"


def test_beam_search_with_lm_prefers_the_in_vocabulary_word(tmp_path: Path) -> None:
    vocab = Vocabulary.from_ltr(["C A T X |"])
    # acoustics slightly favour "CAX" over "CAT"
    rows = [{"C": 0.9}, {"A": 0.9}, {"X": 0.5, "T": 0.4}, {"|": 0.9}]
    log_probs = _frames(vocab, rows)
    assert vocab.to_words(greedy_decode(log_probs.unsqueeze(0))[0]) == "CAX"
    assert beam_search(log_probs, vocab, None, beam=8) == "CAX"
    lm = NgramLM.from_arpa(write_arpa(["CAT", "CAT CAT"], tmp_path / "lm.arpa", order=2))
    assert lm.contains("CAT") and not lm.contains("CAX")
    assert beam_search(log_probs, vocab, lm, beam=8, lm_weight=1.0) == "CAT"
    # a tiny LM weight leaves the acoustic choice alone
    assert beam_search(log_probs, vocab, lm, beam=8, lm_weight=0.01) == "CAX"


def test_written_arpa_is_a_normalised_backoff_model(tmp_path: Path) -> None:
    sentences = ["ONE TWO", "ONE THREE", "TWO TWO ONE", "THREE"]
    lm = NgramLM.from_arpa(write_arpa(sentences, tmp_path / "lm.arpa", order=2))
    vocab = ["ONE", "TWO", "THREE", "</s>", "<unk>"]
    for history in [("<s>",), ("ONE",), ("TWO",), ("THREE",)]:
        total = sum(10 ** lm.log10_prob(w, history) for w in vocab)
        assert math.isclose(total, 1.0, rel_tol=1e-4), (history, total)
    # seen bigram: (count - 0.5) / history count; ONE is followed by TWO, THREE and </s>
    assert math.isclose(10 ** lm.log10_prob("TWO", ("ONE",)), 0.5 / 3, rel_tol=1e-4)
