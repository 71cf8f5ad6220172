"""Collators: example indices -> a pre-training :class:`~data2vec.batch.Batch`, masks included.

Every random choice comes from a generator seeded by ``(seed, stream, epoch, key)`` — the key is
the example's index in its dataset (crops, flips, image and text masks) or the global batch index
(speech masks, which need the whole batch) — so a batch is a pure function of its indices and any
process (a resumed run, a DataLoader worker, another rank) rebuilds it exactly.

For data2vec 2.0, ``clones`` masked copies of each example are made: ``mask`` (and, for text,
``student_source``) then has ``B * clones`` rows, the copies of one example adjacent. With ``v2``
set (version 2), the masks follow the exact-count rules of :mod:`data2vec.data.v2_masks` (the
same count in every row, drawn per example) and text's ``student_source`` is the clean ids
repeated (no replacement: the v2 student drops masked tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from data2vec.batch import Batch
from data2vec.config import V2Config
from data2vec.data.audio import AudioDataset, random_crop
from data2vec.data.images import ImageFolderDataset, Stats, train_transform
from data2vec.data.text import TokenBlockDataset
from data2vec.data.v2_masks import block_mask_1d, inverse_block_mask_2d, random_mask
from data2vec.errors import DataError
from data2vec.modalities.image import ImageMaskConfig, compute_mask
from data2vec.modalities.speech import SpeechMaskConfig, mask_for_waveforms
from data2vec.modalities.text import TextMaskConfig, mask_sequence

# Independent random streams, so changing one kind of draw never shifts another.
STREAM_ORDER, STREAM_CROP, STREAM_MASK, STREAM_BATCH_MASK = 0, 1, 2, 3
T = TypeVar("T")


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixing all `keys` (SeedSequence hashing: nearby keys give unrelated seeds)."""
    entropy = [k % 2**64 for k in keys]  # SeedSequence wants non-negative integers
    low, high = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32).tolist()
    return ((high << 32) | low) & (2**63 - 1)


def generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded by :func:`derive_seed` of `keys`."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def load_example(load: Callable[[int], T], path_of: Callable[[int], Path], index: int,
                 size: int, skip_bad: bool, found: dict[str, tuple[str, str]]) -> T:
    """Example `index` of a dataset of `size`; with `skip_bad`, a file that fails to load (pixel
    data that does not decode, audio cut short) is replaced by the next one that loads, and
    recorded in `found` as ``path -> (reason, message)``. The same failures give the same
    replacement, so batches stay a pure function of their indices."""
    for offset in range(size):
        k = (index + offset) % size
        try:
            return load(k)
        except DataError as e:
            if not skip_bad:
                raise
            found[str(path_of(k))] = (e.reason, str(e))
    raise DataError(f"no file of the dataset loads (every one of {size} failed, e.g. "
                    f"{next(iter(found))})")


def _with_skipped(batch: Batch, found: dict[str, tuple[str, str]]) -> Batch:
    """Attach the files skipped while building `batch` (the loader counts them)."""
    if found:
        batch.skipped_files = found  # type: ignore[attr-defined]
    return batch


def pad_right(rows: list[Tensor], value: float | int) -> tuple[Tensor, Tensor | None]:
    """Stack 1-D tensors padded at the end -> ((B, L), padding_mask (B, L) True = pad, or None)."""
    length = max(r.shape[0] for r in rows)
    if all(r.shape[0] == length for r in rows):
        return torch.stack(rows), None
    out = rows[0].new_full((len(rows), length), value)
    for i, row in enumerate(rows):
        out[i, :row.shape[0]] = row
    lengths = torch.tensor([r.shape[0] for r in rows])
    return out, torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)  # (B, L)


@dataclass
class SpeechCollator:
    """Waveforms cropped to `max_sample_size`, then cropped to the shortest in the batch
    (``crop_to_shortest``, fairseq's pre-training default: no padding reaches the model) or
    zero-padded to the longest with a padding mask; span masks over frames, drawn per batch."""

    dataset: AudioDataset
    seed: int
    max_sample_size: int
    crop_to_shortest: bool
    conv_layers: list[tuple[int, int, int]]
    mask_cfg: SpeechMaskConfig
    clones: int = 1
    v2: V2Config | None = None
    """data2vec 2.0: exact-count span masks per example (``block_mask_1d``)."""
    skip_bad: bool = False
    """Replace a file that fails to load by the next one (counted) instead of failing."""

    def __call__(self, epoch: int, indices: list[int], batch_key: int) -> Batch:
        found: dict[str, tuple[str, str]] = {}
        return _with_skipped(self._build(epoch, indices, batch_key, found), found)

    def _build(self, epoch: int, indices: list[int], batch_key: int,
               found: dict[str, tuple[str, str]]) -> Batch:
        size = len(self.dataset)
        waves = [load_example(self.dataset.__getitem__, self.dataset.path, k, size,
                              self.skip_bad, found) for k in indices]  # each (S_k,), normalised
        limit = self.max_sample_size if self.max_sample_size > 0 else max(len(w) for w in waves)
        if self.crop_to_shortest:
            limit = min(limit, min(len(w) for w in waves))
        waves = [random_crop(w, limit, generator(self.seed, STREAM_CROP, epoch, k))
                 for w, k in zip(waves, indices, strict=True)]
        source, padding_mask = pad_right(waves, 0.0)  # (B, S)
        if self.v2 is not None:
            return Batch(source=source, padding_mask=padding_mask,
                         mask=self._v2_mask(source.shape[1], epoch, indices))
        rows = len(indices) * self.clones
        mask_padding = (padding_mask.repeat_interleave(self.clones, 0)
                        if padding_mask is not None else None)
        mask = mask_for_waveforms(self.mask_cfg, self.conv_layers, source.shape[1], mask_padding,
                                  rows, generator(self.seed, STREAM_BATCH_MASK, epoch, batch_key))
        return Batch(source=source, padding_mask=padding_mask, mask=mask)  # mask (B*M, T)

    def _v2_mask(self, num_samples: int, epoch: int, indices: list[int]) -> Tensor:
        """(B*M, T) over the frames of the (padded) batch length, drawn per example."""
        from data2vec.modalities.speech import frame_lengths

        v2 = self.v2
        frames = int(frame_lengths(torch.tensor([num_samples]), self.conv_layers)[0])
        return torch.cat([block_mask_1d(frames, self.clones, v2.mask_prob, v2.mask_length,
                                        v2.mask_prob_adjust,
                                        generator(self.seed, STREAM_MASK, epoch, k))
                          for k in indices])


@dataclass
class ImageCollator:
    """Augmented images (random resized crop + flip) and exact-count block masks per example."""

    dataset: ImageFolderDataset
    seed: int
    image_size: int
    crop_scale: tuple[float, float]
    hflip: bool
    stats: Stats
    grid: tuple[int, int]
    mask_cfg: ImageMaskConfig
    clones: int = 1
    v2: V2Config | None = None
    """data2vec 2.0: inverse block masks (or plain exact-count ones) per example."""
    skip_bad: bool = False
    """Replace an image whose pixels fail to decode by the next one (counted) instead of failing."""

    def __call__(self, epoch: int, indices: list[int], batch_key: int) -> Batch:
        found: dict[str, tuple[str, str]] = {}
        size = len(self.dataset)
        images = [train_transform(load_example(self.dataset.load, self.dataset.path, k, size,
                                               self.skip_bad, found),
                                  self.image_size, self.crop_scale, self.hflip, self.stats,
                                  generator(self.seed, STREAM_CROP, epoch, k)) for k in indices]
        masks = [self._mask(generator(self.seed, STREAM_MASK, epoch, k)) for k in indices]
        return _with_skipped(Batch(source=torch.stack(images),  # (B, C, H, W)
                                   mask=torch.cat(masks)),  # (B*M, N) True = masked
                             found)

    def _mask(self, gen: torch.Generator) -> Tensor:
        """(M, N) masks of one example."""
        v2 = self.v2
        if v2 is None:
            return compute_mask(self.mask_cfg, self.clones, self.grid, gen)
        if v2.inverse_mask:
            return inverse_block_mask_2d(self.grid, self.clones, v2.mask_prob, v2.mask_length,
                                         v2.mask_prob_adjust, gen)
        return random_mask(self.grid[0] * self.grid[1], self.clones, v2.mask_prob, gen)


@dataclass
class TextCollator:
    """Token blocks padded with <pad>; per-example token masks and the student's ids."""

    dataset: TokenBlockDataset
    seed: int
    pad_id: int
    mask_id: int
    special_ids: tuple[int, ...]
    vocab_size: int
    mask_cfg: TextMaskConfig
    clones: int = 1
    v2: V2Config | None = None
    """data2vec 2.0: exact-count random masks over the padded length, no token replacement."""

    def __call__(self, epoch: int, indices: list[int], batch_key: int) -> Batch:
        blocks = [self.dataset[k] for k in indices]  # each (L_k,) long
        if self.v2 is not None:
            source, padding_mask = pad_right(blocks, self.pad_id)  # (B, L)
            # Padded slots may be drawn (the count must be equal per row); the loss skips them.
            mask = torch.cat([random_mask(source.shape[1], self.clones, self.v2.mask_prob,
                                          generator(self.seed, STREAM_MASK, epoch, k))
                              for k in indices])  # (B*M, L)
            # No <mask> replacement: the student reads the clean ids and drops masked tokens.
            return Batch(source=source, padding_mask=padding_mask, mask=mask,
                         student_source=source.repeat_interleave(self.clones, 0))
        masks, students = [], []
        for block, k in zip(blocks, indices, strict=True):
            gen = generator(self.seed, STREAM_MASK, epoch, k)
            for _ in range(self.clones):  # clones of one example drawn in turn from its stream
                mask, student = mask_sequence(block, self.special_ids, self.mask_id,
                                              self.vocab_size, self.mask_cfg, gen)
                masks.append(mask)
                students.append(student)
        source, padding_mask = pad_right(blocks, self.pad_id)  # (B, L)
        mask, _ = pad_right(masks, False)  # (B*M, L) True = masked; padding never masked
        student, _ = pad_right(students, self.pad_id)  # (B*M, L)
        return Batch(source=source, padding_mask=padding_mask, mask=mask,
                     student_source=student)


Collator = SpeechCollator | ImageCollator | TextCollator

__all__ = ["Collator", "ImageCollator", "SpeechCollator", "TextCollator", "derive_seed",
           "generator", "pad_right"]
