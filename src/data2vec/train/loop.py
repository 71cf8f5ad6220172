"""The pre-training loop: one optimizer update per ``train_step``, everything in plain sight.

Faults are handled here, where the update happens:

- a non-finite loss or gradient is caught *before* ``optimizer.step()``: the update is skipped
  (``run.nonfinite=skip``, at most ``run.max_consecutive_skips`` in a row) or the run stops
  (``stop``), with a checkpoint of the last finite update; a checkpoint is never written from
  non-finite weights (:func:`~data2vec.train.checkpoint.write_checkpoint_dir` refuses);
- SIGTERM / SIGINT finish the current update, write a checkpoint and end the loop (a second
  signal acts at once); all ranks agree on the step to stop at.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
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
from data2vec.errors import CheckpointError, Data2VecError, DataError
from data2vec.train import checkpoint as ckpt
from data2vec.train.distributed import (
    DistInfo,
    all_reduce_sum,
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_full_state,
    unwrap,
)
from data2vec.train.logging import (
    MetricsWriter,
    ModalityMeans,
    collapse_alarm,
    truncate_metrics,
)
from data2vec.train.optim import lr_at, scale_and_clip_grads_, set_lr
from data2vec.train.parallel import use_teacher_cast_copy

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


PER_MODALITY = ("loss", "target_std", "pred_std", "masked_fraction", "grad_norm")
"""What a joint run also logs per modality (``<modality>/<key>``, see ModalityMeans)."""


@dataclass
class StepResult:
    """What one optimizer update reports; ``skipped`` = non-finite, nothing was applied."""

    loss: float
    target_std: float
    pred_std: float
    masked_fraction: float
    tau: float
    lr: float
    grad_norm: float
    samples: int
    skipped: bool = False


class WeightsView:
    """Whole weights gathered from a sharded model, read by the checkpoint writer like a model."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STAT_KEYS = ("target_std", "pred_std", "masked_fraction")
"""The model statistics a step reports (averaged over its micro-batches)."""


class Trainer:
    """Owns the model (maybe DDP-wrapped), optimizer, batches, step counter and run directory."""

    def __init__(self, cfg: Config, run_dir: Path, model: nn.Module,
                 optimizer: torch.optim.Optimizer, batches: BatchSource, info: DistInfo) -> None:
        self.cfg, self.run_dir, self.model, self.optimizer = cfg, run_dir, model, optimizer
        self.batches, self.info = batches, info
        self.step = 0
        self._iter: Iterator[Batch] | None = None
        self.ckpt_root = run_dir / "checkpoints"
        self.nonfinite_skips = 0
        """Updates skipped for a non-finite loss or gradient over the whole run (resumed too)."""
        self._consecutive_skips = 0
        self.signal_received: int | None = None
        """SIGTERM / SIGINT caught by this process (the run stops after the current update)."""
        self.stopped_by: int | None = None
        """The signal that ended the loop early, if any (all ranks agree on it)."""
        self.last_checkpoint: Path | None = None
        self._saved_step = -1
        self._stop_votes = 0.0
        self.modality_means = ModalityMeans()
        """Joint runs: each modality's metrics between log lines (empty for one modality)."""
        use_teacher_cast_copy(unwrap(model), cfg)

    # ----------------------------------------------------------------- state
    def state(self, optimizer_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything besides the weights that a resume needs (`optimizer_state`: the whole
        optimizer state of a sharded run, gathered by the caller)."""
        if optimizer_state is None:
            optimizer_state = self.optimizer.state_dict()
        state = {"step": self.step, "optimizer": optimizer_state,
                 "rng": _numpy_state_to_torch(ckpt.rng_state()),
                 "data": self.batches.state_dict(), "config": to_dict(self.cfg),
                 "nonfinite_skips": self.nonfinite_skips}
        bad_files = getattr(self.batches, "bad_files", None)
        if bad_files:
            state["bad_files"] = dict(bad_files)
        return state

    def save(self, prune: bool = True) -> Path | None:
        """Checkpoint the current state (main process only); once per step. With `prune`, only
        the newest ``run.keep_last`` checkpoints are kept.

        A failed write (non-finite weights, full disk) raises :class:`TrainingError` naming the
        newest checkpoint that is on disk and finite.
        """
        if self._saved_step == self.step and (self.last_checkpoint is not None
                                              or not self.info.is_main):
            return self.last_checkpoint
        model: Any = unwrap(self.model)
        optimizer_state = None
        if is_sharded(self.model):  # every rank takes part in gathering the whole state
            model = WeightsView(full_model_state(self.model))
            optimizer_state = full_optimizer_state(self.model, self.optimizer)
        if not self.info.is_main:
            self._saved_step = self.step
            return None
        try:
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, model,
                                        self.state(optimizer_state),
                                        self.cfg.run.keep_last if prune else 0)
        except CheckpointError as e:
            raise TrainingError(f"{e}; {self._newest_finite()}") from None
        self.last_checkpoint, self._saved_step = path, self.step
        log.info("checkpoint %s", path)
        return path

    def _newest_finite(self) -> str:
        newest = ckpt.latest_checkpoint(self.ckpt_root)
        if newest is None:
            return "no checkpoint of this run is on disk yet"
        return f"the newest finite checkpoint is {newest} (--resume continues from it)"

    def read_checkpoint(self, checkpoint: Path, state: dict[str, Any] | None = None
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, weights) of `checkpoint`, checked to fit this run (modality, version, weight
        and optimizer-state shapes) without changing anything: a misfit raises here. `state`:
        the checkpoint's state if already read."""
        if state is None:
            state = ckpt.load_state(checkpoint)  # first: a bad state file stops before weights
        check_resume_state(state, self.cfg, checkpoint)
        weights = ckpt.load_weights(checkpoint)
        ckpt.check_keys(weights, unwrap(self.model).state_dict(),
                        f"{checkpoint} does not fit the model")
        ckpt.check_optimizer_state(self.optimizer, state["optimizer"], str(checkpoint))
        return state, weights

    def resume(self, checkpoint: Path,
               loaded: tuple[dict[str, Any], dict[str, Any]] | None = None) -> None:
        """Restore weights, optimizer, step, data position and RNG from `checkpoint` (`loaded`:
        what :meth:`read_checkpoint` returned for it, to avoid reading it twice)."""
        state, weights = loaded or self.read_checkpoint(checkpoint)
        if is_sharded(self.model):
            load_full_state(self.model, self.optimizer, weights, state["optimizer"])
        else:
            ckpt.load_model_weights(unwrap(self.model), weights, str(checkpoint))
            self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["data"])
        if state.get("bad_files") and hasattr(self.batches, "restore_bad_files"):
            self.batches.restore_bad_files(state["bad_files"])
        self.step = int(state["step"])
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
        ckpt.set_rng_state(_numpy_state_from_torch(state["rng"]))
        truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        self.last_checkpoint, self._saved_step = Path(checkpoint), self.step
        log.info("resumed from %s at step %d", checkpoint, self.step)

    # ------------------------------------------------------------------ step
    def _autocast(self):
        if self.cfg.run.precision == "bf16":
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _fetch(self) -> list[Batch]:
        """The next update's micro-batches; a bad file (without --skip-bad) ends the run with a
        checkpoint of the progress so far, the data position put back before that batch."""
        before = self.batches.state_dict()
        try:
            return self._next_micro_batches()
        except DataError as e:
            self.batches.load_state_dict(before)
            self._iter = None
            # (not when sharded: saving gathers from every rank, and the others are not here)
            path = self.save() if self.step > 0 and not is_sharded(self.model) else None
            kept = (f"; progress up to step {self.step} is saved in {path} (then --resume)"
                    if path else "")
            raise DataError(f"{e}{kept}; fix or remove the file, or pass --skip-bad to skip "
                            "such files", e.reason) from None

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

        A non-finite loss (any rank) or gradient norm skips the update *before* the optimizer
        sees it: no step, no EMA update, the step counter stays (``skipped=True``).
        """
        self.model.train()
        device = self.info.device
        loss_sum = torch.zeros((), device=device)
        count = torch.zeros((), device=device)
        stats = torch.zeros(len(STAT_KEYS), device=device)  # summed over micro-batches
        for i, batch in enumerate(micro_batches):
            with self._sync_gradients(last=i == len(micro_batches) - 1):
                with self._autocast():
                    out = self.model(batch)
                (out.loss_sum * self.info.world_size).backward()
            loss_sum += out.loss_sum.detach().float()
            count += out.sample_size.detach()
            stats += torch.stack([out.stats[key].detach().float() for key in STAT_KEYS])
        # one reduction: the loss, the positions counted, and whether any rank was signalled
        stop = torch.tensor(float(self.signal_received is not None), device=device)
        totals = all_reduce_sum(torch.stack([loss_sum, count.float(), stop]))
        count = totals[1].clamp_min(1)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.cfg.optim.clip_norm if self.cfg.optim.clip_norm > 0 else math.inf
        grad_norm = scale_and_clip_grads_(params, count, clip)
        # one host sync for everything this update reports and decides on
        reported = torch.cat([(totals[0] / count).reshape(1), grad_norm.reshape(1).float(),
                              stats / len(micro_batches), totals[2:]])
        loss, grad_norm_value, *stat_values, self._stop_votes = reported.tolist()
        stat = dict(zip(STAT_KEYS, stat_values, strict=True))
        lr = lr_at(self.step, self.cfg.optim, self.cfg.run.max_steps)
        samples = sum(len(b) for b in micro_batches) * self.info.world_size
        if not (math.isfinite(loss) and math.isfinite(grad_norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss, stat["target_std"], stat["pred_std"],
                              stat["masked_fraction"], math.nan, lr, grad_norm_value, samples,
                              skipped=True)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tau = unwrap(self.model).ema_step(self.step)  # once per update, never per micro-batch
        self.step += 1
        return StepResult(loss, stat["target_std"], stat["pred_std"], stat["masked_fraction"],
                          tau, lr, grad_norm_value, samples)

    def _sync_gradients(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradient reduction across ranks on the last micro-batch only (DDP ``no_sync``,
        FSDP2 ``set_requires_gradient_sync``); a no-op in one process."""
        set_sync = getattr(self.model, "set_requires_gradient_sync", None)
        if set_sync is not None:  # FSDP2
            set_sync(last)
            return contextlib.nullcontext()
        no_sync = getattr(self.model, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def _on_nonfinite(self, result: StepResult) -> None:
        """Count a skipped update; stop (after checkpointing the last finite state) when the
        config says so or too many came in a row."""
        run = self.cfg.run
        self.nonfinite_skips += 1
        self._consecutive_skips += 1
        what = "loss" if not math.isfinite(result.loss) else "gradient"
        where = f"non-finite {what} at step {self.step + 1}"
        if run.nonfinite == "skip" and self._consecutive_skips < run.max_consecutive_skips:
            log.warning("%s: update skipped (%d in a row, %d in this run; run.nonfinite=skip, "
                        "at most run.max_consecutive_skips=%d in a row)", where,
                        self._consecutive_skips, self.nonfinite_skips, run.max_consecutive_skips)
            return
        why = ("run.nonfinite=stop" if run.nonfinite == "stop" else
               f"{self._consecutive_skips} updates in a row, run.max_consecutive_skips="
               f"{run.max_consecutive_skips}")
        # The weights are those of the last finite update. No older checkpoint is pruned for
        # it: when the losses were non-finite, that last update may itself have been the bad one.
        path = self.save(prune=False)
        older = [p for p in ckpt.list_checkpoints(self.ckpt_root) if p != path]
        fallback = (f"; if it diverges again, delete it and --resume continues from {older[-1]}"
                    if older and what == "loss" else "")
        raise TrainingError(f"{where} ({why}); the last finite state (step {self.step}) is "
                            f"saved in {path}: lower optim.lr or set optim.clip_norm, then "
                            f"--resume{fallback}")

    # --------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal_received is not None:  # a second signal: act now
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.signal_received = signum
        log.warning("%s received: finishing the current update, then writing a checkpoint "
                    "(send it again to stop at once)", signal.Signals(signum).name)

    @contextlib.contextmanager
    def _signals_handled(self):
        """Catch SIGTERM / SIGINT for the loop's duration (main thread only). A signal the
        process was told to ignore stays ignored (a background job of a non-interactive shell
        starts with SIGINT ignored, and Python itself then installs no KeyboardInterrupt)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS
                    if signal.getsignal(s) is not signal.SIG_IGN}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # ------------------------------------------------------------------ loop
    def _skip_counts(self) -> dict[str, float]:
        """Files skipped by the data (``--skip-bad``), by reason, and skipped updates."""
        skipped = getattr(self.batches, "skipped", None) or {}
        out = {f"skipped_{reason}": float(n) for reason, n in sorted(skipped.items()) if n}
        if self.nonfinite_skips:
            out["skipped_nonfinite_updates"] = float(self.nonfinite_skips)
        return out

    def run(self) -> dict[str, float]:
        """Train until run.max_steps; checkpoint every run.checkpoint_every and at the end.

        Returns the last update's metrics. A SIGTERM / SIGINT ends the loop after the current
        update with a checkpoint (``stopped_by`` names the signal).
        """
        run = self.cfg.run
        writer = MetricsWriter(self.run_dir, run.tensorboard) if self.info.is_main else None
        bar = tqdm(total=run.max_steps, initial=self.step, dynamic_ncols=True,
                   disable=not (self.info.is_main and run.progress), desc="pretrain")
        last: dict[str, float] = {}
        try:
            with self._signals_handled():
                end = min(run.max_steps, run.stop_at) if run.stop_at > 0 else run.max_steps
                while self.step < end:
                    start = time.perf_counter()
                    micro_batches = self._fetch()
                    result = self.train_step(micro_batches)
                    if result.skipped:
                        self._on_nonfinite(result)
                    else:
                        self._consecutive_skips = 0
                        last = self._record(result, time.perf_counter() - start, writer,
                                            micro_batches[0].modality)
                        bar.update(1)
                        bar.set_postfix(loss=f"{result.loss:.4f}", tau=f"{result.tau:.5f}",
                                        tstd=f"{result.target_std:.3f}", lr=f"{result.lr:.2e}",
                                        refresh=False)
                    if self._stop_votes > 0:
                        self.stopped_by = self.signal_received or signal.SIGTERM
                        break
                    if not result.skipped and self.step % run.checkpoint_every == 0 \
                            and self.step < end:
                        self.save()
                self.save()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if self.stopped_by is not None and self.info.is_main:
            log.warning("stopped by %s after step %d; checkpoint %s",
                        signal.Signals(self.stopped_by).name, self.step, self.last_checkpoint)
        return last

    def _record(self, result: StepResult, elapsed: float, writer: MetricsWriter | None,
                modality: str | None = None) -> dict[str, float]:
        """Log one update; `modality`: a joint run's modality of the update (else None)."""
        run = self.cfg.run
        last = {"step": self.step, **{k: v for k, v in vars(result).items() if k != "skipped"},
                "steps_per_s": 1 / elapsed, "samples_per_s": result.samples / elapsed}
        self.modality_means.add(modality, {k: v for k, v in last.items() if k in PER_MODALITY})
        self._watch_collapse(result, modality)
        if writer is not None and (self.step % run.log_every == 0 or self.step == 1):
            writer.write(self.step, {**{k: v for k, v in last.items() if k != "step"},
                                     **self._skip_counts(), **self.modality_means.flush()})
        return last

    def _watch_collapse(self, result: StepResult, modality: str | None = None) -> None:
        run = self.cfg.run
        if self.step < run.collapse_after_steps:
            return
        message = collapse_alarm(result.target_std, result.pred_std,
                                 run.collapse_min_target_std, run.collapse_min_pred_std)
        if message is None:
            return
        if modality is not None:  # joint runs: whose representation it is
            message = f"{modality}: {message}"
        log.warning("!!! COLLAPSE ALARM at step %d: %s", self.step, message)
        if run.abort_on_collapse:
            path = self.save()
            raise TrainingError(f"representation collapse at step {self.step}: {message}; "
                                f"state saved to {path} (run.abort_on_collapse=true)")


def check_resume_state(state: dict[str, Any], cfg: Config, checkpoint: Path) -> None:
    """A resumed checkpoint must hold this run's modality and version, and a step count."""
    for key in ("step", "optimizer", "rng", "data"):
        if key not in state:
            raise CheckpointError(f"{checkpoint}/{ckpt.STATE} lacks '{key}': not a pre-training "
                                  "checkpoint that --resume can continue")
    saved = state.get("config")
    if isinstance(saved, dict):
        have = (saved.get("modality"), saved.get("version"))
        if have != (cfg.modality, cfg.version):
            raise CheckpointError(f"{checkpoint} holds a {have[0]} v{have[1]} run, not "
                                  f"{cfg.modality} v{cfg.version}: resume it with --modality "
                                  f"{have[0]} --version {have[1]}, or choose another --out")
