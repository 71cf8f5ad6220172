"""The light convolutional decoders of data2vec 2.0 (1-D for speech and text, 2-D for images).

Each layer: grouped conv (same length) -> LayerNorm over channels without affine -> GELU, with a
residual where ``residual`` is set and the shapes match (so never after a first layer that changes
the width); then a linear projection back to the model width (two layers for text).

Example::

    decoder = Decoder1d(DecoderConfig(dim=384, layers=4, kernel=7, groups=16), model_dim=768)
    pred = decoder(x)            # (B, T, 768) -> (B, T, 768)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DecoderConfig:
    """Shape of a conv decoder."""

    dim: int = 384
    layers: int = 4
    kernel: int = 7
    groups: int = 16
    residual: bool = True
    projection_layers: int = 1
    """1: Linear(dim, D); 2: Linear(dim, 2·dim) -> GELU -> Linear(2·dim, D) (text)."""


def _projection(dim: int, model_dim: int, layers: int) -> nn.Module:
    if layers == 1:
        return nn.Linear(dim, model_dim)
    if layers == 2:
        return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, model_dim))
    raise ValueError(f"decoder projection_layers must be 1 or 2, got {layers}")


class _ConvLayer(nn.Module):
    """Conv (1-D or 2-D, padding k//2, an even kernel's extra step trimmed) -> LN -> GELU."""

    def __init__(self, in_dim: int, dim: int, kernel: int, groups: int, two_d: bool) -> None:
        super().__init__()
        conv = nn.Conv2d if two_d else nn.Conv1d
        self.conv = conv(in_dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 if kernel % 2 == 0 else 0
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, T) or (B, C, H, W) -> same layout with `dim` channels."""
        y = self.conv(x)
        if self.trim:
            y = y[..., :-1, :-1] if y.ndim == 4 else y[..., :-1]
        y = F.layer_norm(y.movedim(1, -1), (self.dim,)).movedim(-1, 1)  # over channels, no affine
        return F.gelu(y)


class _ConvDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, model_dim: int, two_d: bool) -> None:
        super().__init__()
        self.cfg = cfg
        dims = [model_dim] + [cfg.dim] * cfg.layers
        self.layers = nn.ModuleList(_ConvLayer(dims[i], cfg.dim, cfg.kernel, cfg.groups, two_d)
                                    for i in range(cfg.layers))
        self.proj = _projection(cfg.dim, model_dim, cfg.projection_layers)

    def _convs(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            y = layer(x)
            x = y + x if self.cfg.residual and y.shape == x.shape else y
        return x

    def reset_parameters(self) -> None:
        """PyTorch's default init everywhere (the original resets its decoder after BERT init)."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d):
                m.reset_parameters()


class Decoder1d(_ConvDecoder):
    """(B, T, D) -> (B, T, D) over the time axis (speech, text)."""

    def __init__(self, cfg: DecoderConfig, model_dim: int) -> None:
        super().__init__(cfg, model_dim, two_d=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self._convs(x.transpose(1, 2))  # (B, dim, T)
        return self.proj(y.transpose(1, 2))  # (B, T, D)


class Decoder2d(_ConvDecoder):
    """(B, H·W, D) row-major patches -> (B, H·W, D), convolving over the (H, W) grid (images)."""

    def __init__(self, cfg: DecoderConfig, model_dim: int, grid: tuple[int, int]) -> None:
        super().__init__(cfg, model_dim, two_d=True)
        self.grid = grid

    def forward(self, x: Tensor) -> Tensor:
        batch, positions, dim = x.shape
        height, width = self.grid
        if positions != height * width:
            raise ValueError(f"Decoder2d got {positions} positions, expected {height}x{width}")
        y = self._convs(x.transpose(1, 2).reshape(batch, dim, height, width))  # (B, dim, H, W)
        return self.proj(y.flatten(2).transpose(1, 2))  # (B, N, D)


__all__ = ["Decoder1d", "Decoder2d", "DecoderConfig"]
