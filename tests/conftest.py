"""Shared test helpers: a minimal front-end so objective tests need no modality, and a
``DATA2VEC_HOME`` with the three demo corpora."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from data2vec.data.demo import prepare_demo
from data2vec.modalities.base import FrontEnd


def make_demo_home(home: Path, speech_size: int) -> Path:
    """`home` as a ``DATA2VEC_HOME`` with the image and text demos in their default place, and
    a speech demo of `speech_size` clips in ``home/speech`` (not the default size, so tests pass
    it as a path)."""
    prepare_demo("image", home / "demo" / "image")
    prepare_demo("text", home / "demo" / "text")
    prepare_demo("speech", home / "speech", size=speech_size)
    return home


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
