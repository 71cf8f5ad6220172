"""Speech data: fairseq-style manifests or plain folders of audio files, read with soundfile.

A manifest (``train.tsv``) is the fairseq format: the first line is the root directory (a relative
root is taken relative to the manifest's folder), then one ``relative_path<TAB>num_samples`` line
per file. Transcripts sit beside it with the same stem: ``train.ltr`` (letters, ``|`` between
words) and ``train.wrd`` (words), one line per manifest entry.

Example::

    ds = AudioDataset.from_path(Path("~/data/librispeech"), "train", max_sample_size=80_000)
    wave = ds[0]                       # (S,) float32, zero mean / unit variance
    batches = length_bucketed_batches(ds.sizes, max_tokens=1_400_000, batch_size=0,
                                      rng=np.random.default_rng(0))
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from data2vec.errors import DataError
from data2vec.files import read_text

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
LABEL_EXTENSIONS = ("ltr", "wrd")
NORM_EPS = 1e-5  # fairseq normalises with F.layer_norm over the whole waveform (eps 1e-5)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# --------------------------------------------------------------------------------- manifests --


def read_manifest(path: Path, check_files: bool = True) -> tuple[Path, list[tuple[str, int]]]:
    """(root, [(relative path, num_samples)]) of a fairseq manifest; missing files are errors
    (with `check_files`; otherwise the dataset decides, e.g. skips them with ``skip_bad``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    lines = read_text(path, DataError, "manifest (TSV)").splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: empty manifest (expected a root directory on the first line)")
    root = Path(lines[0].strip()).expanduser()
    if not root.is_absolute():
        root = path.parent / root
    entries: list[tuple[str, int]] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0].strip() or not parts[1].strip().isdigit():
            raise DataError(f"{path}:{number}: expected 'relative_path<TAB>num_samples', "
                            f"got {line!r}")
        entries.append((parts[0], int(parts[1])))
    if not entries:
        raise DataError(f"{path}: the manifest lists no audio file")
    if check_files:
        for rel, _ in entries:
            if not (root / rel).is_file():
                raise DataError(f"{path}: listed audio file not found: {root / rel}", "missing")
    return root, entries


def audio_files(folder: Path) -> list[Path]:
    """Audio files under `folder`, recursively, in sorted order."""
    files = sorted(p for p in Path(folder).rglob("*")
                   if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {folder}")
    return files


def audio_info(path: Path) -> tuple[int, int]:
    """(num_frames, sample_rate) from the header; unreadable or empty -> DataError naming it."""
    if not Path(path).is_file():
        raise DataError(f"audio file not found: {path}", "missing")
    if Path(path).stat().st_size == 0:
        raise DataError(f"{path}: empty audio file (0 bytes)", "empty")
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError)
        raise DataError(f"{path}: unreadable audio ({_one_line(e)})", "unreadable") from None
    if info.frames <= 0:
        raise DataError(f"{path}: empty audio (0 samples)", "empty")
    return int(info.frames), int(info.samplerate)


def write_manifest(audio_dir: Path, out_dir: Path, valid_fraction: float = 0.0, seed: int = 0,
                   skip_bad: bool = False) -> list[Path]:
    """Write ``train.tsv`` (and ``valid.tsv`` when valid_fraction > 0) for a folder of audio."""
    audio_dir = Path(audio_dir).expanduser().resolve()
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction={valid_fraction} must be in [0, 1)")
    rows: list[tuple[str, int]] = []
    for path in audio_files(audio_dir):
        try:
            frames, _ = audio_info(path)
        except DataError:
            if not skip_bad:
                raise
            continue
        rows.append((path.relative_to(audio_dir).as_posix(), frames))
    order = np.random.default_rng(seed).permutation(len(rows))
    num_valid = int(round(valid_fraction * len(rows)))
    splits = {"train": sorted(order[num_valid:]), "valid": sorted(order[:num_valid])}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split, items in splits.items():
        if split == "valid" and num_valid == 0:
            continue
        target = out_dir / f"{split}.tsv"
        with open(target, "w", encoding="utf-8") as f:
            f.write(f"{audio_dir}\n")
            f.writelines(f"{rows[i][0]}\t{rows[i][1]}\n" for i in items)
        written.append(target)
    return written


def _read_labels(manifest: Path, count: int) -> dict[str, list[str]]:
    """``{"ltr": [...], "wrd": [...]}`` for the label files beside `manifest` that exist."""
    labels = {}
    for ext in LABEL_EXTENSIONS:
        path = manifest.with_suffix(f".{ext}")
        if path.is_file():
            lines = read_text(path, DataError, "transcript file").splitlines()
            if len(lines) != count:
                raise DataError(f"{path}: {len(lines)} lines, but {manifest} lists {count} files")
            labels[ext] = lines
    return labels


# ------------------------------------------------------------------------------------ dataset --


def normalize_wave(wave: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the whole utterance (fairseq's layer norm, eps 1e-5)."""
    # numpy, not torch: a torch reduction on one short vector pays thread start-up costs that
    # dominate the loader when the cores are busy (tens of ms against ~0.1 ms here).
    mean, var = float(wave.mean(dtype=np.float64)), float(wave.var(dtype=np.float64))
    return ((wave - mean) / np.sqrt(var + NORM_EPS)).astype(np.float32)


def random_crop(wave: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """A random window of `size` samples (the whole wave when it is not longer)."""
    excess = wave.shape[-1] - size
    if excess <= 0:
        return wave
    start = int(torch.randint(excess + 1, (1,), generator=generator))
    return wave[..., start:start + size]


class AudioDataset:
    """Utterances as float waveforms at `sample_rate`, with sizes for bucketing and labels.

    Every file's header is read up front: a missing, unreadable or empty file, or one whose
    length differs from what the manifest states, fails naming it, or with `skip_bad` is
    dropped and counted by reason in ``skipped`` (one line per file in ``skip_messages``).
    Files shorter than `min_sample_size` are dropped too (``skipped['short']``). A sample rate
    other than `sample_rate` is a setting to fix (``resample``), never skipped. Multi-channel
    audio is averaged to mono.
    """

    def __init__(self, root: Path, entries: list[tuple[str, int]], *, sample_rate: int = 16_000,
                 resample: bool = False, min_sample_size: int = 0, normalize: bool = True,
                 skip_bad: bool = False, manifest: Path | None = None,
                 labels: dict[str, list[str]] | None = None) -> None:
        self.root, self.sample_rate, self.resample = Path(root), sample_rate, resample
        self.normalize = normalize
        self.skipped: Counter[str] = Counter()
        self.skip_messages: list[str] = []
        kept: list[int] = []
        sizes: list[int] = []
        for index, (rel, stated) in enumerate(entries):
            path = self.root / rel
            try:  # header check up front, so batches stay deterministic
                frames, rate = audio_info(path)
                if manifest is not None and frames != stated:
                    raise DataError(f"{manifest}: states {stated} samples for {path}, the file "
                                    f"has {frames} (rewrite it with 'data2vec prepare manifest')",
                                    "size_mismatch")
            except DataError as e:
                if not skip_bad:
                    raise
                self.skipped[e.reason] += 1
                self.skip_messages.append(str(e))
                continue
            self._check_rate(path, rate)  # a setting to fix, never skipped
            size = frames * sample_rate // rate
            if size < min_sample_size:
                self.skipped["short"] += 1
                continue
            kept.append(index)
            sizes.append(size)
        if not kept:
            raise DataError(f"no usable audio under {self.root} (min_sample_size="
                            f"{min_sample_size}, skipped {dict(self.skipped)})")
        self.files = [entries[i][0] for i in kept]
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.labels = {k: [v[i] for i in kept] for k, v in (labels or {}).items()}

    @classmethod
    def from_path(cls, path: Path, split: str = "train", **kwargs: Any) -> AudioDataset:
        """A manifest file, a folder holding ``{split}.tsv``, or a plain folder of audio files."""
        path = Path(path).expanduser()
        manifest = path if path.is_file() else path / f"{split}.tsv"
        if manifest.is_file():
            root, entries = read_manifest(manifest, check_files=not kwargs.get("skip_bad"))
            labels = _read_labels(manifest, len(entries))
            return cls(root, entries, labels=labels, manifest=manifest, **kwargs)
        if not path.is_dir():
            raise DataError(f"audio data not found: {path}")
        if split != "train":
            raise DataError(f"no {split}.tsv in {path}: a plain folder of audio is the train "
                            "split only (write manifests with 'data2vec prepare manifest')")
        files = audio_files(path)
        entries = [(f.relative_to(path).as_posix(), 0) for f in files]
        return cls(path, entries, **kwargs)

    def _check_rate(self, path: Path, rate: int) -> None:
        if rate != self.sample_rate and not self.resample:
            raise DataError(f"{path}: sample rate {rate} Hz, expected {self.sample_rate} Hz "
                            "(set data.resample=true to convert)")

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        """File of example `index`."""
        return self.root / self.files[index]

    def __getitem__(self, index: int) -> Tensor:
        """The whole utterance: (S,) float32 at ``sample_rate``, normalised if asked."""
        path = self.path(index)
        try:
            data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (S, C)
        except Exception as e:
            raise DataError(f"{path}: unreadable audio ({_one_line(e)})", "unreadable") from None
        if data.shape[0] == 0:
            raise DataError(f"{path}: empty audio (0 samples)", "empty")
        self._check_rate(path, rate)
        wave = data.mean(axis=1)  # (S,) mono
        if rate != self.sample_rate:
            from scipy.signal import resample_poly

            common = math.gcd(rate, self.sample_rate)
            wave = resample_poly(wave, self.sample_rate // common, rate // common)
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        return torch.from_numpy(normalize_wave(wave) if self.normalize else wave)


# ------------------------------------------------------------------------------------ batching --


def length_bucketed_batches(sizes: np.ndarray, max_tokens: int, batch_size: int,
                            rng: np.random.Generator, max_sample_size: int = 0) -> list[list[int]]:
    """Batches of similar length, in shuffled order.

    Examples are sorted by size (ties in random order), then cut greedily: a batch is full when
    ``count · longest`` would pass `max_tokens` samples (longest capped at `max_sample_size`,
    the crop), or at `batch_size` examples when max_tokens is 0. Drawn from `rng` only.
    """
    if max_tokens <= 0 and batch_size <= 0:
        raise DataError("set data.max_tokens or data.batch_size to a positive number")
    capped = np.minimum(sizes, max_sample_size) if max_sample_size > 0 else np.asarray(sizes)
    order = rng.permutation(len(sizes))
    order = order[np.argsort(capped[order], kind="stable")]  # by size, shuffled ties
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order.tolist():
        longest = max(capped[index], capped[current[-1]] if current else 0)
        full = ((len(current) + 1) * longest > max_tokens if max_tokens > 0
                else len(current) >= batch_size)
        if current and full:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return [batches[i] for i in rng.permutation(len(batches))]


class LengthBucketBatchSampler:
    """:func:`length_bucketed_batches` as a torch ``batch_sampler``; reshuffled by ``set_epoch``."""

    def __init__(self, sizes: np.ndarray, max_tokens: int, batch_size: int, seed: int = 0,
                 max_sample_size: int = 0) -> None:
        self.sizes, self.max_tokens, self.batch_size = sizes, max_tokens, batch_size
        self.seed, self.max_sample_size, self.epoch = seed, max_sample_size, 0

    def set_epoch(self, epoch: int) -> None:
        """Batches of the next iteration come from (seed, epoch)."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        return length_bucketed_batches(self.sizes, self.max_tokens, self.batch_size, rng,
                                       self.max_sample_size)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


__all__ = ["AUDIO_EXTENSIONS", "AudioDataset", "LengthBucketBatchSampler", "audio_files",
           "audio_info", "length_bucketed_batches", "normalize_wave", "random_crop",
           "read_manifest", "write_manifest"]
