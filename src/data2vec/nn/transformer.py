"""The one transformer encoder every modality and both data2vec versions share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from data2vec.nn.attention import (
    Attention,
    AttentionImpl,
    QkvBias,
    RelativePositionBias,
    attention_bias,
)
from data2vec.nn.layers import DropPath, LayerScale, Mlp

TargetSource = Literal["ffn", "block"]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmuls on `x` run in: autocast's inside an autocast region, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


@dataclass
class EncoderConfig:
    """Shape and regularisation of the shared transformer."""

    depth: int = 12
    """Number of blocks."""
    dim: int = 768
    """Model width D."""
    num_heads: int = 12
    ffn_dim: int = 3072
    """Hidden width of the feed-forward sub-layer."""
    layer_norm_first: bool = False
    """True = pre-LN (BEiT / v1 images), False = post-LN (wav2vec 2.0, RoBERTa, all of v2)."""
    dropout: float = 0.1
    """Dropout on the attention and feed-forward outputs and on the encoder input."""
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layerdrop: float = 0.0
    """Probability of skipping a whole block during training."""
    drop_path: float = 0.0
    """Stochastic depth rate of the last block; rises linearly from 0 across blocks."""
    layer_scale_init: float = 0.0
    """Initial layer-scale value; 0 = no layer-scale."""
    norm_eps: float = 1e-5
    qkv_bias: QkvBias = "all"
    """'all' (fairseq, HF audio/text), 'qv' (BEiT: no key bias) or 'none'."""
    relative_position_bias: Literal["none", "shared", "per_block"] = "none"
    """BEiT relative position bias over the patch grid (images only)."""
    input_norm: bool = True
    """Post-LN models: LayerNorm on the encoder input (wav2vec 2.0 ``encoder.layer_norm``)."""
    final_norm: bool = False
    """Pre-LN models: LayerNorm after the last block."""
    attention_impl: AttentionImpl = "auto"
    """'sdpa' (torch's fused kernels), 'eager' (explicit softmax) or 'auto': the faster of the
    two for the device and dtype of each call (see ``data2vec.nn.attention.pick_attention``;
    measured by ``benchmarks/speed.py``). Both compute the same attention."""


class Block(nn.Module):
    """Attention + feed-forward with residuals, pre- or post-LN.

    ``forward`` returns ``(x, ffn_out)``: ``ffn_out`` is the feed-forward output before dropout,
    layer-scale and the residual — the data2vec target for speech, text and all of v2.
    """

    def __init__(self, cfg: EncoderConfig, drop_path: float = 0.0,
                 window_size: tuple[int, int] | None = None, device=None, dtype=None) -> None:
        super().__init__()
        d = cfg.dim
        kw = {"device": device, "dtype": dtype}
        self.layer_norm_first = cfg.layer_norm_first
        self.attn = Attention(d, cfg.num_heads, cfg.attention_dropout, cfg.qkv_bias,
                              cfg.attention_impl, **kw)
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps, **kw)
        self.mlp = Mlp(d, cfg.ffn_dim, cfg.activation_dropout, **kw)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps, **kw)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        scale = cfg.layer_scale_init
        self.ls1 = LayerScale(d, scale, **kw) if scale > 0 else nn.Identity()
        self.ls2 = LayerScale(d, scale, **kw) if scale > 0 else nn.Identity()
        self.rel_pos_bias = (RelativePositionBias(window_size, cfg.num_heads, **kw)
                             if cfg.relative_position_bias == "per_block" else None)

    def _bias(self, bias: Tensor | None, padding_mask: Tensor | None, dtype) -> Tensor | None:
        if self.rel_pos_bias is not None:
            own = self.rel_pos_bias().unsqueeze(0)
            bias = own if bias is None else bias + own
        return attention_bias(padding_mask, bias, dtype)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None,
                attn_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, T, D); padding_mask: (B, T) True = pad; attn_bias: additive (B|1, H, T, T)
        (the encoder passes the padding already merged into it, see :func:`attention_bias`)."""
        bias = self._bias(attn_bias, padding_mask, compute_dtype(x))
        if self.layer_norm_first:
            x = x + self.drop_path(self.ls1(self.dropout(self.attn(self.norm1(x), bias))))
            ffn = self.mlp(self.norm2(x))
            x = x + self.drop_path(self.ls2(self.dropout(ffn)))
        else:
            x = self.norm1(x + self.drop_path(self.ls1(self.dropout(self.attn(x, bias)))))
            ffn = self.mlp(x)
            x = self.norm2(x + self.drop_path(self.ls2(self.dropout(ffn))))
        return x, ffn


@dataclass
class EncoderOutput:
    """Final output (B, T, D) and, when asked, the target-layer outputs of the top blocks."""

    x: Tensor
    layer_results: list[Tensor] | None = None


class TransformerEncoder(nn.Module):
    """Input norm/dropout, ``depth`` blocks, optional final norm.

    ``window_size`` (patch grid) is needed only with a relative position bias.
    """

    def __init__(self, cfg: EncoderConfig, window_size: tuple[int, int] | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.cfg = cfg
        if cfg.relative_position_bias != "none" and window_size is None:
            raise ValueError("relative_position_bias needs the patch grid (window_size)")
        use_input_norm = cfg.input_norm and not cfg.layer_norm_first
        self.input_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, **kw) if use_input_norm \
            else nn.Identity()
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.rel_pos_bias = (RelativePositionBias(window_size, cfg.num_heads, **kw)
                             if cfg.relative_position_bias == "shared" else None)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist() if cfg.depth > 1 \
            else [cfg.drop_path]
        self.blocks = nn.ModuleList(Block(cfg, r, window_size, **kw) for r in rates)
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, **kw) if cfg.final_norm \
            else nn.Identity()

    def forward(self, x: Tensor, padding_mask: Tensor | None = None,
                attn_bias: Tensor | None = None, collect_layers: int = 0,
                target_source: TargetSource = "ffn") -> EncoderOutput:
        """Encode x: (B, T, D).

        collect_layers: return the target-layer outputs of the top ``collect_layers`` blocks
        ('ffn' = feed-forward output before dropout/residual/norm, 'block' = end-of-block output).
        """
        x = self.input_dropout(self.input_norm(x))
        if self.rel_pos_bias is not None:
            shared = self.rel_pos_bias().unsqueeze(0)
            attn_bias = shared if attn_bias is None else attn_bias + shared
        # padding and bias merged and cast once for all blocks, not once per block
        attn_bias = attention_bias(padding_mask, attn_bias, compute_dtype(x))
        first_collected = len(self.blocks) - collect_layers
        results: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            skip = self.training and self.cfg.layerdrop > 0 and \
                torch.rand(()).item() < self.cfg.layerdrop
            if not skip:
                x, ffn = block(x, None, attn_bias)
            if i >= first_collected:
                # A dropped block (student only: the teacher runs in eval) passes its input on.
                results.append(x if skip or target_source == "block" else ffn)
        x = self.final_norm(x)
        return EncoderOutput(x, results if collect_layers else None)
