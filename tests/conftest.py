"""Shared test helpers: a minimal front-end so objective tests need no modality."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from data2vec.modalities.base import FrontEnd


class LinearFrontEnd(FrontEnd):
    """(B, T, C) features -> Linear -> (B, T, D); learned mask embedding; no positions."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(in_dim, dim)
        self.mask_emb = nn.Parameter(torch.randn(dim))

    def local_features(self, source: Tensor, padding_mask: Tensor | None):
        return self.proj(source), padding_mask

    def contextualize(self, features: Tensor, padding_mask: Tensor | None, mask: Tensor | None):
        if mask is not None:
            features = torch.where(mask.unsqueeze(-1), self.mask_emb.to(features.dtype), features)
        return features, padding_mask


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
