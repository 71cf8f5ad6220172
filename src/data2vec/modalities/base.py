"""What every modality front-end provides to the shared transformer and the objective."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn


class FrontEnd(nn.Module, ABC):
    """Raw input -> transformer input, in two steps so the teacher can share the costly first one.

    ``local_features`` is mask-independent (conv waveform encoder, patch embedding, token lookup);
    ``contextualize`` replaces masked steps by a mask embedding (where the modality has one), adds
    positions and prepends extra tokens (CLS). Front-ends hold no dropout: the encoder's input
    dropout plays that role, so the teacher (eval mode) always sees clean features.

    Attributes every subclass sets: ``dim`` (output width D), ``num_extra_tokens`` (tokens
    prepended by ``contextualize``, excluded from masks and targets) and ``window_size`` (patch
    grid for a relative position bias, or None).
    """

    dim: int
    num_extra_tokens: int = 0
    window_size: tuple[int, int] | None = None
    local_modules: tuple[str, ...] = ()
    """Submodules ``local_features`` uses: a data2vec 2.0 teacher with ``ema_scope: context``
    does not copy them (it is fed the student's local features)."""

    @abstractmethod
    def local_features(self, source: Tensor,
                       padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(B, T, D) features and their padding mask (B, T) True = pad (or None)."""

    @abstractmethod
    def contextualize(self, features: Tensor, padding_mask: Tensor | None,
                      mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Masking (mask (B, T) True = masked), positions, extra tokens -> (B, T', D) and the
        padding mask (B, T')."""

    def forward(self, source: Tensor, padding_mask: Tensor | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        features, padding_mask = self.local_features(source, padding_mask)
        return self.contextualize(features, padding_mask, mask)

    def init_weights(self) -> None:
        """Modality-specific initialisation, run after the generic one (default: nothing)."""
