"""The pre-training loader: an endless, resumable, rank-aware stream of :class:`Batch` objects.

Each epoch has a *plan*: a list of batches (example indices) drawn from ``(run.seed, epoch)``
only — a seeded permutation cut into global batches for images and text, length-bucketed batches
for speech. Epochs follow one another without end, each reshuffled. The loader's state is just
``(epoch, position)``: the plan and every crop / flip / mask are pure functions of the seed and
indices (see :mod:`data2vec.data.collate`), so a loader restored from ``state_dict()`` continues
with exactly the batches an uninterrupted one would have produced, and ``num_workers > 0``
(a torch DataLoader building whole batches in worker processes) yields the same batches too.

Distributed: images and text cut the epoch into *global* batches of ``batch_size × world_size``
examples, rank r taking examples ``[r·b, (r+1)·b)`` of each; since an example's augmentation and
mask depend only on (seed, epoch, example index), the ranks together see exactly what one process
with the global batch sees. Speech batches (bucketed by length) are dealt round-robin to ranks.

Example::

    loader = build_pretrain_loader(cfg)          # demo data prepared on first use
    batch = next(loader)                         # Batch(source, padding_mask, mask, ...)
    state = loader.state_dict()                  # {"epoch": 0, "position": 1}
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from data2vec.batch import Batch
from data2vec.config import Config, V2Config
from data2vec.data.audio import AudioDataset, length_bucketed_batches
from data2vec.data.collate import (
    STREAM_ORDER,
    Collator,
    ImageCollator,
    SpeechCollator,
    TextCollator,
    derive_seed,
)
from data2vec.data.demo import default_demo_dir, prepare_demo
from data2vec.data.images import NORM_STATS, ImageFolderDataset
from data2vec.data.text import (
    TokenBlockDataset,
    is_hf_dataset,
    load_documents,
    text_files,
    usable_text_files,
)
from data2vec.data.tokenizer import BPETokenizer
from data2vec.errors import ConfigError, DataError

if TYPE_CHECKING:  # data.joint imports this module
    from data2vec.data.joint import JointBatches
    from data2vec.joint_config import JointConfig

log = logging.getLogger("data2vec")
Plan = list[tuple[list[int], int]]  # this rank's batches: (example indices, global batch index)

# ------------------------------------------------------------------------------- data and vocab --


def resolve_data_path(cfg: Config) -> Path:
    """``cfg.data.path``, or the modality's demo corpus (prepared on first use)."""
    if cfg.data.path:
        path = Path(cfg.data.path).expanduser()
        if "," not in cfg.data.path and not path.exists():
            raise DataError(f"data.path not found: {path}")
        return path
    root = (Path(cfg.data.demo_dir).expanduser() / cfg.modality if cfg.data.demo_dir
            else default_demo_dir(cfg.modality))
    return prepare_demo(cfg.modality, root, vocab_size=cfg.data.vocab_size)


def _tokenizer_dir(cfg: Config, data_path: Path) -> Path:
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer).expanduser()
    first = Path(str(data_path).split(",")[0]).expanduser()
    return (first if first.is_dir() else first.parent) / "tokenizer"


CORPUS_RECORD = "corpus.json"
"""Beside a tokenizer trained here: the files it was trained on (a cache key, see below)."""


def _corpus_record(candidates: list[Path], used: list[Path], vocab_size: int) -> dict[str, Any]:
    """What a trained tokenizer depends on: every candidate file's name, size and mtime, and
    the vocabulary size (the files actually used are kept for the reader)."""
    def stat(path: Path) -> list[Any]:
        info = path.stat()
        return [path.resolve().as_posix(), info.st_size, info.st_mtime_ns]

    return {"candidates": [stat(p) for p in candidates], "vocab_size": vocab_size,
            "used": [p.resolve().as_posix() for p in used]}


def _stale_reason(directory: Path, record: dict[str, Any]) -> str | None:
    """Why the tokenizer cached in `directory` no longer fits the corpus, or None."""
    path = directory / CORPUS_RECORD
    if not path.is_file():
        return None  # not trained here (the demo's, or one the user placed): trusted as given
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{path} is unreadable"
    if saved.get("candidates") != record["candidates"]:
        return "the corpus files changed since it was trained"
    if saved.get("vocab_size") != record["vocab_size"]:
        return "data.vocab_size changed"
    return None


def load_or_train_tokenizer(cfg: Config, data_path: Path | None = None) -> BPETokenizer:
    """``cfg.data.tokenizer``, else ``<data dir>/tokenizer``, else a BPE trained there now.

    A tokenizer trained here is trained only on the files that read as text (a bad one fails,
    or with ``data.skip_bad`` is left out) and records them in ``corpus.json``; when the
    corpus changes (a file fixed, added or removed), it is trained again, so nothing learnt
    from a skipped or changed file survives in the cache.
    """
    data_path = resolve_data_path(cfg) if data_path is None else data_path
    directory = _tokenizer_dir(cfg, data_path)
    if cfg.data.tokenizer:
        return BPETokenizer.load(directory)
    record: dict[str, Any] | None = None
    if is_hf_dataset(data_path):
        if (directory / "vocab.json").is_file():
            return BPETokenizer.load(directory)
        docs, _ = load_documents(data_path, "train")
        corpus: Any = iter([line for doc in docs for line in doc])
    else:
        candidates = text_files(data_path, "train")
        if (directory / "vocab.json").is_file():
            record = _corpus_record(candidates, [], cfg.data.vocab_size)
            stale = _stale_reason(directory, record)
            if stale is None:
                return BPETokenizer.load(directory)
            log.warning("retraining the tokenizer in %s: %s", directory, stale)
        corpus, _ = usable_text_files(candidates, cfg.data.skip_bad)
        record = _corpus_record(candidates, corpus, cfg.data.vocab_size)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:  # train beside, then rename, so a concurrent rank never reads half a vocabulary
        tokenizer = BPETokenizer.train(corpus, cfg.data.vocab_size, tmp)
        if record is not None:
            (tmp / CORPUS_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        _replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def _replace_dir(new: Path, final: Path) -> None:
    """Move `new` to `final`, replacing an older `final` (the old one is removed after)."""
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(OSError):
        final.rename(old)
    with contextlib.suppress(OSError):  # another process won the race: theirs is the same
        new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def sync_text_vocab(cfg: Config, tokenizer: BPETokenizer) -> Config:
    """Set ``model.frontend.vocab_size`` from the tokenizer and check pad id and block length."""
    frontend = cfg.model.frontend
    if frontend.pad_index != tokenizer.pad_id:
        raise ConfigError(f"model.frontend.pad_index={frontend.pad_index} but the tokenizer's "
                          f"<pad> id is {tokenizer.pad_id}")
    if cfg.data.tokens_per_sample > frontend.max_positions:
        raise ConfigError(f"data.tokens_per_sample={cfg.data.tokens_per_sample} exceeds "
                          f"model.frontend.max_positions={frontend.max_positions}")
    frontend.vocab_size = tokenizer.vocab_size
    return cfg


# ----------------------------------------------------------------------------------- the loader --


class _PlannedBatches(Dataset):
    """Batch ``i`` of one epoch's plan, built on demand (in a worker when num_workers > 0)."""

    def __init__(self, collator: Collator, epoch: int, plan: Plan) -> None:
        self.collator, self.epoch, self.plan = collator, epoch, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> Batch:
        indices, batch_key = self.plan[i]
        return self.collator(self.epoch, indices, batch_key)


def _unchanged(batch: Batch) -> Batch:
    return batch


class PretrainLoader:
    """Endless iterator of batches with a ``(epoch, position)`` state; see the module docstring.

    ``skipped`` counts the files left out by reason (too short; with ``data.skip_bad`` missing,
    unreadable, empty, not UTF-8, ... — up front, or when their data fails to decode mid-run);
    ``skip_messages`` holds one line per skipped file, ``bad_files`` the files found bad while
    loading (path -> reason, kept in checkpoints); ``tokenizer`` is set for text.
    """

    tokenizer: BPETokenizer | None = None

    def __init__(self, collator: Collator, make_plan: Callable[[int], Plan],
                 num_workers: int = 0, skipped: Counter[str] | None = None,
                 skip_messages: list[str] | None = None) -> None:
        self.collator, self.make_plan, self.num_workers = collator, make_plan, num_workers
        self.skipped: Counter[str] = Counter(skipped or {})
        self.skip_messages: list[str] = list(skip_messages or [])
        self.bad_files: dict[str, str] = {}
        self.epoch, self.position = 0, 0
        self._plan_epoch, self._plan = -1, []
        self._iterator: Generator[Batch, None, None] | None = None
        if not self.plan(0):
            raise DataError("the data yields no batch for this rank: fewer examples than one "
                            "global batch (data.batch_size × world size) or data.max_tokens")

    def plan(self, epoch: int) -> Plan:
        """This rank's batches of `epoch` (cached for the current epoch)."""
        if epoch != self._plan_epoch:
            self._plan_epoch, self._plan = epoch, self.make_plan(epoch)
        return self._plan

    def batches_per_epoch(self) -> int:
        """Number of batches of the current epoch for this rank."""
        return len(self.plan(self.epoch))

    def state_dict(self) -> dict[str, int]:
        """Where the next batch comes from: ``{"epoch", "position"}`` (batches already yielded)."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved state; the next batch is the one that followed it."""
        missing = {"epoch", "position"} - set(state)
        if missing:
            raise DataError(f"loader state lacks {sorted(missing)}; got keys {sorted(state)}")
        self.close()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def close(self) -> None:
        """Stop the current pass (and its worker processes, if any)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = self._batches()
        batch = next(self._iterator)
        for path, (reason, message) in getattr(batch, "skipped_files", {}).items():
            if path not in self.bad_files:  # each bad file counted once, however often drawn
                self.bad_files[path] = reason
                self.skipped[reason] += 1
                self.skip_messages.append(message)
                log.warning("skipped: %s", message)
        return batch

    def restore_bad_files(self, bad_files: dict[str, str]) -> None:
        """Count the files a resumed run had found bad before its checkpoint."""
        for path, reason in bad_files.items():
            if path not in self.bad_files:
                self.bad_files[path] = reason
                self.skipped[reason] += 1

    def _batches(self) -> Generator[Batch, None, None]:
        while True:
            plan = self.plan(self.epoch)
            source = _PlannedBatches(self.collator, self.epoch, plan)
            for batch in self._build(source, range(self.position, len(plan))):
                self.position += 1  # counted before the yield: state_dict() sees it
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    def _build(self, source: _PlannedBatches, todo: range) -> Iterator[Batch]:
        if len(todo) == 0:
            return iter(())
        if self.num_workers == 0:
            return (source[i] for i in todo)
        return iter(DataLoader(source, batch_size=None, sampler=list(todo),
                               num_workers=self.num_workers, collate_fn=_unchanged))


# ------------------------------------------------------------------------------------ the plans --


def _global_batches(num_examples: int, seed: int, batch_size: int, rank: int,
                    world_size: int) -> Callable[[int], Plan]:
    """Seeded permutation per epoch, cut into global batches (the rest dropped), rank's slice."""
    global_size = batch_size * world_size

    def make_plan(epoch: int) -> Plan:
        order = np.random.default_rng(derive_seed(seed, STREAM_ORDER, epoch)).permutation(
            num_examples)
        plan = []
        for b in range(num_examples // global_size):
            start = b * global_size + rank * batch_size
            plan.append((order[start:start + batch_size].tolist(), b))
        return plan

    return make_plan


def _bucketed_batches(dataset: AudioDataset, cfg: Config, rank: int,
                      world_size: int) -> Callable[[int], Plan]:
    """Length-bucketed batches per epoch, dealt round-robin to ranks (equal counts)."""
    data = cfg.data

    def make_plan(epoch: int) -> Plan:
        rng = np.random.default_rng(derive_seed(cfg.run.seed, STREAM_ORDER, epoch))
        batches = length_bucketed_batches(dataset.sizes, data.max_tokens, data.batch_size, rng,
                                          data.max_sample_size)
        usable = len(batches) // world_size * world_size
        return [(batches[j], j) for j in range(rank, usable, world_size)]

    return make_plan


def _clones(cfg: Config) -> int:
    return cfg.model.v2.clone_batch if cfg.version == 2 else 1


def _v2(cfg: Config) -> V2Config | None:
    """The data2vec 2.0 settings the collators mask with (None for version 1)."""
    return cfg.model.v2 if cfg.version == 2 else None


def _speech_loader(cfg: Config, path: Path, split: str, rank: int,
                   world_size: int) -> PretrainLoader:
    from data2vec.modalities.speech import parse_conv_spec

    data = cfg.data
    dataset = AudioDataset.from_path(path, split, sample_rate=data.sample_rate,
                                     resample=data.resample, min_sample_size=data.min_sample_size,
                                     normalize=data.normalize, skip_bad=data.skip_bad)
    collator = SpeechCollator(dataset, cfg.run.seed, data.max_sample_size, data.crop_to_shortest,
                              parse_conv_spec(cfg.model.frontend.conv_spec), cfg.model.masking,
                              _clones(cfg), _v2(cfg), data.skip_bad)
    return PretrainLoader(collator, _bucketed_batches(dataset, cfg, rank, world_size),
                          data.num_workers, dataset.skipped, dataset.skip_messages)


def _image_loader(cfg: Config, path: Path, split: str, rank: int,
                  world_size: int) -> PretrainLoader:
    data, frontend = cfg.data, cfg.model.frontend
    folder = path / split if (path / split).is_dir() else path
    if folder == path and split != "train":
        raise DataError(f"no {split}/ folder in {path}")
    dataset = ImageFolderDataset(folder, frontend.in_channels, data.skip_bad)
    side = frontend.image_size // frontend.patch_size
    collator = ImageCollator(dataset, cfg.run.seed, frontend.image_size, tuple(data.crop_scale),
                             data.hflip, NORM_STATS[data.image_norm], (side, side),
                             cfg.model.masking, _clones(cfg), _v2(cfg), data.skip_bad)
    plan = _global_batches(len(dataset), cfg.run.seed, data.batch_size, rank, world_size)
    return PretrainLoader(collator, plan, data.num_workers, dataset.skipped,
                          dataset.skip_messages)


def _text_loader(cfg: Config, path: Path, split: str, rank: int, world_size: int,
                 tokenizer: BPETokenizer | None) -> PretrainLoader:
    data, frontend = cfg.data, cfg.model.frontend
    tokenizer = tokenizer or load_or_train_tokenizer(cfg, path)
    if frontend.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"model.frontend.vocab_size={frontend.vocab_size} but the tokenizer has "
                          f"{tokenizer.vocab_size} ids: call sync_text_vocab(cfg, tokenizer) "
                          "before building the model")
    if data.tokens_per_sample > frontend.max_positions:
        raise ConfigError(f"data.tokens_per_sample={data.tokens_per_sample} exceeds "
                          f"model.frontend.max_positions={frontend.max_positions}")
    dataset = TokenBlockDataset.from_path(path, split, tokenizer, data.tokens_per_sample,
                                          data.break_mode, data.skip_bad)
    collator = TextCollator(dataset, cfg.run.seed, tokenizer.pad_id, tokenizer.mask_id,
                            tuple(sorted(tokenizer.special_ids)), tokenizer.vocab_size,
                            cfg.model.masking, _clones(cfg), _v2(cfg))
    plan = _global_batches(len(dataset), cfg.run.seed, data.batch_size, rank, world_size)
    loader = PretrainLoader(collator, plan, data.num_workers, dataset.skipped,
                            dataset.skip_messages)
    loader.tokenizer = tokenizer
    return loader


def build_pretrain_loader(cfg: Config | JointConfig, split: str = "train", rank: int = 0,
                          world_size: int = 1, tokenizer: BPETokenizer | None = None
                          ) -> PretrainLoader | JointBatches:
    """The endless pre-training loader of ``cfg.modality`` for this rank (see the module doc);
    a joint run's config gives :class:`~data2vec.data.joint.JointBatches`."""
    if not isinstance(cfg, Config):
        from data2vec.data.joint import build_joint_loader

        return build_joint_loader(cfg, split, rank, world_size)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world size {world_size}")
    if cfg.data.batch_size < 1 and not (cfg.modality == "speech" and cfg.data.max_tokens > 0):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be >= 1")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0")
    path = resolve_data_path(cfg)
    if cfg.modality == "speech":
        return _speech_loader(cfg, path, split, rank, world_size)
    if cfg.modality == "image":
        return _image_loader(cfg, path, split, rank, world_size)
    return _text_loader(cfg, path, split, rank, world_size, tokenizer)


__all__ = ["PretrainLoader", "build_pretrain_loader", "load_or_train_tokenizer",
           "resolve_data_path", "sync_text_vocab"]
