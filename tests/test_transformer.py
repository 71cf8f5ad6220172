"""The shared transformer: fast path equals readable path, residual wiring, padding, biases."""

from __future__ import annotations

import pytest
import torch

from data2vec.nn.attention import RelativePositionBias
from data2vec.nn.layers import drop_path
from data2vec.nn.transformer import Block, EncoderConfig, TransformerEncoder


def config(**kw) -> EncoderConfig:
    base = dict(depth=3, dim=32, num_heads=4, ffn_dim=64, dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return EncoderConfig(**base)


@pytest.mark.parametrize("layer_norm_first", [False, True])
@pytest.mark.parametrize("qkv_bias", ["all", "qv"])
def test_sdpa_equals_eager(layer_norm_first: bool, qkv_bias: str) -> None:
    cfg = config(layer_norm_first=layer_norm_first, qkv_bias=qkv_bias, final_norm=True)
    sdpa = TransformerEncoder(cfg).eval()
    eager = TransformerEncoder(config(layer_norm_first=layer_norm_first, qkv_bias=qkv_bias,
                                      final_norm=True, attention_impl="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        for p in sdpa.parameters():  # non-trivial biases
            p.add_(0.05 * torch.randn_like(p))
        eager.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 7, 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    bias = torch.randn(1, 4, 7, 7)
    a = sdpa(x, padding, bias, collect_layers=3)
    b = eager(x, padding, bias, collect_layers=3)
    assert torch.allclose(a.x, b.x, atol=1e-5)
    for ya, yb in zip(a.layer_results, b.layer_results, strict=True):
        assert torch.allclose(ya, yb, atol=1e-5)


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_block_residual_wiring(layer_norm_first: bool) -> None:
    """With zeroed attention and FFN output weights a pre-LN block is the identity and a post-LN
    block is LN2(LN1(x)): both residual connections are present."""
    block = Block(config(layer_norm_first=layer_norm_first)).eval()
    with torch.no_grad():
        for lin in (block.attn.proj, block.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    x = torch.randn(2, 5, 32)
    y, ffn = block(x)
    expected = x if layer_norm_first else block.norm2(block.norm1(x))
    assert torch.allclose(y, expected, atol=1e-6)
    assert torch.count_nonzero(ffn) == 0


def test_padding_does_not_leak_into_real_positions() -> None:
    enc = TransformerEncoder(config()).eval()
    x = torch.randn(1, 5, 32)
    padded = torch.cat([x, torch.randn(1, 3, 32)], 1)
    padding = torch.tensor([[False] * 5 + [True] * 3])
    assert torch.allclose(enc(padded, padding).x[:, :5], enc(x).x, atol=1e-5)


def test_qv_bias_leaves_keys_unbiased() -> None:
    block = Block(config(qkv_bias="qv"))
    assert block.attn.qkv.bias is None and block.attn.q_bias.shape == (32,)
    with torch.no_grad():
        block.attn.q_bias.fill_(1.0)
        block.attn.v_bias.fill_(2.0)
    qkv = block.attn._qkv(torch.zeros(1, 1, 32))[0, 0]
    assert torch.equal(qkv[:32], torch.ones(32)) and torch.count_nonzero(qkv[32:64]) == 0
    assert torch.equal(qkv[64:], torch.full((32,), 2.0))


def test_relative_position_bias_is_translation_invariant() -> None:
    rpb = RelativePositionBias((3, 4), num_heads=2)
    with torch.no_grad():
        rpb.relative_position_bias_table.normal_()
    bias = rpb()  # (H, 13, 13), CLS first
    assert bias.shape == (2, 13, 13)
    idx = lambda r, c: 1 + r * 4 + c  # noqa: E731
    # same displacement (+1 row, +1 col) -> same bias; CLS rows use their own entries
    assert torch.equal(bias[:, idx(0, 0), idx(1, 1)], bias[:, idx(1, 2), idx(2, 3)])
    assert not torch.equal(bias[:, idx(0, 0), idx(1, 1)], bias[:, idx(0, 0), idx(1, 2)])
    assert torch.equal(bias[:, 0, 1], bias[:, 0, 5]) and torch.equal(bias[:, 1, 0], bias[:, 7, 0])


@pytest.mark.parametrize("mode", ["shared", "per_block"])
def test_encoder_relative_bias_modes(mode: str) -> None:
    enc = TransformerEncoder(config(relative_position_bias=mode), window_size=(2, 2))
    n_tables = sum(1 for n, _ in enc.named_parameters() if "relative_position_bias_table" in n)
    assert n_tables == (1 if mode == "shared" else 3)
    assert enc(torch.randn(2, 5, 32)).x.shape == (2, 5, 32)


def test_layerdrop_only_in_training() -> None:
    enc = TransformerEncoder(config(layerdrop=1.0))
    x = torch.randn(1, 4, 32)
    enc.train()
    out = enc(x, collect_layers=3)
    assert torch.allclose(out.x, enc.input_norm(x))  # every block skipped
    enc.eval()
    assert not torch.allclose(enc(x).x, enc.input_norm(x))


def test_drop_path_keeps_expectation_and_is_off_in_eval() -> None:
    x = torch.ones(20000, 3)
    y = drop_path(x, 0.25, training=True)
    assert abs(y.mean().item() - 1.0) < 0.03
    values = torch.unique(y)
    assert len(values) == 2 and values[0] == 0 and abs(values[1].item() - 1 / 0.75) < 1e-6
    assert torch.equal(drop_path(x, 0.25, training=False), x)


def test_layer_scale_and_drop_path_rates() -> None:
    enc = TransformerEncoder(config(depth=3, drop_path=0.2, layer_scale_init=1e-4,
                                    layer_norm_first=True))
    assert [b.drop_path.rate if hasattr(b.drop_path, "rate") else 0.0 for b in enc.blocks] \
        == pytest.approx([0.0, 0.1, 0.2])
    assert torch.allclose(enc.blocks[0].ls1.gamma, torch.full((32,), 1e-4))
