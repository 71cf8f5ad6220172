"""Images: patch embedding, positions, CLS / mask tokens, and BEiT block-wise masking.

The front-end covers the released data2vec 1.0 vision models (BEiT-style: no absolute positions,
a shared relative position bias in the encoder, a CLS token and a learned mask token) and can
express HuggingFace ``Data2VecVisionModel`` embeddings exactly: ``cls_token``, optional
``mask_token``, optional learned absolute positions over CLS + patches, a p×p stride-p conv patch
embedding. data2vec 2.0 uses the fixed 2-D sin-cos table (``positions: sincos``).

Example::

    frontend = build_frontend(ImageFrontEndConfig(image_size=32, patch_size=4), dim=128)
    g = torch.Generator().manual_seed(0)
    mask = block_mask(8, frontend.grid, 32, 4, 0.3, None, g)   # (8, 64) True = masked
    x, _ = frontend(images, None, mask)                         # (8, 1 + 64, 128), CLS first
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from data2vec.errors import ConfigError, DataError
from data2vec.modalities.base import FrontEnd

PositionKind = Literal["learned", "sincos", "none"]

# Tries per block before the BEiT procedure gives up on growing the mask (BEiT uses 10).
BLOCK_ATTEMPTS = 10


@dataclass
class ImageFrontEndConfig:
    """Patch embedding and the tokens around it."""

    image_size: int = 224
    """Input height and width in pixels (square images; the patch grid is fixed by it)."""
    patch_size: int = 16
    """Patch height and width in pixels; image_size must be a multiple of it."""
    in_channels: int = 3
    """Colour channels of the input (grayscale demo images are repeated to 3)."""
    positions: PositionKind = "none"
    """Absolute positions: 'none' (BEiT / data2vec 1.0, which rely on the encoder's relative
    position bias), 'sincos' (fixed 2-D sin-cos table as MAE / data2vec 2.0, never trained, not
    added to CLS) or 'learned' (trainable, over CLS + patches as HF
    ``use_absolute_position_embeddings``)."""
    cls_token: bool = True
    """Prepend a learned CLS token (num_extra_tokens = 1)."""
    mask_token: bool = True
    """Replace masked patch embeddings by a learned vector (BEiT). False: masked patches are left
    as they are, for students that drop them instead (data2vec 2.0)."""


@dataclass
class ImageMaskConfig:
    """BEiT block-wise masking over the patch grid, with an exact masked count per image."""

    mask_ratio: float = 0.6
    """Fraction of patches masked: round(mask_ratio · num_patches) of them (120/196 ≈ 0.612 in
    the released v1 recipe)."""
    min_block: int = 16
    """Smallest block area in patches (BEiT ``min_num_patches``)."""
    max_block: int | None = None
    """Largest block area in patches; None = no limit besides the patches still to mask."""
    min_aspect: float = 0.3
    """Smallest block aspect ratio (height / width); drawn log-uniformly."""
    max_aspect: float | None = None
    """Largest block aspect ratio; None = 1 / min_aspect."""


# ---------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------


def num_masked_patches(mask_ratio: float, num_patches: int) -> int:
    """round(mask_ratio · num_patches), halves rounded up."""
    if not 0.0 <= mask_ratio <= 1.0:
        raise ConfigError(f"model.masking.mask_ratio={mask_ratio} must be in [0, 1]")
    return int(math.floor(mask_ratio * num_patches + 0.5))


def _log_aspect_range(min_aspect: float, max_aspect: float | None) -> tuple[float, float]:
    if min_aspect <= 0:
        raise ConfigError(f"model.masking.min_aspect={min_aspect} must be > 0")
    hi = 1.0 / min_aspect if max_aspect is None else max_aspect
    if hi < min_aspect:
        raise ConfigError(f"model.masking.max_aspect={max_aspect} is below "
                          f"min_aspect={min_aspect}")
    return math.log(min_aspect), math.log(hi)


def add_random_block(mask: Tensor, min_area: float, max_area: float,
                     log_aspect: tuple[float, float], generator: torch.Generator) -> int:
    """Mask one random rectangle in ``mask`` (H, W) bool, in place; return the patches it added.

    BEiT's step: up to 10 tries of area ~ U(min_area, max_area) (either order), aspect ratio
    log-uniform in ``log_aspect``, h = round(√(area·aspect)), w = round(√(area/aspect)), a random
    position with h < H and w < W; a try is kept if it adds between 1 and ``max_area`` new
    patches (so the caller never overshoots its target). 0 = every try failed.
    """
    grid_h, grid_w = mask.shape
    draws = torch.rand(BLOCK_ATTEMPTS, 4, generator=generator, dtype=torch.float64).tolist()
    for u_area, u_aspect, u_top, u_left in draws:
        area = min_area + (max_area - min_area) * u_area
        aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u_aspect)
        h = round(math.sqrt(area * aspect))
        w = round(math.sqrt(area / aspect))
        if not (h < grid_h and w < grid_w):  # BEiT keeps blocks strictly inside the grid
            continue
        top = int(u_top * (grid_h - h + 1))
        left = int(u_left * (grid_w - w + 1))
        region = mask[top:top + h, left:left + w]  # a view: filling it edits `mask`
        added = h * w - int(region.sum())
        if 0 < added <= max_area:
            region.fill_(True)
            return added
    return 0


def force_mask_count(mask: Tensor, num_masked: int, generator: torch.Generator) -> Tensor:
    """Mask (or unmask) random single patches of ``mask`` (N,) bool until exactly ``num_masked``
    are True: a new tensor, or ``mask`` itself when its count is already exact."""
    missing = num_masked - int(mask.sum())
    if missing == 0:
        return mask
    pool = (~mask if missing > 0 else mask).nonzero().squeeze(1)  # candidates to flip
    pick = pool[torch.randperm(pool.numel(), generator=generator)[:abs(missing)]]
    mask = mask.clone()
    mask[pick] = missing > 0
    return mask


def block_mask_example(grid: tuple[int, int], num_masked: int, min_block: int,
                       min_aspect: float, max_aspect: float | None,
                       generator: torch.Generator, max_block: int | None = None) -> Tensor:
    """BEiT block-wise mask of one image: (N,) bool, True = masked, exactly ``num_masked`` True.

    Blocks (see :func:`add_random_block`) of area between ``min_block`` and the patches still to
    mask (capped by ``max_block``) are added until the target is reached. BEiT stops short when
    10 tries in a row add nothing (typically the last few patches, when no block fits the
    remainder); we then mask random single unmasked patches to reach the exact count. The block
    step never overshoots, but :func:`force_mask_count` would unmask random patches if it did.
    N = H·W in row-major order (patch (r, c) is index r·W + c), like the patch embedding.
    """
    grid_h, grid_w = grid
    num_patches = grid_h * grid_w
    if not 0 <= num_masked <= num_patches:
        raise ConfigError(f"cannot mask {num_masked} of {num_patches} patches (grid {grid})")
    if min_block < 1:
        raise ConfigError(f"model.masking.min_block={min_block} must be >= 1")
    if max_block is not None and max_block < 1:
        raise ConfigError(f"model.masking.max_block={max_block} must be >= 1 (or null)")
    log_aspect = _log_aspect_range(min_aspect, max_aspect)
    cap = num_patches if max_block is None else max_block
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    count = 0
    while count < num_masked:
        added = add_random_block(mask, min_block, min(num_masked - count, cap), log_aspect,
                                 generator)
        if added == 0:  # stalled: finish with single patches below
            break
        count += added
    return force_mask_count(mask.flatten(), num_masked, generator)


def block_mask(batch_size: int, grid: tuple[int, int], num_masked: int, min_block: int,
               min_aspect: float, max_aspect: float | None, generator: torch.Generator,
               max_block: int | None = None) -> Tensor:
    """(B, N) bool block-wise masks, True = masked, exactly ``num_masked`` per row; each row is
    :func:`block_mask_example` drawn from ``generator`` in turn."""
    rows = [block_mask_example(grid, num_masked, min_block, min_aspect, max_aspect, generator,
                               max_block) for _ in range(batch_size)]
    return torch.stack(rows) if rows else torch.zeros(0, grid[0] * grid[1], dtype=torch.bool)


def compute_mask(cfg: ImageMaskConfig, batch_size: int, grid: tuple[int, int],
                 generator: torch.Generator) -> Tensor:
    """(B, N) masks as ``cfg`` asks (a data loader masking per example passes batch_size 1)."""
    num_masked = num_masked_patches(cfg.mask_ratio, grid[0] * grid[1])
    return block_mask(batch_size, grid, num_masked, cfg.min_block, cfg.min_aspect,
                      cfg.max_aspect, generator, cfg.max_block)


# ---------------------------------------------------------------------------------------------
# Front-end
# ---------------------------------------------------------------------------------------------


def sincos_2d(grid: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2-D sin-cos positions (N, dim) over an (H, W) grid, row-major, MAE's formula.

    With ω_k = 10000^(−k/(dim/4)), k < dim/4, patch (r, c) gets
    [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)]: MAE's first half encodes the column index.
    """
    if dim % 4:
        raise ConfigError(f"sin-cos positions need model.encoder.dim divisible by 4, got {dim}")
    grid_h, grid_w = grid
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega  # (N, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, dim/2)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (N, dim)


class ImageFrontEnd(FrontEnd):
    """(B, C, H, W) images -> (B, [CLS] + N patches, D).

    ``local_features``: conv patch embedding (kernel = stride = patch) -> (B, N, D), row-major.
    ``contextualize``: mask token at masked patches, absolute positions (if any), CLS first.
    """

    local_modules = ("patch_embed",)

    def __init__(self, cfg: ImageFrontEndConfig, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(f"model.frontend.image_size={cfg.image_size} is not a multiple of "
                              f"model.frontend.patch_size={cfg.patch_size}")
        kw = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.dim = dim
        side = cfg.image_size // cfg.patch_size
        self.grid = (side, side)
        self.window_size = self.grid
        self.num_patches = side * side
        self.num_extra_tokens = 1 if cfg.cls_token else 0
        self.patch_embed = nn.Conv2d(cfg.in_channels, dim, cfg.patch_size, stride=cfg.patch_size,
                                     **kw)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim, **kw)) if cfg.cls_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim, **kw)) if cfg.mask_token else None
        if cfg.positions == "learned":
            self.pos_embed = nn.Parameter(
                torch.zeros(1, self.num_extra_tokens + self.num_patches, dim, **kw))
        elif cfg.positions == "sincos":
            # A buffer: never trained, copied (not averaged) into the teacher, rebuilt from the
            # grid rather than stored in checkpoints.
            table = sincos_2d(self.grid, dim).to(device=device, dtype=dtype).unsqueeze(0)
            self.register_buffer("pos_embed", table, persistent=False)  # (1, N, D)
        else:
            self.pos_embed = None

    def local_features(self, source: Tensor,
                       padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(B, C, H, W) -> patch embeddings (B, N, D); images have no padding (None)."""
        c, s = self.cfg.in_channels, self.cfg.image_size
        if source.ndim != 4 or tuple(source.shape[1:]) != (c, s, s):
            raise DataError(f"image batch has shape {tuple(source.shape)}; expected "
                            f"(B, {c}, {s}, {s}) (model.frontend.in_channels / image_size)")
        if padding_mask is not None:
            raise DataError("images take no padding_mask; got one of shape "
                            f"{tuple(padding_mask.shape)}")
        x = self.patch_embed(source)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2), None  # (B, N, D)

    def contextualize(self, features: Tensor, padding_mask: Tensor | None,
                      mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Mask token where ``mask`` (B, N) is True, positions, CLS -> (B, 1 + N, D), padding."""
        batch, n, _ = features.shape
        x = features
        if mask is not None and self.mask_token is not None:
            if tuple(mask.shape) != (batch, n):
                raise DataError(f"image mask has shape {tuple(mask.shape)}; expected "
                                f"({batch}, {n}) (batch, patches)")
            x = torch.where(mask.bool().unsqueeze(-1), self.mask_token.to(x.dtype), x)
        if self.cfg.positions == "sincos":
            x = x + self.pos_embed.to(x.dtype)  # patches only: CLS gets no position
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.to(x.dtype).expand(batch, -1, -1), x], dim=1)
        if self.cfg.positions == "learned":
            x = x + self.pos_embed.to(x.dtype)  # (1, extra + N, D): CLS has its own row, as HF
        if padding_mask is not None and self.num_extra_tokens:
            extra = padding_mask.new_zeros(batch, self.num_extra_tokens)
            padding_mask = torch.cat([extra, padding_mask], dim=1)
        return x, padding_mask

    @torch.no_grad()
    def init_weights(self) -> None:
        """Xavier-uniform patch conv, zero bias; trunc-normal(0.02) tokens and learned positions.

        The conv is a linear map of the flattened C·p·p patch (init_bert_ skips convs), so it is
        initialised like a Linear by fan-in and fan-out (MAE, data2vec 2.0): PyTorch's conv
        default (variance 1/(3·fan_in)) would shrink patch features relative to the tokens.
        """
        weight = self.patch_embed.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        if self.patch_embed.bias is not None:
            nn.init.zeros_(self.patch_embed.bias)
        for p in (self.cls_token, self.mask_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
        if self.cfg.positions == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        elif self.cfg.positions == "sincos":
            # Rebuilt here so a model built on the meta device gets its table when filled.
            self.pos_embed.copy_(sincos_2d(self.grid, self.dim).unsqueeze(0))


def build_frontend(cfg: ImageFrontEndConfig, dim: int) -> ImageFrontEnd:
    """The image front-end projecting to the encoder width ``dim``."""
    return ImageFrontEnd(cfg, dim)


__all__ = ["ImageFrontEnd", "ImageFrontEndConfig", "ImageMaskConfig", "add_random_block",
           "block_mask", "block_mask_example", "build_frontend", "compute_mask",
           "force_mask_count", "num_masked_patches", "sincos_2d"]
