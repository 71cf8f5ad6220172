"""The batch every model in this library consumes: raw input, padding and the data2vec mask."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Batch:
    """One collated batch.

    source:         speech (B, S) float waveform; image (B, C, H, W); text (B, L) long ids.
    padding_mask:   True = padding, over `source` positions (speech samples, text tokens).
    mask:           True = masked, over the front-end's output positions (speech frames, image
                    patches, text tokens), extra tokens such as CLS excluded. data2vec 2.0:
                    B * clone_batch rows (clones of an example are adjacent). None = no masking.
    student_source: text only: token ids after the masking replacement (``<mask>`` / random /
                    kept); the teacher always reads the clean ``source``.
    target:         labels for fine-tuning (class ids, multi-hot vectors or CTC label ids).
    target_lengths: CTC label lengths.
    modality:       joint multi-modal pre-training: which modality this batch is ('speech',
                    'image' or 'text'); the joint model sends it to that modality's part.
                    None in single-modality runs.
    """

    source: Tensor
    padding_mask: Tensor | None = None
    mask: Tensor | None = None
    student_source: Tensor | None = None
    target: Tensor | None = None
    target_lengths: Tensor | None = None
    modality: str | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move every tensor to `device`."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)

    def __len__(self) -> int:
        return self.source.shape[0]
