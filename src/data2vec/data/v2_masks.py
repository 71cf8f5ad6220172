"""data2vec 2.0 masks with the same count in every row, drawn per example in the data loader.

The student of data2vec 2.0 gathers the visible steps into a rectangle, so every row (every clone
of every example) masks exactly the same number of positions. The three rules of the original
data loaders:

- speech (``compute_block_mask_1d``): ``int(T·(p + adjust) / len)`` span centres drawn *with*
  replacement, each masking ``len`` frames around it (clamped at the ends), then random single
  frames are un-masked / masked until exactly ``int(T·p)`` are masked (p = 0.5, len 5, adjust 0.05);
- images (``compute_block_mask_2d`` with ``inverse_mask``): the same on the patch grid for the
  *visible* set — ``int(L·(1 − p + adjust) / b²)`` b×b blocks, forced to exactly
  ``int(L·(1 − p))`` visible patches — then inverted (157 of 196 masked for p = 0.8, b = 3);
- text (``random_masking``): ``T − int(T·(1 − p))`` positions drawn uniformly (p = 0.48).
"""

from __future__ import annotations

import torch
from torch import Tensor

from data2vec.errors import ConfigError


def force_count(marked: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """(R, N) bool -> the same rows with exactly `count` True each: surplus positions are
    cleared and missing ones set, uniformly at random among the candidates of each row."""
    keys = torch.rand(marked.shape, generator=generator)  # (R, N)
    # Marked positions sort first (keys in [0, 1)), the rest after (keys in [1, 2)); taking the
    # `count` smallest keeps a random subset of the marked ones, or all of them plus random others.
    rank = (keys + (~marked).float()).argsort(1).argsort(1)  # (R, N)
    return rank < count


def block_mask_1d(num_steps: int, rows: int, mask_prob: float, mask_length: int,
                  mask_prob_adjust: float, generator: torch.Generator) -> Tensor:
    """(rows, T) True = masked, exactly int(T·mask_prob) per row (speech, see module doc)."""
    if not 0.0 < mask_prob < 1.0:
        raise ConfigError(f"model.v2.mask_prob={mask_prob} must be in (0, 1)")
    num_centres = int(num_steps * (mask_prob + mask_prob_adjust) / mask_length)
    centres = torch.randint(0, num_steps, (rows, num_centres), generator=generator)  # (R, C)
    offsets = torch.arange(mask_length) - mask_length // 2  # (len,), [-2..2] for 5
    covered = (centres.unsqueeze(-1) + offsets).clamp(0, num_steps - 1).flatten(1)  # (R, C·len)
    marked = torch.zeros(rows, num_steps, dtype=torch.bool)
    marked.scatter_(1, covered, True)
    return force_count(marked, int(num_steps * mask_prob), generator)


def inverse_block_mask_2d(grid: tuple[int, int], rows: int, mask_prob: float, block: int,
                          mask_prob_adjust: float, generator: torch.Generator) -> Tensor:
    """(rows, H·W) True = masked, row-major: b×b blocks mark the exactly int(L·(1 − mask_prob))
    VISIBLE patches, the rest is masked (images, see module doc)."""
    if not 0.0 < mask_prob < 1.0:
        raise ConfigError(f"model.v2.mask_prob={mask_prob} must be in (0, 1)")
    height, width = grid
    num_patches = height * width
    visible_prob = 1.0 - mask_prob
    num_centres = int(num_patches * (visible_prob + mask_prob_adjust) / block**2)
    centres = torch.randint(0, num_patches, (rows, num_centres), generator=generator)  # (R, C)
    offsets = torch.arange(block) - block // 2  # (b,), [-1, 0, 1] for 3
    r = (centres // width).unsqueeze(-1) + offsets  # (R, C, b) block rows
    c = (centres % width).unsqueeze(-1) + offsets  # (R, C, b) block columns
    r, c = r.clamp(0, height - 1), c.clamp(0, width - 1)
    cells = (r.unsqueeze(-1) * width + c.unsqueeze(-2)).flatten(1)  # (R, C·b·b)
    marked = torch.zeros(rows, num_patches, dtype=torch.bool)
    marked.scatter_(1, cells, True)
    visible = force_count(marked, int(num_patches * visible_prob), generator)
    return ~visible


def random_mask(num_steps: int, rows: int, mask_prob: float,
                generator: torch.Generator) -> Tensor:
    """(rows, T) True = masked: T − int(T·(1 − mask_prob)) uniform positions per row (text)."""
    if not 0.0 < mask_prob < 1.0:
        raise ConfigError(f"model.v2.mask_prob={mask_prob} must be in (0, 1)")
    keep = int(num_steps * (1.0 - mask_prob))
    rank = torch.rand(rows, num_steps, generator=generator).argsort(1).argsort(1)  # (R, T)
    return rank >= keep


def num_masked(kind: str, num_steps: int, mask_prob: float) -> int:
    """The exact masked count per row each rule gives ('speech', 'image', 'text')."""
    if kind == "speech":
        return int(num_steps * mask_prob)
    return num_steps - int(num_steps * (1.0 - mask_prob))  # images and text count the kept ones


__all__ = ["block_mask_1d", "force_count", "inverse_block_mask_2d", "num_masked", "random_mask"]
