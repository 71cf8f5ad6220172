"""Multi-head self-attention (SDPA or a readable eager path) and BEiT relative position bias."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QkvBias = Literal["all", "qv", "none"]
AttentionImpl = Literal["auto", "sdpa", "eager"]


def pick_attention(impl: AttentionImpl, q: Tensor) -> Literal["sdpa", "eager"]:
    """'auto' resolved for this call: SDPA except on CPU in bf16, where the spelled-out path
    measured faster (``benchmarks/speed.py``, the attention ablation rows time both kernels on
    the same step in one run). Any other choice is taken as given."""
    if impl != "auto":
        return impl
    return "eager" if q.device.type == "cpu" and q.dtype == torch.bfloat16 else "sdpa"


def attention_bias(padding_mask: Tensor | None, attn_bias: Tensor | None,
                   dtype: torch.dtype) -> Tensor | None:
    """Merge a key-padding mask (B, T) True = pad and an additive bias (B|1, H|1, T, T) into one
    additive float mask for ``scaled_dot_product_attention``; None when there is neither."""
    if padding_mask is None:
        return attn_bias.to(dtype) if attn_bias is not None else None
    pad = padding_mask[:, None, None, :]  # (B, 1, 1, T)
    if attn_bias is None:
        zeros = torch.zeros(pad.shape, dtype=dtype, device=pad.device)
        return zeros.masked_fill(pad, float("-inf"))
    return attn_bias.to(dtype).masked_fill(pad, float("-inf"))


def eager_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                    dropout_p: float) -> Tensor:
    """softmax(q kᵀ / √d + bias) v, spelled out; the reference the SDPA path is tested against.

    The softmax runs in the scores' dtype: torch's CPU and CUDA kernels accumulate a bf16
    softmax in fp32 and round once, so an explicit fp32 round trip of the (B, H, T, T) scores
    (what HF's eager path does) only adds two passes over the largest tensor of the layer.
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, T, T)
    if bias is not None:
        scores = scores.add_(bias)  # in place: the matmul's backward does not need its output
    probs = scores.softmax(-1)
    probs = F.dropout(probs, dropout_p, training=dropout_p > 0)
    return probs @ v


class Attention(nn.Module):
    """Fused-QKV self-attention with a key-padding mask and an optional additive bias."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float = 0.0,
                 qkv_bias: QkvBias = "all", impl: AttentionImpl = "auto",
                 device=None, dtype=None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.impl = impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias == "all", device=device, dtype=dtype)
        # BEiT: q and v have biases, k has none (a k bias cancels in softmax anyway).
        self.q_bias = self.v_bias = None
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
            self.v_bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def _qkv(self, x: Tensor) -> Tensor:
        if self.q_bias is None:
            return self.qkv(x)
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        return F.linear(x, self.qkv.weight, bias)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x: (B, T, D); bias: additive (B|1, H|1, T, T) from :func:`attention_bias` or None."""
        B, T, D = x.shape
        q, k, v = self._qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        dropout_p = self.attention_dropout if self.training else 0.0
        if bias is not None:
            bias = bias.to(q.dtype)
        if pick_attention(self.impl, q) == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        else:
            out = eager_attention(q, k, v, bias, dropout_p)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class RelativePositionBias(nn.Module):
    """BEiT relative position bias over a (Wh, Ww) patch grid plus one CLS token.

    A table of (2Wh−1)(2Ww−1) + 3 rows × heads; the 3 extra rows are cls→token, token→cls and
    cls→cls. ``forward`` returns the (H, N+1, N+1) bias, N = Wh·Ww, CLS first.
    """

    def __init__(self, window_size: tuple[int, int], num_heads: int, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.window_size = window_size
        wh, ww = window_size
        self.num_relative_distance = (2 * wh - 1) * (2 * ww - 1) + 3
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(self.num_relative_distance, num_heads, device=device, dtype=dtype))
        self.register_buffer("relative_position_index", self._index(wh, ww, device),
                             persistent=False)

    @staticmethod
    def _index(wh: int, ww: int, device=None) -> Tensor:
        coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
        coords = coords.flatten(1)  # (2, N)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
        rel[..., 0] += wh - 1
        rel[..., 1] += ww - 1
        rel[..., 0] *= 2 * ww - 1
        n = wh * ww
        num_distance = (2 * wh - 1) * (2 * ww - 1)
        index = torch.zeros(n + 1, n + 1, dtype=torch.long)
        index[1:, 1:] = rel.sum(-1)
        index[0, 0:] = num_distance
        index[0:, 0] = num_distance + 1
        index[0, 0] = num_distance + 2
        return index.to(device)

    def forward(self) -> Tensor:
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous()  # (H, N+1, N+1)
