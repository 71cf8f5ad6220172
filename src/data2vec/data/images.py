"""Image data: a folder of Pillow-readable files (class subfolders give labels) and augmentation.

No torchvision (it would replace the CPU torch): decoding is Pillow, augmentation is Pillow + torch
with an explicit generator. Pre-training augmentation is the BEiT / data2vec one without colour
jitter: random resized crop (area scale from ``data.crop_scale``, aspect 3/4..4/3, bicubic) and a
horizontal flip with probability 0.5, then ``(x / 255 - mean) / std`` per channel.

Normalisation statistics (``data.image_norm``): ``imagenet`` = mean (0.485, 0.456, 0.406), std
(0.229, 0.224, 0.225), what the original data2vec vision code uses; ``half`` = mean = std = 0.5
(pixels to [-1, 1]). Grey (in_channels = 1) input uses the channel average of either.

Example::

    ds = ImageFolderDataset(Path("~/data/imagenet/train"), in_channels=3)
    image, label = ds.load(0), ds.targets[0]
    x = train_transform(image, 224, (0.08, 1.0), True, IMAGENET_STATS,
                        torch.Generator().manual_seed(0))        # (3, 224, 224)
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from data2vec.errors import DataError

Stats = tuple[tuple[float, ...], tuple[float, ...]]
IMAGENET_STATS: Stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF_STATS: Stats = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
NORM_STATS: dict[str, Stats] = {"imagenet": IMAGENET_STATS, "half": HALF_STATS}
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def image_extensions() -> set[str]:
    """Every file extension Pillow can open (lower case, with the dot)."""
    Image.init()
    return set(Image.registered_extensions())


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _convert(image: Image.Image, mode: str) -> Image.Image:
    """To 'RGB' or 'L' from any mode: CMYK, palette, LA/RGBA (alpha dropped), 16-bit and float."""
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        # Pillow's own I;16 -> L conversion clips at 255 instead of scaling: rescale by hand.
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode in _SIXTEEN_BIT or values.max() > 255 else 255.0
        peak = 1.0 if image.mode == "F" and values.max() <= 1.0 else peak
        grey = np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # honours palette transparency before it is dropped
    return image if image.mode == mode else image.convert(mode)


def open_image(path: Path, in_channels: int = 3) -> Image.Image:
    """Decode `path` to RGB (in_channels 3) or L (1); empty or corrupt files -> DataError."""
    if in_channels not in (1, 3):
        raise DataError(f"in_channels={in_channels}: images load as 1 (grey) or 3 (RGB) channels")
    _check_not_empty(path)
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)  # camera photos: apply the stored rotation
            return _convert(image, "L" if in_channels == 1 else "RGB")
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBomb..
        raise DataError(f"{path}: unreadable image ({_one_line(e)})", "unreadable") from None


def _check_not_empty(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e.strerror or e})", "missing") from None
    if size == 0:
        raise DataError(f"{path}: empty image file (0 bytes)", "empty")


def _probe(path: Path) -> None:
    """Cheap validity check (header + structure) used to skip bad files up front; pixel data
    that fails to decode later is caught by the loader (skipped with ``skip_bad``)."""
    _check_not_empty(path)
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as e:
        raise DataError(f"{path}: unreadable image ({_one_line(e)})", "unreadable") from None


class ImageFolderDataset:
    """Images under `root`: class subfolders (searched recursively) -> labels; flat = unlabelled.

    ``targets[i]`` is the class index of file i (-1 when unlabelled), ``classes`` the sorted
    subfolder names. Empty files always fail at construction, naming the file; with `skip_bad`
    every file is probed up front and unreadable ones are dropped, counted by reason in
    ``skipped`` (``skip_messages`` says which and why). Pixel data that fails to decode only
    when loaded is the collator's to skip (:mod:`data2vec.data.collate`).
    """

    def __init__(self, root: Path, in_channels: int = 3, skip_bad: bool = False) -> None:
        self.root, self.in_channels = Path(root).expanduser(), in_channels
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        extensions = image_extensions()

        def images_under(folder: Path) -> list[Path]:
            return sorted(p for p in folder.rglob("*")
                          if p.suffix.lower() in extensions and p.is_file()
                          and not any(part.startswith(".") for part in p.relative_to(folder).parts))

        subdirs = sorted(d for d in self.root.iterdir()
                         if d.is_dir() and not d.name.startswith("."))
        per_class = {d.name: images_under(d) for d in subdirs}
        per_class = {name: files for name, files in per_class.items() if files}
        self.classes = sorted(per_class)
        if per_class:
            pairs = [(f, c) for c, name in enumerate(self.classes) for f in per_class[name]]
        else:
            pairs = [(f, -1) for f in images_under(self.root)]
        if not pairs:
            raise DataError(f"no image files under {self.root}")
        self.skipped: Counter[str] = Counter()
        self.skip_messages: list[str] = []
        self.files: list[Path] = []
        self.targets: list[int] = []
        for path, target in pairs:
            try:
                (_probe if skip_bad else _check_not_empty)(path)
            except DataError as e:
                if not skip_bad:
                    raise
                self.skipped[e.reason] += 1
                self.skip_messages.append(str(e))
                continue
            self.files.append(path)
            self.targets.append(target)
        if not self.files:
            raise DataError(f"no readable image under {self.root} (skipped {dict(self.skipped)})")

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        """File of example `index`."""
        return self.files[index]

    def load(self, index: int) -> Image.Image:
        """Decoded image `index` in RGB or L."""
        return open_image(self.files[index], self.in_channels)


# --------------------------------------------------------------------------------- transforms --


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            generator: torch.Generator,
                            ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop: area fraction ~ U(scale), aspect (w/h)
    log-uniform in `ratio`, up to 10 tries, else the largest central crop within `ratio`."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    # A fixed number of draws, whichever try succeeds, keeps the generator stream predictable.
    draws = torch.rand(CROP_ATTEMPTS, 4, generator=generator, dtype=torch.float64).tolist()
    for u_scale, u_ratio, u_top, u_left in draws:
        target = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
            return left, top, left + w, top + h
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def to_tensor(image: Image.Image, stats: Stats) -> Tensor:
    """(C, H, W) float32: pixels / 255, minus mean, over std (per channel)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (H, W[, C])
    pixels = pixels.unsqueeze(-1) if pixels.dim() == 2 else pixels
    channels = pixels.shape[-1]
    mean, std = (torch.tensor(s, dtype=torch.float32) for s in stats)
    if channels == 1:  # grey: one statistic, the average of the colour ones
        mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
    return ((pixels - mean) / std).permute(2, 0, 1).contiguous()  # (C, H, W)


def train_transform(image: Image.Image, image_size: int, scale: tuple[float, float], hflip: bool,
                    stats: Stats, generator: torch.Generator) -> Tensor:
    """Random resized crop (bicubic) to image_size², optional flip (p = 0.5), normalise."""
    box = random_resized_crop_box(image.width, image.height, scale, generator)
    out = image.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
    flip = float(torch.rand(1, generator=generator, dtype=torch.float64)) < 0.5
    if hflip and flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(out, stats)


def eval_transform(image: Image.Image, image_size: int, stats: Stats,
                   crop_pct: float = 1.0) -> Tensor:
    """Resize the short side to image_size / crop_pct, centre crop image_size², normalise
    (crop_pct 0.875 is the usual ImageNet evaluation; 1.0 keeps the whole image)."""
    short = round(image_size / crop_pct)
    scale = short / min(image.width, image.height)
    width, height = max(image_size, round(image.width * scale)), max(image_size,
                                                                     round(image.height * scale))
    out = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - image_size) // 2, (height - image_size) // 2
    return to_tensor(out.crop((left, top, left + image_size, top + image_size)), stats)


__all__ = ["HALF_STATS", "IMAGENET_STATS", "NORM_STATS", "ImageFolderDataset", "eval_transform",
           "image_extensions", "open_image", "random_resized_crop_box", "to_tensor",
           "train_transform"]
