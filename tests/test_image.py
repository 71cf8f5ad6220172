"""Image modality: BEiT block masking, sin-cos positions, the front-end and the v1 image model."""

from __future__ import annotations

import math

import pytest
import torch

from data2vec.batch import Batch
from data2vec.build import build_model
from data2vec.config import load_config
from data2vec.errors import ConfigError, DataError
from data2vec.modalities.image import (
    ImageFrontEnd,
    ImageFrontEndConfig,
    ImageMaskConfig,
    add_random_block,
    block_mask,
    block_mask_example,
    compute_mask,
    force_mask_count,
    num_masked_patches,
    sincos_2d,
)

LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def boundary_edges(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Masked/unmasked 4-neighbour pairs per row of (B, N) masks: the perimeter of the mask."""
    m = mask.view(-1, *grid)
    vertical = (m[:, 1:, :] != m[:, :-1, :]).sum((1, 2))
    horizontal = (m[:, :, 1:] != m[:, :, :-1]).sum((1, 2))
    return (vertical + horizontal).float()


# --- masking ---------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,num_masked,min_block", [
    ((14, 14), 120, 16), ((8, 8), 32, 4), ((8, 8), 16, 4), ((5, 7), 20, 4), ((6, 6), 35, 16),
    ((8, 8), 0, 4), ((8, 8), 64, 4), ((3, 3), 5, 1),
])
def test_block_mask_has_exact_count(grid, num_masked, min_block):
    mask = block_mask(64, grid, num_masked, min_block, 0.3, None, gen(0))
    assert mask.shape == (64, grid[0] * grid[1]) and mask.dtype == torch.bool
    assert (mask.sum(1) == num_masked).all()


@pytest.mark.parametrize("grid,ratio,min_block", [((14, 14), 0.6, 16), ((8, 8), 0.5, 4),
                                                   ((8, 8), 0.25, 4), ((7, 7), 0.4, 9)])
def test_mean_mask_ratio_over_1000_draws(grid, ratio, min_block):
    cfg = ImageMaskConfig(mask_ratio=ratio, min_block=min_block)
    mask = compute_mask(cfg, 1000, grid, gen(1))
    assert abs(mask.float().mean().item() - ratio) <= 0.02
    # Every draw masks the same count, round(ratio * N).
    assert (mask.sum(1) == round(ratio * grid[0] * grid[1])).all()


def test_released_v1_count_is_120_of_196():
    assert num_masked_patches(load_config("image", "base").model.masking.mask_ratio, 196) == 120
    assert num_masked_patches(0.5, 64) == 32 and num_masked_patches(0.6, 196) == 118


def test_single_block_is_one_rectangle():
    succeeded = 0
    for seed in range(200):
        mask = torch.zeros(14, 14, dtype=torch.bool)
        added = add_random_block(mask, 16, 16, LOG_ASPECT, gen(seed))
        assert added == int(mask.sum())
        if added == 0:
            continue
        succeeded += 1
        rows = mask.any(1).nonzero().squeeze(1)
        cols = mask.any(0).nonzero().squeeze(1)
        h, w = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w  # no gaps
        assert h * w == added  # the bounding box is fully masked: one rectangle
        assert 2 <= h <= 7 and 2 <= w <= 7  # round(sqrt(16 * a)), a in [0.3, 1/0.3]
        assert h < 14 and w < 14
    assert succeeded >= 190


def test_block_never_adds_more_than_allowed():
    for seed in range(100):
        mask = block_mask_example((8, 8), 20, 1, 0.3, None, gen(seed)).view(8, 8)
        before = int(mask.sum())
        added = add_random_block(mask, 16, 3, LOG_ASPECT, gen(1000 + seed))
        assert 0 <= added <= 3 and int(mask.sum()) == before + added


def test_block_masks_are_clumped():
    grid = (14, 14)
    blocks = block_mask(300, grid, 118, 16, 0.3, None, gen(2))
    scattered = torch.stack([torch.randperm(196, generator=gen(s)) < 118 for s in range(300)])
    # A union of rectangles has a far shorter perimeter than uniformly scattered patches.
    assert boundary_edges(blocks, grid).mean() < 0.6 * boundary_edges(scattered, grid).mean()
    # Nearly every masked patch has a masked 4-neighbour (only fix-up singles may not).
    small = block_mask(300, (8, 8), 16, 4, 0.3, None, gen(3)).view(-1, 8, 8)
    padded = torch.nn.functional.pad(small.float(), (1, 1, 1, 1)).bool()
    neighbour = padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | \
        padded[:, 1:-1, 2:]
    assert (neighbour & small).sum() / small.sum() > 0.95


def test_masks_reproduce_with_the_same_seed_only():
    a = block_mask(16, (14, 14), 120, 16, 0.3, None, gen(5))
    b = block_mask(16, (14, 14), 120, 16, 0.3, None, gen(5))
    c = block_mask(16, (14, 14), 120, 16, 0.3, None, gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # rows are independent draws


def test_force_mask_count_masks_or_unmasks_single_patches():
    base = torch.zeros(20, dtype=torch.bool)
    base[:10] = True
    fewer = force_mask_count(base, 7, gen(0))
    more = force_mask_count(base, 13, gen(0))
    assert fewer.sum() == 7 and (fewer & ~base).sum() == 0  # only unmasked, never masked
    assert more.sum() == 13 and (base & ~more).sum() == 0  # only masked, never unmasked
    assert base.sum() == 10  # input untouched


@pytest.mark.parametrize("kwargs", [{"num_masked": 65}, {"num_masked": -1}, {"min_block": 0},
                                    {"min_aspect": 0.0}, {"max_aspect": 0.1}, {"max_block": 0}])
def test_bad_mask_arguments_raise(kwargs):
    args = {"grid": (8, 8), "num_masked": 10, "min_block": 4, "min_aspect": 0.3,
            "max_aspect": None, "generator": gen(0)} | kwargs
    with pytest.raises(ConfigError):
        block_mask_example(**args)


# --- sin-cos positions -----------------------------------------------------------------------

def test_sincos_matches_the_mae_formula():
    grid, dim = (4, 5), 16
    table = sincos_2d(grid, dim)
    assert table.shape == (20, 16) and table.dtype == torch.float32
    quarter = dim // 4
    for r, c in [(0, 0), (2, 3), (3, 4), (1, 0)]:
        row = table[r * grid[1] + c]
        for k in range(quarter):
            omega = 10000.0 ** (-k / quarter)
            assert row[k] == pytest.approx(math.sin(c * omega), abs=1e-6)
            assert row[quarter + k] == pytest.approx(math.cos(c * omega), abs=1e-6)
            assert row[2 * quarter + k] == pytest.approx(math.sin(r * omega), abs=1e-6)
            assert row[3 * quarter + k] == pytest.approx(math.cos(r * omega), abs=1e-6)
    assert torch.cdist(table, table).add(torch.eye(20)).min() > 0.1  # every patch distinct
    with pytest.raises(ConfigError):
        sincos_2d(grid, 18)


def test_sincos_positions_are_fixed_and_copied_to_the_teacher():
    cfg = load_config("image", "tiny", overrides=["model.frontend.positions=sincos"])
    model = build_model(cfg)
    frontend = model.frontend
    assert "pos_embed" not in dict(frontend.named_parameters())
    expected = sincos_2d(frontend.grid, frontend.dim).unsqueeze(0)
    assert torch.equal(frontend.pos_embed, expected)
    opt = torch.optim.AdamW(model.student_parameters(), lr=1e-2)
    x = torch.randn(2, 3, 32, 32)
    mask = compute_mask(cfg.model.masking, 2, frontend.grid, gen(0))
    model(Batch(x, None, mask)).loss.backward()
    opt.step()
    model.ema_step(1)
    assert torch.equal(frontend.pos_embed, expected)
    assert torch.equal(model.teacher.model["frontend"].pos_embed, expected)


# --- front-end -------------------------------------------------------------------------------

def small_frontend(**kwargs) -> ImageFrontEnd:
    cfg = ImageFrontEndConfig(image_size=16, patch_size=4, **kwargs)
    frontend = ImageFrontEnd(cfg, dim=8)
    frontend.init_weights()
    return frontend


def test_patches_are_embedded_row_major():
    frontend = small_frontend()
    images = torch.randn(2, 3, 16, 16)
    features, padding = frontend.local_features(images, None)
    assert features.shape == (2, 16, 8) and padding is None
    weight = frontend.patch_embed.weight.reshape(8, -1)  # (D, C*p*p)
    for r, c in [(0, 0), (1, 2), (3, 3), (2, 0)]:
        patch = images[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(2, -1)
        expected = patch @ weight.T + frontend.patch_embed.bias
        torch.testing.assert_close(features[:, r * 4 + c], expected, rtol=1e-5, atol=1e-5)
    assert frontend.window_size == (4, 4) and frontend.num_patches == 16


def test_contextualize_puts_cls_first_and_mask_token_at_masked_patches():
    frontend = small_frontend()
    features = torch.randn(3, 16, 8)
    mask = block_mask(3, (4, 4), 6, 2, 0.3, None, gen(0))
    x, padding = frontend.contextualize(features, None, mask)
    assert x.shape == (3, 17, 8) and padding is None and frontend.num_extra_tokens == 1
    torch.testing.assert_close(x[:, 0], frontend.cls_token[0].expand(3, -1), rtol=0, atol=0)
    patches = x[:, 1:]
    assert (patches[mask] == frontend.mask_token.view(8)).all()
    assert torch.equal(patches[~mask], features[~mask])
    assert not torch.equal(frontend.mask_token.view(8), frontend.cls_token.view(8))
    # No mask: features pass through unchanged.
    clean, _ = frontend.contextualize(features, None, None)
    assert torch.equal(clean[:, 1:], features)


def test_learned_positions_cover_cls_and_patches():
    frontend = small_frontend(positions="learned")
    assert frontend.pos_embed.shape == (1, 17, 8) and frontend.pos_embed.requires_grad
    features = torch.randn(2, 16, 8)
    mask = block_mask(2, (4, 4), 5, 2, 0.3, None, gen(1))
    x, _ = frontend.contextualize(features, None, mask)
    without = small_frontend()
    without.load_state_dict({k: v for k, v in frontend.state_dict().items() if k != "pos_embed"})
    reference, _ = without.contextualize(features, None, mask)
    torch.testing.assert_close(x, reference + frontend.pos_embed)


def test_sincos_positions_skip_cls():
    frontend = small_frontend(positions="sincos")
    features = torch.randn(2, 16, 8)
    x, _ = frontend.contextualize(features, None, None)
    torch.testing.assert_close(x[:, 0], frontend.cls_token[0].expand(2, -1))
    torch.testing.assert_close(x[:, 1:], features + sincos_2d((4, 4), 8))


def test_optional_cls_and_mask_token():
    frontend = small_frontend(cls_token=False, mask_token=False)
    assert frontend.num_extra_tokens == 0 and frontend.cls_token is None
    features = torch.randn(2, 16, 8)
    mask = block_mask(2, (4, 4), 8, 2, 0.3, None, gen(0))
    x, _ = frontend.contextualize(features, None, mask)
    assert torch.equal(x, features)  # no token to insert: masked patches stay as they are


def test_init_weights():
    frontend = ImageFrontEnd(ImageFrontEndConfig(image_size=32, patch_size=4,
                                                 positions="learned"), dim=256)
    frontend.init_weights()
    weight = frontend.patch_embed.weight
    bound = math.sqrt(6.0 / (3 * 4 * 4 + 256))  # Xavier-uniform on the flattened (D, C*p*p)
    assert weight.abs().max() <= bound
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert (frontend.patch_embed.bias == 0).all()
    tokens = torch.cat([frontend.cls_token.flatten(), frontend.mask_token.flatten(),
                        frontend.pos_embed.flatten()])
    assert tokens.abs().max() <= 0.04 and tokens.std().item() == pytest.approx(0.0176, rel=0.1)


def test_bad_inputs_raise():
    frontend = small_frontend()
    with pytest.raises(DataError):
        frontend.local_features(torch.randn(2, 3, 20, 20), None)
    with pytest.raises(DataError):
        frontend.local_features(torch.randn(2, 1, 16, 16), None)
    with pytest.raises(DataError):
        frontend.contextualize(torch.randn(2, 16, 8), None, torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(ConfigError):
        ImageFrontEnd(ImageFrontEndConfig(image_size=30, patch_size=4), dim=8)


# --- the v1 image model ----------------------------------------------------------------------

def test_presets_build():
    tiny = load_config("image", "tiny")
    model = build_model(tiny)
    params = sum(p.numel() for p in model.student_parameters())
    assert 0.5e6 < params < 5e6
    assert model.frontend.num_extra_tokens == 1 and model.encoder.rel_pos_bias is not None
    for size, depth, dim in [("base", 12, 768), ("large", 24, 1024)]:
        cfg = load_config("image", size)
        assert (cfg.model.encoder.depth, cfg.model.encoder.dim) == (depth, dim)
        assert cfg.model.objective.loss_scale == pytest.approx(1 / dim)
        assert cfg.model.objective.ema_start == cfg.model.objective.ema_end == 0.9998


def test_teacher_tracks_the_patch_embedding():
    cfg = load_config("image", "tiny")
    model = build_model(cfg)
    teacher = model.teacher.model["frontend"]
    old = teacher.patch_embed.weight.detach().clone()
    old_cls = teacher.cls_token.detach().clone()
    opt = torch.optim.AdamW(model.student_parameters(), lr=1e-2)
    x = torch.randn(4, 3, 32, 32)
    mask = compute_mask(cfg.model.masking, 4, model.frontend.grid, gen(0))
    model(Batch(x, None, mask)).loss.backward()
    opt.step()
    tau = model.ema_step(1)
    new = model.frontend.patch_embed.weight.detach()
    assert (new - old).abs().max() > 1e-3  # the student moved
    torch.testing.assert_close(teacher.patch_embed.weight, tau * old + (1 - tau) * new,
                               rtol=0, atol=1e-7)
    torch.testing.assert_close(teacher.cls_token,
                               tau * old_cls + (1 - tau) * model.frontend.cls_token.detach(),
                               rtol=0, atol=1e-7)


def test_tiny_preset_learns_on_a_fixed_batch():
    cfg = load_config("image", "tiny")
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.student_parameters(), lr=cfg.optim.lr,
                            betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    g = gen(0)
    batch = Batch(torch.randn(8, 3, 32, 32, generator=g), None,
                  compute_mask(cfg.model.masking, 8, model.frontend.grid, g))
    losses, target_std = [], []
    for step in range(50):
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.student_parameters(), cfg.optim.clip_norm)
        opt.step()
        model.ema_step(step + 1)
        losses.append(out.loss.item())
        target_std.append(out.stats["target_std"].item())
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5])  # about 0.45-0.5 with the preset
    assert min(target_std) > 0.1
