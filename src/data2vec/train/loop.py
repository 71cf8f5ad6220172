"""The pre-training loop: one optimizer update per ``train_step``, everything in plain sight."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data2vec.batch import Batch
from data2vec.config import Config, to_dict
from data2vec.errors import Data2VecError
from data2vec.train import checkpoint as ckpt
from data2vec.train.distributed import DistInfo, all_reduce_sum, unwrap
from data2vec.train.logging import MetricsWriter, collapse_alarm, truncate_metrics
from data2vec.train.optim import lr_at, set_lr

log = logging.getLogger("data2vec")


class TrainingError(Data2VecError):
    """The run stopped on purpose: non-finite loss or (opt-in) representation collapse."""


class BatchSource(Protocol):
    """An endless batch iterator whose position can be saved and restored."""

    def __iter__(self) -> Iterator[Batch]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _numpy_state_to_torch(state: dict[str, Any]) -> dict[str, Any]:
    # weights_only loading admits tensors and plain Python, not numpy arrays
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {**state, "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                               cached]}


def _numpy_state_from_torch(state: dict[str, Any]) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {**state, "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)}


@dataclass
class StepResult:
    """What one optimizer update reports."""

    loss: float
    target_std: float
    pred_std: float
    masked_fraction: float
    tau: float
    lr: float
    grad_norm: float
    samples: int


class Trainer:
    """Owns the model (maybe DDP-wrapped), optimizer, batches, step counter and run directory."""

    def __init__(self, cfg: Config, run_dir: Path, model: nn.Module,
                 optimizer: torch.optim.Optimizer, batches: BatchSource, info: DistInfo) -> None:
        self.cfg, self.run_dir, self.model, self.optimizer = cfg, run_dir, model, optimizer
        self.batches, self.info = batches, info
        self.step = 0
        self._iter: Iterator[Batch] | None = None
        self.ckpt_root = run_dir / "checkpoints"

    # ----------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """Everything besides the weights that a resume needs."""
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "rng": _numpy_state_to_torch(ckpt.rng_state()),
                "data": self.batches.state_dict(), "config": to_dict(self.cfg)}

    def save(self) -> Path | None:
        """Checkpoint the current state (main process only)."""
        if not self.info.is_main:
            return None
        path = ckpt.save_checkpoint(self.ckpt_root, self.step, unwrap(self.model), self.state(),
                                    self.cfg.run.keep_last)
        log.info("checkpoint %s", path)
        return path

    def resume(self, checkpoint: Path) -> None:
        """Restore weights, optimizer, step, data position and RNG from `checkpoint`."""
        state = ckpt.load_state(checkpoint)  # first: a bad state file stops before any weights
        ckpt.load_model_weights(unwrap(self.model), ckpt.load_weights(checkpoint), str(checkpoint))
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["data"])
        self.step = int(state["step"])
        ckpt.set_rng_state(_numpy_state_from_torch(state["rng"]))
        truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        log.info("resumed from %s at step %d", checkpoint, self.step)

    # ------------------------------------------------------------------ step
    def _autocast(self):
        if self.cfg.run.precision == "bf16":
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _next_micro_batches(self) -> list[Batch]:
        if self._iter is None:
            self._iter = iter(self.batches)
        return [next(self._iter).to(self.info.device) for _ in range(self.cfg.optim.grad_accum)]

    def train_step(self, micro_batches: list[Batch]) -> StepResult:
        """Forward/backward every micro-batch, clip, step, EMA update: one optimizer update.

        The loss is normalised by the number of positions that enter the loss (the model's
        ``sample_size``: masked and not padding) over all micro-batches and ranks. That count is
        known only after the forward passes, so each backward takes the plain loss sum and the
        gradients are divided once at the end (DDP averages over ranks: the world-size factor).
        """
        self.model.train()
        loss_sum = torch.zeros((), device=self.info.device)
        count = torch.zeros((), device=self.info.device)
        stats: dict[str, float] = {"target_std": 0.0, "pred_std": 0.0, "masked_fraction": 0.0}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            no_sync = getattr(self.model, "no_sync", None)
            sync_ctx = contextlib.nullcontext() if last or no_sync is None else no_sync()
            with sync_ctx:
                with self._autocast():
                    out = self.model(batch)
                self._check_finite(out.loss_sum)
                (out.loss_sum * self.info.world_size).backward()
            loss_sum += out.loss_sum.detach()
            count += out.sample_size.detach()
            for key in stats:
                stats[key] += float(out.stats[key]) / len(micro_batches)
        count = all_reduce_sum(count.float()).clamp_min(1)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for p in params:
            if p.grad is not None:
                p.grad.div_(count)
        clip = self.cfg.optim.clip_norm if self.cfg.optim.clip_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        lr = lr_at(self.step, self.cfg.optim, self.cfg.run.max_steps)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tau = unwrap(self.model).ema_step(self.step)  # once per update, never per micro-batch
        self.step += 1
        loss = float(all_reduce_sum(loss_sum) / count)
        samples = sum(len(b) for b in micro_batches) * self.info.world_size
        return StepResult(loss, stats["target_std"], stats["pred_std"],
                          stats["masked_fraction"], tau, lr, grad_norm, samples)

    def _check_finite(self, loss_sum: torch.Tensor) -> None:
        bad = all_reduce_sum((~torch.isfinite(loss_sum.detach())).float())
        if bad.item() > 0:
            path = self.save()  # the weights are still those of the last good update
            raise TrainingError(f"non-finite loss at step {self.step + 1}; last good state "
                                f"(step {self.step}) saved to {path}")

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, float]:
        """Train until run.max_steps; checkpoint every run.checkpoint_every and at the end."""
        run = self.cfg.run
        writer = MetricsWriter(self.run_dir, run.tensorboard) if self.info.is_main else None
        bar = tqdm(total=run.max_steps, initial=self.step, dynamic_ncols=True,
                   disable=not (self.info.is_main and run.progress), desc="pretrain")
        last: dict[str, float] = {}
        try:
            end = min(run.max_steps, run.stop_at) if run.stop_at > 0 else run.max_steps
            while self.step < end:
                start = time.perf_counter()
                result = self.train_step(self._next_micro_batches())
                elapsed = time.perf_counter() - start
                last = {"step": self.step, **vars(result), "steps_per_s": 1 / elapsed,
                        "samples_per_s": result.samples / elapsed}
                self._watch_collapse(result)
                if writer is not None and (self.step % run.log_every == 0 or self.step == 1):
                    writer.write(self.step, {k: v for k, v in last.items() if k != "step"})
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", tau=f"{result.tau:.5f}",
                                tstd=f"{result.target_std:.3f}", lr=f"{result.lr:.2e}",
                                refresh=False)
                if self.step % run.checkpoint_every == 0 and self.step < end:
                    self.save()
            self.save()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return last

    def _watch_collapse(self, result: StepResult) -> None:
        run = self.cfg.run
        if self.step < run.collapse_after_steps:
            return
        message = collapse_alarm(result.target_std, result.pred_std,
                                 run.collapse_min_target_std, run.collapse_min_pred_std)
        if message is None:
            return
        log.warning("!!! COLLAPSE ALARM at step %d: %s", self.step, message)
        if run.abort_on_collapse:
            path = self.save()
            raise TrainingError(f"representation collapse at step {self.step}: {message}; "
                                f"state saved to {path} (run.abort_on_collapse=true)")
