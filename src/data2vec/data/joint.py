"""Joint multi-modal pre-training batches: one modality per update, interleaved by weights.

The modality of update ``u`` is a pure function of ``(run.seed, u)``: the updates are cut into
blocks of ``sum(weights)``; each block holds exactly ``weights[m]`` updates of modality ``m``, in
an order drawn from a generator seeded by ``(seed, block)``. So every rank of a DDP job picks
the same modality for the same update, the proportions are exact (per block, not only on
average), and a resumed run continues the schedule where it was. Each modality keeps its own
resumable :class:`~data2vec.data.loader.PretrainLoader`; with gradient accumulation all
micro-batches of an update come from the update's modality.

State: ``{"position": micro-batches drawn, "loaders": {modality: loader state}}``.

Example::

    batches = build_joint_loader(cfg)                # cfg: a JointConfig
    batch = next(batches)                            # batch.modality: 'speech' | 'image' | 'text'
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from data2vec.batch import Batch
from data2vec.data.collate import derive_seed
from data2vec.data.loader import PretrainLoader, build_pretrain_loader
from data2vec.errors import DataError
from data2vec.joint_config import JointConfig

STREAM_MODALITY = 4
"""Random stream of the modality order (the collators use streams 0-3)."""


def modality_schedule(weights: dict[str, int], seed: int) -> Callable[[int], str]:
    """``at(u)``: the modality of update u (0-based); see the module docstring."""
    block = [m for m, w in weights.items() for _ in range(w)]
    if not block:
        raise ValueError("modality_schedule needs at least one positive weight")

    def at(update: int) -> str:
        index, offset = divmod(update, len(block))
        order = np.random.default_rng(derive_seed(seed, STREAM_MODALITY, index)).permutation(
            len(block))
        return block[order[offset]]

    return at


class JointBatches:
    """Endless batches of several modalities, one modality per update (module docstring)."""

    def __init__(self, loaders: dict[str, PretrainLoader], weights: dict[str, int], seed: int,
                 micro_batches_per_update: int = 1) -> None:
        if set(loaders) != set(weights):
            raise ValueError(f"loaders {sorted(loaders)} and weights {sorted(weights)} differ")
        self.loaders = loaders
        self.modality_at = modality_schedule(weights, seed)
        self.micro_batches_per_update = micro_batches_per_update
        self.position = 0

    @property
    def skipped(self) -> Counter[str]:
        """Examples the modalities' loaders left out, by reason (summed over modalities)."""
        total: Counter[str] = Counter()
        for loader in self.loaders.values():
            total.update(loader.skipped)
        return total

    @property
    def skip_messages(self) -> list[str]:
        """One line per file skipped (``--skip-bad``), every modality's."""
        return [line for loader in self.loaders.values() for line in loader.skip_messages]

    @property
    def bad_files(self) -> dict[str, str]:
        """Files found bad while batching, as ``'<modality>:<path>' -> reason``."""
        return {f"{m}:{path}": reason for m, loader in self.loaders.items()
                for path, reason in loader.bad_files.items()}

    def restore_bad_files(self, bad_files: dict[str, str]) -> None:
        """Count the files a resumed run had found bad (keys as :attr:`bad_files` gives)."""
        for key, reason in bad_files.items():
            modality, _, path = key.partition(":")
            if modality in self.loaders:
                self.loaders[modality].restore_bad_files({path: reason})

    def __iter__(self) -> JointBatches:
        return self

    def __next__(self) -> Batch:
        modality = self.modality_at(self.position // self.micro_batches_per_update)
        batch = next(self.loaders[modality])
        self.position += 1  # counted after a batch was built: state_dict() sees it
        return replace(batch, modality=modality)

    def state_dict(self) -> dict[str, Any]:
        """Micro-batches drawn so far and each modality's loader state."""
        return {"position": self.position,
                "loaders": {m: loader.state_dict() for m, loader in self.loaders.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state: the next batch is the one that followed it."""
        loaders = state.get("loaders")
        if "position" not in state or not isinstance(loaders, dict) \
                or set(loaders) != set(self.loaders):
            raise DataError(f"joint loader state does not fit this run's modalities "
                            f"{sorted(self.loaders)}: got keys {sorted(state)}")
        for modality, loader in self.loaders.items():
            loader.load_state_dict(loaders[modality])
        self.position = int(state["position"])

    def close(self) -> None:
        """Stop every modality's current pass (and worker processes)."""
        for loader in self.loaders.values():
            loader.close()


def build_joint_loader(cfg: JointConfig, split: str = "train", rank: int = 0,
                       world_size: int = 1) -> JointBatches:
    """Each modality's pre-training loader (rank-aware, as for one modality), interleaved."""
    loaders = {m: build_pretrain_loader(view, split, rank, world_size)
               for m, view in cfg.views().items()}
    return JointBatches(loaders, cfg.weights(), cfg.run.seed, cfg.optim.grad_accum)


__all__ = ["JointBatches", "build_joint_loader", "modality_schedule"]
