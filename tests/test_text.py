"""Text modality: byte-level BPE tokenizer, BERT / span token masking, RoBERTa-style embeddings."""

from __future__ import annotations

import json
import math
import pydoc_data.topics
from pathlib import Path

import pytest
import torch

from data2vec.batch import Batch
from data2vec.build import build_model
from data2vec.config import load_config
from data2vec.data.tokenizer import BPETokenizer
from data2vec.errors import ConfigError, DataError
from data2vec.modalities.text import (
    TextFrontEnd,
    TextFrontEndConfig,
    TextMaskConfig,
    mask_sequence,
    mask_tokens,
    position_ids,
)


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy 2-core machine the
    threads' spin-waiting makes each step 10x slower: run the model tests single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------ tokenizer


def corpus_lines(n: int = 400) -> list[str]:
    """A few hundred lines of English prose + code shipped with CPython (pydoc topics)."""
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return [line for line in text.splitlines() if line.strip()][:n]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[BPETokenizer, Path]:
    root = tmp_path_factory.mktemp("bpe")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines()), encoding="utf-8")
    out = root / "tok"
    return BPETokenizer.train([corpus], vocab_size=800, out_dir=out), out


def test_tokenizer_specials_have_fixed_ids(trained) -> None:
    tok, _ = trained
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == {0, 1, 2, 3, 4}
    assert tok.vocab_size == 800


def test_tokenizer_round_trips_and_compresses(trained) -> None:
    tok, _ = trained
    lines = corpus_lines(450)[400:] + ["naïve café — ünïcödé ✓ 数据", "  two  spaces\tand tab"]
    for line in lines:
        ids = tok.encode(line)
        assert tok.decode(ids) == line
        assert all(i not in tok.special_ids for i in ids)
    # Merges learned: held-out English text needs far fewer tokens than bytes.
    held_out = " ".join(corpus_lines(450)[400:])
    assert len(tok.encode(held_out)) < 0.5 * len(held_out.encode())
    assert tok.encode_sentence("data2vec") == [0, *tok.encode("data2vec"), 2]


def test_tokenizer_save_load_and_retrain_are_identical(trained, tmp_path: Path) -> None:
    tok, saved = trained
    loaded = BPETokenizer.load(saved)
    text = " ".join(corpus_lines(420)[400:])
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.special_ids == tok.special_ids and loaded.vocab_size == tok.vocab_size
    again = BPETokenizer.train(iter(corpus_lines()), vocab_size=800, out_dir=tmp_path)
    assert again.encode(text) == tok.encode(text)
    assert (tmp_path / "merges.txt").read_text() == (saved / "merges.txt").read_text()


def test_tokenizer_missing_or_corrupt_files_name_the_file(trained, tmp_path: Path) -> None:
    _, saved = trained
    (tmp_path / "vocab.json").write_text((saved / "vocab.json").read_text())
    with pytest.raises(DataError, match="merges.txt"):
        BPETokenizer.load(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nnot-a-pair\n")
    with pytest.raises(DataError, match=r"merges.txt:3"):
        BPETokenizer.load(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(DataError, match="vocab.json"):
        BPETokenizer.load(tmp_path)


def test_tokenizer_loads_roberta_style_vocab_with_its_own_ids(trained, tmp_path: Path) -> None:
    _, saved = trained
    vocab = json.loads((saved / "vocab.json").read_text())
    # RoBERTa layout: <s> <pad> </s> <unk> first, <mask> last; here <mask> moves to the end.
    del vocab["<mask>"]
    order = sorted(vocab, key=vocab.get)
    roberta = {t: i for i, t in enumerate(order)}
    roberta["<mask>"] = len(roberta)
    (tmp_path / "vocab.json").write_text(json.dumps(roberta))
    (tmp_path / "merges.txt").write_text((saved / "merges.txt").read_text())
    tok = BPETokenizer.load(tmp_path)
    assert tok.mask_id == 799 and tok.pad_id == 1 and tok.special_ids == {0, 1, 2, 3, 799}
    assert tok.decode(tok.encode("for item in range(3):")) == "for item in range(3):"
    del roberta["<mask>"]  # GPT-2 style: no <mask> -> refused, naming the token
    (tmp_path / "vocab.json").write_text(json.dumps(roberta))
    with pytest.raises(DataError, match="<mask>"):
        BPETokenizer.load(tmp_path)


# -------------------------------------------------------------------------------------- masking

VOCAB = 1000
SPECIALS = {0, 1, 2, 3, VOCAB - 1}  # RoBERTa-like: <mask> is the last id
MASK_ID = VOCAB - 1


def padded_rows(rows: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, length) ids: <s> text </s> then <pad> to the right; text lengths 8..length-2."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, VOCAB - 1, (rows, length), generator=g)
    n = torch.randint(8, length - 1, (rows,), generator=g)  # text tokens per row
    pos = torch.arange(length)
    tokens[:, 0] = 0
    tokens[pos.expand(rows, -1) == (n + 1).unsqueeze(1)] = 2
    tokens[pos > (n + 1).unsqueeze(1)] = 1
    return tokens, n


def test_bert_masking_rate_split_and_exclusions() -> None:
    tokens, n = padded_rows(1000, 64)
    cfg = TextMaskConfig(mode="bert")
    # <s> </s> <unk> excluded through num_special_tokens (ids 0..3), <pad> and <mask> by id
    mask, student = mask_tokens(tokens, {1, MASK_ID}, MASK_ID, VOCAB, cfg,
                                torch.Generator().manual_seed(1), num_special_tokens=4)
    special = torch.isin(tokens, torch.tensor(sorted(SPECIALS)))
    assert not mask[special].any()  # <s>, </s>, <pad> never masked
    assert torch.equal(student[~mask], tokens[~mask])
    counts = mask.sum(1)  # int(p·n + U): floor or ceil of p·n in every row
    assert ((counts == (0.15 * n).floor()) | (counts == (0.15 * n).ceil())).all()
    # unbiased rounding: the overall rate is p to within sampling noise (σ ≈ 0.0005)
    assert abs(mask.sum().item() / n.sum().item() - 0.15) < 0.005
    chosen, replaced = tokens[mask], student[mask]
    to_mask = replaced == MASK_ID
    unchanged = replaced == chosen
    randomised = ~to_mask & ~unchanged
    total = mask.sum().item()
    assert abs(to_mask.sum().item() / total - 0.8) < 0.02
    assert abs(unchanged.sum().item() / total - 0.1) < 0.02
    assert abs(randomised.sum().item() / total - 0.1) < 0.02
    assert not torch.isin(replaced[randomised], torch.tensor(sorted(SPECIALS))).any()
    assert replaced[randomised].min() >= 4 and replaced[randomised].max() < VOCAB - 1


def test_masking_is_reproducible_per_example() -> None:
    tokens, _ = padded_rows(1, 64)
    cfg = TextMaskConfig()
    a = mask_sequence(tokens[0], SPECIALS, MASK_ID, VOCAB, cfg, torch.Generator().manual_seed(5))
    b = mask_sequence(tokens[0], SPECIALS, MASK_ID, VOCAB, cfg, torch.Generator().manual_seed(5))
    c = mask_sequence(tokens[0], SPECIALS, MASK_ID, VOCAB, cfg, torch.Generator().manual_seed(6))
    assert a[0].shape == (64,) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def expected_span_fraction(n: int, p: float, span: int) -> float:
    """Analytic E[#masked]/n for n contiguous maskable tokens: k = int(p·n/span + U) starts
    without replacement; token t is missed iff none of its min(t, span-1)+1 covering starts is
    drawn, probability C(n - w, k) / C(n, k)."""
    x = p * n / span
    total = 0.0
    for k, weight in ((math.floor(x), 1 - (x - math.floor(x))), (math.floor(x) + 1, x % 1)):
        k = min(k, n)
        covered = sum(1 - math.comb(n - min(t, span - 1) - 1, k) / math.comb(n, k)
                      for t in range(n))
        total += weight * covered
    return total / n


def test_span_masking_rate_runs_and_replacement() -> None:
    tokens, n = padded_rows(1000, 64, seed=3)
    cfg = TextMaskConfig(mode="span", span_mask_prob=0.35, span_length=4)
    mask, student = mask_tokens(tokens, SPECIALS, MASK_ID, VOCAB, cfg,
                                torch.Generator().manual_seed(2))
    special = torch.isin(tokens, torch.tensor(sorted(SPECIALS)))
    assert not mask[special].any()
    assert (student[mask] == MASK_ID).all() and torch.equal(student[~mask], tokens[~mask])
    expected = sum(expected_span_fraction(int(k), 0.35, 4) * int(k) for k in n) / n.sum().item()
    assert abs(mask.sum().item() / n.sum().item() - expected) < 0.01
    assert 0.25 < expected < 0.32  # the released config's ≈ 31 %, a little less with clipping


def runs(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of True."""
    out, start = [], None
    for i, m in enumerate([*mask_row.tolist(), False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i - start))
            start = None
    return out


def test_span_runs_have_span_length_unless_clipped() -> None:
    tokens, _ = padded_rows(400, 64, seed=4)
    cfg = TextMaskConfig(mode="span", span_mask_prob=0.05, span_length=4)
    mask, _ = mask_tokens(tokens, SPECIALS, MASK_ID, VOCAB, cfg,
                          torch.Generator().manual_seed(3))
    special = torch.isin(tokens, torch.tensor(sorted(SPECIALS)))
    lengths, clipped = [], 0
    for row in range(mask.shape[0]):
        for start, length in runs(mask[row]):
            if special[row, start + length]:  # run stopped by </s>: may be short
                clipped += 1
                continue
            lengths.append(length)
    assert lengths and min(lengths) >= 4  # an unclipped run is one span or several overlapping
    assert sum(ln == 4 for ln in lengths) / len(lengths) > 0.85  # sparse starts rarely overlap
    assert clipped > 0


def test_mask_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="model.masking.mask_prob"):
        TextMaskConfig(mask_prob=1.5)
    with pytest.raises(ConfigError, match="leave_unmasked_prob"):
        TextMaskConfig(leave_unmasked_prob=0.6, random_token_prob=0.6)


# ------------------------------------------------------------------------------------ front-end


def test_position_ids_follow_roberta_convention() -> None:
    ids = torch.tensor([[0, 7, 8, 9, 2, 1, 1],
                        [0, 7, 2, 1, 1, 1, 1],
                        [0, 7, 8, 9, 10, 11, 2]])
    # Hand-computed: real tokens from pad_index + 1 = 2, padding keeps pad_index = 1.
    expected = torch.tensor([[2, 3, 4, 5, 6, 1, 1],
                             [2, 3, 4, 1, 1, 1, 1],
                             [2, 3, 4, 5, 6, 7, 8]])
    assert torch.equal(position_ids(ids.eq(1), 7, pad_index=1), expected)
    assert torch.equal(position_ids(None, 7, pad_index=1, batch=2), expected[[2, 2]])
    frontend = TextFrontEnd(TextFrontEndConfig(vocab_size=16, max_positions=512), dim=8)
    assert frontend.embed_positions.num_embeddings == 514
    torch.nn.init.normal_(frontend.token_type)
    x, padding_mask = frontend(ids)  # padding mask derived from <pad> ids
    assert torch.equal(padding_mask, ids.eq(1))
    by_hand = torch.nn.functional.layer_norm(
        frontend.embed_tokens.weight[ids] + frontend.embed_positions.weight[expected]
        + frontend.token_type, (8,), frontend.layer_norm.weight, frontend.layer_norm.bias, 1e-5)
    assert torch.allclose(x, by_hand, atol=1e-6)
    with pytest.raises(DataError, match="max_positions"):
        frontend(torch.zeros(1, 513, dtype=torch.long))


def test_padded_batch_matches_examples_alone_in_eval(one_thread) -> None:
    cfg = load_config("text", "tiny")
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [20, 13, 7]
    rows = [torch.cat([torch.tensor([0]), torch.randint(5, 4096, (n - 2,), generator=g),
                       torch.tensor([2])]) for n in lengths]
    batch = torch.full((3, 20), 1)
    for i, row in enumerate(rows):
        batch[i, :len(row)] = row
    with torch.no_grad():
        together, padding_mask = model.encode(batch, batch.eq(1))
        for i, row in enumerate(rows):
            alone, _ = model.encode(row.unsqueeze(0))
            assert torch.allclose(together.x[i, :len(row)], alone.x[0], atol=1e-5)
    assert padding_mask.sum().item() == 20 * 3 - sum(lengths)


def test_init_keeps_pad_rows_zero_and_tiny_size() -> None:
    cfg = load_config("text", "tiny")
    model = build_model(cfg)
    frontend = model.frontend
    assert frontend.embed_tokens.weight[1].abs().sum() == 0
    assert frontend.embed_positions.weight[1].abs().sum() == 0
    assert frontend.embed_tokens.weight[5].std() > 0.01
    trainable = sum(p.numel() for p in model.student_parameters())
    assert 1_000_000 <= trainable <= 5_000_000
    # the paper's Base / Large shapes
    base, large = load_config("text", "base"), load_config("text", "large")
    assert (base.model.encoder.depth, base.model.encoder.dim, base.model.objective.top_k) == \
        (12, 768, 10)
    assert (large.model.encoder.depth, large.model.encoder.dim, large.model.encoder.num_heads) == \
        (24, 1024, 16)
    assert not base.model.encoder.input_norm and base.model.frontend.vocab_size == 50265


def test_tiny_preset_learns_on_a_fixed_batch(one_thread) -> None:
    torch.manual_seed(0)
    cfg = load_config("text", "tiny")
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(5, 4096, (4, 64), generator=g)
    clean[:, 0], clean[:, -1] = 0, 2
    clean[3, 40:] = 1
    clean[3, 39] = 2
    mask, student = mask_tokens(clean, {0, 1, 2, 3, 4}, 4, 4096, cfg.model.masking, g)
    batch = Batch(source=clean, padding_mask=clean.eq(1), mask=mask, student_source=student)
    opt = torch.optim.AdamW(model.student_parameters(), lr=1e-3, weight_decay=0.01)
    losses = []
    for step in range(50):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.ema_step(step)
        losses.append(out.loss.item())
        assert out.stats["target_std"] > 0.1
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5
    # the shared pad row received no gradient and stayed zero
    assert model.frontend.embed_tokens.weight[1].abs().sum() == 0
