"""data2vec 2.0 masks: exact counts per row, the inverse-block ratio, block structure, seeding,
and the collators producing B·M rows computed in the data loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data2vec.config import load_config
from data2vec.data.demo import prepare_demo
from data2vec.data.loader import build_pretrain_loader, load_or_train_tokenizer, sync_text_vocab
from data2vec.data.v2_masks import (
    block_mask_1d,
    force_count,
    inverse_block_mask_2d,
    num_masked,
    random_mask,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("steps", [49, 50, 313, 1000])
def test_speech_mask_has_exactly_half_masked_in_spans(steps: int) -> None:
    mask = block_mask_1d(steps, 16, 0.5, 5, 0.05, gen())
    assert mask.shape == (16, steps)
    assert (mask.sum(1) == steps // 2).all()
    # spans of 5: most masked frames have a masked neighbour (random masking: about half)
    neighbour = mask[:, 1:] & mask[:, :-1]
    assert neighbour.sum() / mask[:, 1:].sum() > 0.7


def test_inverse_block_mask_vit_b16_masks_157_of_196() -> None:
    mask = inverse_block_mask_2d((14, 14), 64, 0.8, 3, 0.07, gen(1))
    assert (mask.sum(1) == 157).all()
    assert num_masked("image", 196, 0.8) == 157
    ratio = mask.float().mean().item()
    assert abs(ratio - 0.8) <= 0.02
    assert (inverse_block_mask_2d((14, 14), 8, 0.75, 3, 0.1, gen(2)).sum(1) == 147).all()


def test_inverse_block_mask_keeps_blocks_visible() -> None:
    """Visible patches come in 3x3 blocks: most have a visible right or lower neighbour."""
    visible = ~inverse_block_mask_2d((14, 14), 64, 0.8, 3, 0.07, gen(3)).view(64, 14, 14)
    paired = (visible[:, :, 1:] & visible[:, :, :-1]).sum() + \
        (visible[:, 1:, :] & visible[:, :-1, :]).sum()
    assert paired / visible.sum() > 0.9  # random 20 % would give about 0.4


def test_text_mask_exact_count_and_uniform() -> None:
    mask = random_mask(128, 4000, 0.48, gen(4))
    assert (mask.sum(1) == 128 - int(128 * 0.52)).all()
    per_position = mask.float().mean(0)  # each position masked about 48 % of the time
    assert (per_position - 0.484).abs().max() < 0.05


def test_force_count_adds_and_removes() -> None:
    marked = torch.tensor([[True] * 6 + [False] * 4, [True] + [False] * 9])
    out = force_count(marked, 3, gen(5))
    assert (out.sum(1) == 3).all()
    assert (out[0] <= marked[0]).all()  # surplus: only marked positions kept
    assert (out[1] >= marked[1]).all()  # deficit: the marked one stays


def test_masks_reproduce_from_the_generator() -> None:
    a = block_mask_1d(100, 4, 0.5, 5, 0.05, gen(7))
    b = block_mask_1d(100, 4, 0.5, 5, 0.05, gen(7))
    c = block_mask_1d(100, 4, 0.5, 5, 0.05, gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    return {"image": prepare_demo("image", root / "image"),
            "text": prepare_demo("text", root / "text", vocab_size=512)}


@pytest.mark.parametrize("modality", ["image", "text"])
def test_loader_gives_b_times_m_rows_with_equal_counts(modality: str,
                                                       demo: dict[str, Path]) -> None:
    cfg = load_config(modality, "tiny", 2, overrides=[f"data.path={demo[modality]}",
                                                      "model.v2.clone_batch=3"])
    if modality == "text":
        sync_text_vocab(cfg, load_or_train_tokenizer(cfg))
    batch = next(iter(build_pretrain_loader(cfg)))
    rows, length = batch.mask.shape
    assert rows == 3 * len(batch)
    expected = 52 if modality == "image" else length - int(length * 0.52)
    assert (batch.mask.sum(1) == expected).all()
    assert not torch.equal(batch.mask[0], batch.mask[1])  # clones are masked differently
    if modality == "text":  # no <mask> replacement: the clean ids, once per clone
        assert torch.equal(batch.student_source, batch.source.repeat_interleave(3, 0))
