"""Speech front-end: conv spec parsing, frame arithmetic, span masking, padding, tiny training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from data2vec.batch import Batch
from data2vec.build import build_model
from data2vec.config import load_config
from data2vec.errors import ConfigError, DataError
from data2vec.modalities.speech import (
    PAPER_CONV_SPEC,
    SpeechFrontEnd,
    SpeechFrontEndConfig,
    frame_lengths,
    frame_padding_mask,
    mask_for_waveforms,
    parse_conv_spec,
    span_mask,
)

# ------------------------------------------------------------------------------- conv spec


def test_paper_conv_spec_parses_to_seven_layers_with_stride_320() -> None:
    layers = parse_conv_spec(PAPER_CONV_SPEC)
    assert layers == [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    assert math.prod(s for _, _, s in layers) == 320  # 20 ms frames at 16 kHz
    assert parse_conv_spec(" [ (64,10,5), (32, 3,2), ]\n+[(8,2,2)] * 3 ") == \
        [(64, 10, 5), (32, 3, 2)] + [(8, 2, 2)] * 3


@pytest.mark.parametrize("spec", [
    "", "[]", "[(512,10)]", "[(512,10,5,1)]", "[(512,10,5)]*", "[(512,10,5)] +",
    "[(0,10,5)]", "[(-512,10,5)]", "[(512.0,10,5)]", "[(512,10,5)]*0", "[(1,1,1)]*100000",
    "(512,10,5)", "[(512,10,5)] [(512,3,2)]", "[(512,10,5)]*2*2", "[(512,10,5)]; import os",
    "__import__('os').system('true')", "[(512,10,5)] + eval('1')", "[(2**9,10,5)]",
    "[(512,10,5) for _ in range(3)]",
])
def test_malformed_or_code_like_specs_are_rejected_naming_the_spec(spec: str) -> None:
    with pytest.raises(ConfigError, match="conv_spec"):
        parse_conv_spec(spec)


def test_bad_spec_fails_when_the_config_is_loaded() -> None:
    with pytest.raises(ConfigError, match="conv_spec"):
        load_config("speech", "tiny", overrides=["model.frontend.conv_spec=[(1,2)]"])


# ---------------------------------------------------------------------------- frame lengths


@pytest.mark.parametrize("spec", ["[(8,10,5)] + [(8,3,2)]*4 + [(8,2,2)]*2",  # paper's k and s
                                  "[(4,7,3)] + [(4,4,4), (4,5,1)]*2"])
def test_frame_lengths_equal_the_conv_output_lengths(spec: str) -> None:
    cfg = SpeechFrontEndConfig(conv_spec=spec, pos_conv_depth=1, pos_conv_width=3,
                               pos_conv_groups=1)
    frontend = SpeechFrontEnd(cfg, dim=8).eval()
    field = frontend.receptive_field
    for length in [field, field + 1, 1234, 4321, 16000, 16319, 16320]:
        x, _ = frontend.local_features(torch.randn(1, length), None)
        assert int(frame_lengths(torch.tensor([length]), frontend.conv_layers)) == x.shape[1]
    assert int(frame_lengths(torch.tensor([field - 1]), frontend.conv_layers)) == 0


def test_paper_receptive_field_is_400_samples() -> None:
    frontend = SpeechFrontEnd(SpeechFrontEndConfig(), dim=16 * 2)
    assert frontend.receptive_field == 400  # 25 ms at 16 kHz (wav2vec 2.0 paper)
    with pytest.raises(DataError, match="399 samples"):
        frontend.local_features(torch.randn(1, 399), None)


def test_frame_padding_mask_marks_frames_beyond_the_real_samples() -> None:
    layers = parse_conv_spec(PAPER_CONV_SPEC)
    lengths = torch.tensor([16000, 9999, 400])
    padding = torch.arange(16000).unsqueeze(0) >= lengths.unsqueeze(1)
    frames = frame_padding_mask(padding, layers, 49)
    assert frames.shape == (3, 49)
    by_hand = [49, 30, 1]  # 9999 samples: 1998, 998, 498, 248, 123, 61, 30 frames layer by layer
    assert (~frames).sum(1).tolist() == frame_lengths(lengths, layers).tolist() == by_hand
    assert frame_padding_mask(None, layers, 49) is None


# ---------------------------------------------------------------------------- span masking


def expected_span_fraction(length: int, mask_prob: float, mask_length: int) -> float:
    """Exact E[masked fraction] of one unpadded row: n distinct starts among N = T - L + 1,
    n = floor(p T / L + U); frame t is free iff none of the w_t starts covering it is drawn."""
    starts = length - mask_length + 1
    x = mask_prob * length / mask_length
    low = math.floor(x)
    total = 0.0
    for n, weight in [(low, 1 - (x - low)), (low + 1, x - low)]:
        free = sum(math.comb(starts - (min(t, starts - 1) - max(0, t - mask_length + 1) + 1), n)
                   for t in range(length)) / math.comb(starts, n)
        total += weight * (1 - free / length)
    return total


def numpy_span_mask(lengths: list[int], total: int, mask_prob: float, mask_length: int,
                    rng: np.random.Generator) -> np.ndarray:
    """A plain re-implementation of the same rule (loops, numpy RNG), for comparison."""
    rows = []
    for length in lengths:
        n = max(1, int(mask_prob * length / mask_length + rng.random()))
        starts = rng.choice(length - mask_length + 1, n, replace=False)
        rows.append(np.unique(np.concatenate([s + np.arange(mask_length) for s in starts])))
    keep = min(len(r) for r in rows)
    mask = np.zeros((len(lengths), total), dtype=bool)
    for i, r in enumerate(rows):
        mask[i, rng.choice(r, keep, replace=False)] = True
    return mask


def test_span_mask_fraction_matches_the_exact_expectation() -> None:
    expected = expected_span_fraction(500, 0.65, 10)
    assert 0.48 < expected < 0.51  # the paper's "about 49 %"
    g = torch.Generator().manual_seed(0)
    fractions = [span_mask(None, (1, 500), 0.65, 10, 1, g).float().mean().item()
                 for _ in range(1000)]
    assert abs(np.mean(fractions) - expected) < 0.005


def test_span_mask_with_padding_matches_a_numpy_reimplementation() -> None:
    lengths, total = [300, 250, 180, 300], 300
    padding = torch.arange(total).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)
    g, rng = torch.Generator().manual_seed(1), np.random.default_rng(1)
    ours, reference = [], []
    for _ in range(1000):
        mask = span_mask(padding, (4, total), 0.65, 10, 1, g)
        assert not (mask & padding).any()  # never on padding
        counts = mask.sum(1)
        assert (counts == counts[0]).all()  # require_same_masks
        ours.append(counts[0].item())
        reference.append(numpy_span_mask(lengths, total, 0.65, 10, rng).sum(1)[0])
    assert abs(np.mean(ours) - np.mean(reference)) < 0.01 * 180


def test_a_single_span_has_the_configured_length_and_fits_in_the_real_frames() -> None:
    g = torch.Generator().manual_seed(2)
    padding = torch.arange(40).unsqueeze(0) >= torch.tensor([[23]])  # 23 real frames
    starts = set()
    for _ in range(300):
        # p * T / L = 0.023 < 1, so min_masks = 1 gives exactly one span
        mask = span_mask(padding, (1, 40), 0.01, 7, 1, g)[0]
        where = mask.nonzero().flatten()
        assert len(where) == 7 and (where == where[0] + torch.arange(7)).all()
        starts.add(int(where[0]))
    assert starts == set(range(23 - 7 + 1))  # every start where a whole span fits, no other


def test_span_mask_is_reproducible_from_the_generator() -> None:
    a = span_mask(None, (3, 200), 0.65, 10, 1, torch.Generator().manual_seed(5))
    b = span_mask(None, (3, 200), 0.65, 10, 1, torch.Generator().manual_seed(5))
    c = span_mask(None, (3, 200), 0.65, 10, 1, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_span_mask_rejects_left_padding() -> None:
    padding = torch.zeros(1, 20, dtype=torch.bool)
    padding[0, 0] = True
    with pytest.raises(DataError, match="suffix"):
        span_mask(padding, (1, 20), 0.65, 10, 1, torch.Generator())


# ---------------------------------------------------------------------------- the modules


@pytest.mark.parametrize("training", [True, False])
def test_feature_encoder_equals_conv1d_layer_norm_gelu(training: bool) -> None:
    # training: the unfold + matmul path; eval: fairseq's / HF's layouts, bit for bit
    cfg = SpeechFrontEndConfig(conv_spec="[(16,10,5)] + [(16,3,2), (16,2,2)]", conv_bias=True,
                               pos_conv_depth=1, pos_conv_width=3, pos_conv_groups=1)
    frontend = SpeechFrontEnd(cfg, dim=8).train(training)
    wave = torch.randn(2, 1000)
    reference = wave.unsqueeze(1)  # (B, 1, S)
    x = reference.transpose(1, 2)  # (B, S, 1), as local_features feeds it
    for layer in frontend.feature_encoder:
        x = layer(x)
        y = layer.conv(reference)  # (B, C, T)
        y = torch.nn.functional.layer_norm(y.transpose(1, 2), (16,), layer.norm.weight,
                                           layer.norm.bias, cfg.layer_norm_eps).transpose(1, 2)
        reference = torch.nn.functional.gelu(y)  # on the transposed view, as fairseq / HF
        if training:
            assert torch.allclose(x, reference.transpose(1, 2), atol=1e-5)
        else:
            assert torch.equal(x, reference.transpose(1, 2))


def test_positional_conv_preserves_length_and_is_local() -> None:
    for width in (38, 8):  # kernels 19 (odd) and 4 (even, one frame trimmed)
        cfg = SpeechFrontEndConfig(pos_conv_depth=2, pos_conv_width=width, pos_conv_groups=4)
        pos = SpeechFrontEnd(cfg, dim=16).pos_conv
        x = torch.randn(1, 60, 16)
        y = pos(x)
        assert y.shape == x.shape
        x2 = x.clone()
        x2[0, 30] += 1.0
        changed = (pos(x2) - y).abs().amax(-1)[0] > 0
        # each layer reaches k // 2 frames back and (k - 1) // 2 ahead (an even kernel is shifted)
        k = cfg.pos_conv_kernel
        reach_back, reach_ahead = 2 * ((k - 1) // 2), 2 * (k // 2)
        assert changed.nonzero().flatten().tolist() == list(range(30 - reach_back,
                                                                  30 + reach_ahead + 1))


def test_masked_frames_carry_only_the_mask_embedding() -> None:
    frontend = load_tiny_model().frontend
    features = torch.randn(2, 30, frontend.dim)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[:, 5:15] = True
    x, _ = frontend.contextualize(features, None, mask)
    changed = features.clone()
    changed[mask] = torch.randn(int(mask.sum()), frontend.dim)  # what the mask hides
    assert torch.equal(frontend.contextualize(changed, None, mask)[0], x)
    assert not torch.allclose(frontend.contextualize(changed, None, None)[0],
                              frontend.contextualize(features, None, None)[0])


def test_group_norm_mode_normalises_each_channel_of_the_first_conv_over_time() -> None:
    cfg = SpeechFrontEndConfig(conv_spec="[(8,10,5)] + [(8,3,2)]*2", extractor_mode="group_norm",
                               conv_bias=True, pos_conv_depth=1, pos_conv_width=3,
                               pos_conv_groups=1)
    frontend = SpeechFrontEnd(cfg, dim=8)
    first = frontend.feature_encoder[0]
    assert first.conv.bias is not None
    assert [type(layer.norm) for layer in frontend.feature_encoder[1:]] == [nn.Identity] * 2
    y = first.norm(first.conv(torch.randn(3, 1, 2000)).transpose(1, 2))  # (B, T, C)
    assert torch.allclose(y.mean(1), torch.zeros(3, 8), atol=1e-5)
    assert torch.allclose(y.var(1, unbiased=False), torch.ones(3, 8), atol=1e-3)


def test_init_weights_follows_fairseq() -> None:
    frontend = load_tiny_model().frontend
    w = frontend.feature_encoder[1].conv.weight  # (C_out, C_in, k): kaiming normal, fan_in C_in*k
    assert abs(w.std().item() - math.sqrt(2 / (w.shape[1] * w.shape[2]))) < 0.05 * w.std().item()
    assert frontend.mask_emb.min() >= 0 and frontend.mask_emb.max() < 1  # U[0, 1)
    assert abs(frontend.mask_emb.mean().item() - 0.5) < 0.1


def test_base_preset_has_the_released_checkpoint_size() -> None:
    # facts file: the released audio_base_ls.pt student (final_proj included) holds 93.75 M values
    model = build_model(load_config("speech", "base"))
    assert sum(p.numel() for p in model.student_parameters()) == 93_754_880


# ------------------------------------------------------------------------ the whole model


def load_tiny_model() -> nn.Module:
    return build_model(load_config("speech", "tiny"))


def test_padded_batch_gives_the_outputs_of_each_utterance_alone() -> None:
    model = load_tiny_model().eval()
    g = torch.Generator().manual_seed(3)
    long, short = torch.randn(16000, generator=g), torch.randn(11111, generator=g)
    source = torch.stack([long, torch.cat([short, 50 * torch.randn(16000 - 11111, generator=g)])])
    padding = torch.zeros(2, 16000, dtype=torch.bool)
    padding[1, 11111:] = True
    with torch.no_grad():
        out, frame_padding = model.encode(source, padding)
        alone, _ = model.encode(short.unsqueeze(0))
        alone_long, _ = model.encode(long.unsqueeze(0))
    frames = alone.x.shape[1]
    assert (~frame_padding[1]).sum() == frames < out.x.shape[1]
    assert torch.allclose(out.x[1, :frames], alone.x[0], atol=1e-5)
    assert torch.allclose(out.x[0], alone_long.x[0], atol=1e-5)


def test_tiny_preset_learns_a_fixed_batch_without_collapse() -> None:
    cfg = load_config("speech", "tiny")
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(4)
    source = torch.randn(4, 8000, generator=g)
    mask = mask_for_waveforms(cfg.model.masking, model.frontend.conv_layers, 8000, None, 4, g)
    batch = Batch(source, None, mask)
    opt = torch.optim.Adam(model.student_parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                           eps=cfg.optim.eps)
    losses, target_std = [], []
    for step in range(50):
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        model.ema_step(step + 1)
        losses.append(out.loss.item())
        target_std.append(out.stats["target_std"].item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert min(target_std) > 0.1


def test_large_preset_changes_only_the_encoder_shape_of_base() -> None:
    base, large = load_config("speech", "base"), load_config("speech", "large")
    enc = large.model.encoder
    assert (enc.depth, enc.dim, enc.num_heads, enc.ffn_dim) == (24, 1024, 16, 4096)
    for name in ("depth", "dim", "num_heads", "ffn_dim"):
        setattr(large.model.encoder, name, getattr(base.model.encoder, name))
    large.preset = base.preset
    assert large == base
