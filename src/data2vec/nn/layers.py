"""Small reusable layers: drop-path, layer-scale, the feed-forward MLP, parameter-free norms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero a whole residual branch per example with probability `rate`."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class DropPath(nn.Module):
    """Module form of :func:`drop_path`."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT / BEiT ``gamma``)."""

    def __init__(self, dim: int, init_value: float, device=None, dtype=None) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> GELU -> activation dropout -> fc2. Output dropout is the caller's (targets need the
    output before it)."""

    def __init__(self, dim: int, hidden_dim: int, activation_dropout: float = 0.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.drop = nn.Dropout(activation_dropout)
        self.fc2 = nn.Linear(hidden_dim, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


def instance_norm_time(x: Tensor, padding_mask: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalise each channel over time, per example, ignoring padded steps.

    x: (B, T, C); padding_mask: (B, T) True = padding. Equals ``F.instance_norm`` on (B, C, T)
    when there is no padding; padded steps come out as zeros.
    """
    if padding_mask is None:
        return F.instance_norm(x.transpose(1, 2), eps=eps).transpose(1, 2)
    keep = (~padding_mask).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    count = keep.sum(1, keepdim=True).clamp_min(1.0)
    mean = (x * keep).sum(1, keepdim=True) / count
    var = (((x - mean) * keep) ** 2).sum(1, keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + eps) * keep


def layer_norm_channels(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Parameter-free layer norm over the last (channel) dimension."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)
