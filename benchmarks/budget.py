"""Pre-training on a compute budget, probed along the way: shared by v1_vs_v2.py and ablations.py.

- **The clock** is the training process's CPU time (``time.process_time``) with one torch
  thread: on an idle core it equals wall-clock, and on a machine shared with other jobs it
  still counts only the work this run did, so arms that ran under different loads stay
  comparable. Data loading is inside the clock; probing is outside it. Wall-clock seconds are
  recorded beside it.
- **Schedules follow the budget**, not a step count: the learning rate warms up linearly over
  the first 5 % of the budget, then follows a cosine to 0 at the budget; the EMA decay τ rises
  linearly from ``ema_start`` to ``ema_end`` over the whole budget. So an arm whose steps are
  slower gets the same schedule shape in fewer updates.
- **The probe** scores the frozen student at fixed fractions of the budget: a logistic
  regression on the concatenated mean-pooled outputs of every block (more sensitive to what
  pre-training changes than the last block alone, which is scored too, as ``score_last``).
  Images: digit class, accuracy on valid + test; text: stdlib family of a docstring, accuracy
  on valid + test; speech: which of the ten digit words a clip contains, one-vs-rest, mean
  average precision on valid.
- **The time per step** is split into data / teacher / student / decoder / optimizer / EMA by
  timing each phase of every update (CPU seconds): ``teacher`` = the no-grad target pass (its
  front-end, blocks and target normalisation), ``decoder`` = the v2 decoder or the v1 regression
  head, forward and backward, ``student`` = the rest of forward and backward (front-end,
  encoder, loss), ``optimizer`` = gradient clipping, AdamW and zeroing.
- **FLOPs** per update by formula (``flops.update_flops``), accumulated along the curve.

Arms are independent processes (``run_jobs``), so several can run side by side.

Example::

    cfg = load_matched("image", 2, ["model.v2.clone_batch=4"], seed=1)
    probe = Probe(cfg, ProbeSpec(max_train=400))
    arm = run_arm(cfg, ArmSpec(budget=60.0, fractions=(0.25, 0.5, 1.0)), probe)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data2vec.build import build_model
from data2vec.config import Config, validate
from data2vec.configlib import from_dict, load_yaml, merge, parse_overrides
from data2vec.data.loader import build_pretrain_loader, load_or_train_tokenizer, resolve_data_path
from data2vec.train.logging import collapse_alarm
from data2vec.train.optim import build_optimizer, set_lr
from data2vec.train.pretrain import prepare_data

PRESETS = Path(__file__).resolve().parent / "presets"
METRICS = {"image": "probe accuracy", "text": "probe accuracy", "speech": "digit-word probe mAP"}
WARMUP = 0.05
"""Share of the budget spent warming the learning rate up."""
PHASES = ("data", "teacher", "student", "decoder", "optimizer", "ema")


# ------------------------------------------------------------------------------------ configs


def load_matched(modality: str, version: int, overrides: list[str] | None = None,
                 seed: int = 1, name: str = "matched") -> Config:
    """``benchmarks/presets/{modality}_v{version}_{name}.yaml`` with dotted overrides and the
    seed, validated; the text vocabulary is fitted (demo data prepared if needed)."""
    path = PRESETS / f"{modality}_v{version}_{name}.yaml"
    data = load_yaml(path)
    items = [*(overrides or []), f"run.seed={seed}"]
    data = merge(data, parse_overrides(items, Config, {"modality": modality}))
    data.setdefault("preset", path.stem)
    cfg = from_dict(Config, data)
    validate(cfg)
    prepare_data(cfg)
    return cfg


# ------------------------------------------------------------------------------------- probes


@dataclass
class ProbeSpec:
    """How the probe is built: labelled training examples, the regression's C, its seed."""

    max_train: int = 1000
    c: float = 0.1
    seed: int = 0


def fit_score(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
              test_y: np.ndarray, multilabel: bool, c: float) -> float:
    """Logistic regression on standardised features: accuracy, or mAP (multi-label)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    from data2vec.finetune.metrics import mean_average_precision

    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    if multilabel:
        clf = OneVsRestClassifier(LogisticRegression(C=c, max_iter=3000)).fit(train_x, train_y)
        return float(mean_average_precision(test_y, clf.predict_proba(test_x)))
    clf = LogisticRegression(C=c, max_iter=3000).fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


@torch.no_grad()
def pooled_layers(model: torch.nn.Module, batches: list[tuple[torch.Tensor, Any]]) -> np.ndarray:
    """(N, depth, D): every block's output, mean over real positions (extra tokens such as CLS
    excluded), the student in eval mode without masking."""
    extra = model.frontend.num_extra_tokens
    depth = model.encoder.cfg.depth
    rows = []
    for source, padding_mask in batches:
        out, pad = model.encode(source, padding_mask, collect_layers=depth)
        layers = torch.stack([y[:, extra:] for y in out.layer_results], 1)  # (B, L, T, D)
        if pad is None:
            rows.append(layers.mean(2))
        else:
            keep = (~pad[:, extra:]).float()[:, None, :, None]  # (B, 1, T, 1)
            rows.append((layers * keep).sum(2) / keep.sum(2).clamp_min(1))
    return torch.cat(rows).float().numpy()


class Probe:
    """Fixed labelled examples of the demo task -> scores of a frozen student."""

    def __init__(self, cfg: Config, spec: ProbeSpec) -> None:
        from data2vec.data.collate import pad_right
        from data2vec.data.images import NORM_STATS
        from data2vec.finetune import data as ft

        self.spec = spec
        path = resolve_data_path(cfg)
        self.multilabel = cfg.modality == "speech"
        if cfg.modality == "image":
            fe = cfg.model.frontend
            splits = {s: ft.image_folder(path, s, fe.image_size, fe.in_channels,
                                         NORM_STATS[cfg.data.image_norm])
                      for s in ("train", "valid", "test")}
            pad_id = 0
        elif cfg.modality == "text":
            tokenizer = load_or_train_tokenizer(cfg, path)
            splits = {s: ft.text_labelled(path, s, "", tokenizer, cfg.data.tokens_per_sample)
                      for s in ("train", "valid", "test")}
            pad_id = tokenizer.pad_id
        else:  # the demo speech has no labelled test clips of its own
            splits = {s: ft.speech_tags(path, s, max_sample_size=cfg.data.max_sample_size * 4)
                      for s in ("train", "valid")}
            pad_id = 0
        train = splits["train"]
        rng = np.random.default_rng(spec.seed)
        pick = np.sort(rng.permutation(len(train))[:spec.max_train]).tolist()

        def inputs(data: Any, indices: list[int]) -> tuple[list[tuple[torch.Tensor, Any]], list]:
            order = sorted(indices, key=lambda i: int(data.sizes[i]))  # similar lengths together
            out = []
            for start in range(0, len(order), 64):
                chunk = [data.get(i, None) for i in order[start:start + 64]]
                out.append((torch.stack(chunk), None) if cfg.modality == "image"
                           else pad_right(chunk, pad_id))
            return out, [data.targets[i] for i in order]

        self.train_inputs, train_y = inputs(train, pick)
        self.test_inputs, test_y = [], []
        for split, data in splits.items():
            if split != "train":
                batches, labels = inputs(data, list(range(len(data))))
                self.test_inputs += batches
                test_y += labels
        stack = (lambda ys: torch.stack(ys).numpy()) if self.multilabel else np.array
        self.train_y, self.test_y = stack(train_y), stack(test_y)
        self.sizes = {"train": len(self.train_y), "test": len(self.test_y)}

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        """{"score": all blocks' pooled outputs concatenated, "score_last": the last block's}."""
        was_training = model.training
        model.eval()
        train_x = pooled_layers(model, self.train_inputs)  # (N, L, D)
        test_x = pooled_layers(model, self.test_inputs)
        model.train(was_training)
        n, c = len(train_x), self.spec.c
        every = fit_score(train_x.reshape(n, -1), self.train_y,
                          test_x.reshape(len(test_x), -1), self.test_y, self.multilabel, c)
        last = fit_score(train_x[:, -1], self.train_y, test_x[:, -1], self.test_y,
                         self.multilabel, c)
        return {"score": every, "score_last": last}


# -------------------------------------------------------------------------------- phase clock


def relative_spread(x: torch.Tensor) -> float:
    """Std of each channel over all positions (as the logged ``target_std``), averaged, divided
    by the RMS of x: 0 when every position has the same vector (collapse) whatever the scale,
    about 1 for normalised features. Padding counts too (small in these benchmarks)."""
    flat = x.detach().float().reshape(-1, x.shape[-1])
    return float(flat.std(0).mean() / flat.pow(2).mean().sqrt().clamp_min(1e-12))


class PhaseClock:
    """CPU seconds of the phases of one update, from hooks on the model (the model's code is
    untouched): the teacher's target pass and the decoder (v2) / head (v1), forward and
    backward. ``student`` is what remains of forward + backward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._inside: dict[str, float] = {}
        self._step = {"teacher": 0.0, "decoder": 0.0}
        self.target_spread = float("nan")
        """Scale-free collapse measure of the last targets: std over positions / RMS."""
        targets = model._targets

        def timed_targets(*args: Any, **kwargs: Any) -> torch.Tensor:
            start = time.process_time()
            out = targets(*args, **kwargs)
            self._step["teacher"] += time.process_time() - start
            self.target_spread = relative_spread(out)
            return out

        model._targets = timed_targets  # instance attribute: forward() calls this one
        self._model = model
        decoder = model.decoder if model.version == 2 else model.head
        decoder.register_forward_pre_hook(lambda *_: self._open("fwd"))
        decoder.register_forward_hook(lambda *_: self._close("fwd"))
        decoder.register_full_backward_pre_hook(lambda *_: self._open("bwd"))
        decoder.register_full_backward_hook(lambda *_: self._close("bwd"))

    def _open(self, key: str) -> None:
        self._inside[key] = time.process_time()

    def _close(self, key: str) -> None:
        self._step["decoder"] += time.process_time() - self._inside.pop(key)

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds

    def add_forward_backward(self, seconds: float) -> None:
        """Split one update's forward + backward time into teacher / decoder / student."""
        teacher, decoder = self._step["teacher"], self._step["decoder"]
        self.totals["teacher"] += teacher
        self.totals["decoder"] += decoder
        self.totals["student"] += seconds - teacher - decoder
        self._step = {"teacher": 0.0, "decoder": 0.0}

    def remove(self) -> None:
        """Put the model's own target method back (hooks stay: they only read the clock)."""
        del self._model._targets


# ---------------------------------------------------------------------------------- schedules


def lr_factor(progress: float, warmup: float = WARMUP) -> float:
    """Linear warm-up over `warmup` of the budget, then cosine to 0 at the budget."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def ema_tau(progress: float, start: float, end: float) -> float:
    """τ linear in the share of the budget spent."""
    return start + (end - start) * min(max(progress, 0.0), 1.0)


# ----------------------------------------------------------------------------------- one arm


@dataclass
class ArmSpec:
    """One pre-training run: its budget in CPU seconds and where to probe (fractions of it)."""

    budget: float
    fractions: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)
    probe_at_start: bool = True
    trace_every: float = 0.05
    """Also record loss and target / prediction spread (no probe) every this share."""
    collapse_after: float = 0.1
    """Count collapse alarms only after this share of the budget (the first updates of a
    fresh model can trip them before the teacher has moved)."""


def _update_flops(cfg: Config, batch: Any) -> int:
    from flops import update_flops  # benchmarks/ is on sys.path when this runs

    return update_flops(cfg, batch)["total"]


def run_arm(cfg: Config, spec: ArmSpec, probe: Probe | None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Pre-train `cfg` for ``spec.budget`` CPU seconds; the curve and the time split."""
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = cfg.optim.clip_norm if cfg.optim.clip_norm > 0 else math.inf
    obj, run = cfg.model.objective, cfg.run
    loader: Iterator[Any] = iter(build_pretrain_loader(cfg))
    phases = PhaseClock(model)
    points = sorted(f * spec.budget for f in spec.fractions)
    curve: list[dict[str, Any]] = []
    trace: list[dict[str, Any]] = []
    next_trace = spec.trace_every * spec.budget
    stats: dict[str, list[float]] = {"loss": [], "target_std": [], "pred_std": [],
                                     "target_spread": []}
    clock = wall = 0.0
    steps = examples = flops = alarms = 0
    first_alarm: int | None = None

    def probe_point() -> None:
        scores = probe.score(model) if probe is not None else {}
        recent = {k: float(np.mean(v[-20:])) if v else None for k, v in stats.items()}
        curve.append({"seconds": clock, "wall_seconds": wall, "step": steps, "flops": flops,
                      **scores, **recent})
        log(f"  {cfg.preset} seed {run.seed}: {clock:6.1f} s, step {steps}, "
            + ", ".join(f"{k} {v:.4f}" for k, v in {**scores, **recent}.items()
                        if v is not None))

    if spec.probe_at_start:
        probe_point()
    model.train()
    while points:
        progress = clock / spec.budget
        start_wall, start = time.perf_counter(), time.process_time()
        batch = next(loader)
        t_data = time.process_time()
        set_lr(optimizer, cfg.optim.lr * lr_factor(progress))
        out = model(batch)
        out.loss.backward()
        t_backward = time.process_time()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t_optim = time.process_time()
        model.teacher.start = model.teacher.end = ema_tau(progress, obj.ema_start, obj.ema_end)
        model.ema_step(steps)
        end = time.process_time()
        phases.add("data", t_data - start)
        phases.add_forward_backward(t_backward - t_data)
        phases.add("optimizer", t_optim - t_backward)
        phases.add("ema", end - t_optim)
        clock += end - start
        wall += time.perf_counter() - start_wall
        steps += 1
        examples += int(batch.source.shape[0])
        flops += _update_flops(cfg, batch)
        target_std, pred_std = (float(out.stats[k]) for k in ("target_std", "pred_std"))
        stats["loss"].append(float(out.loss.detach()))
        stats["target_std"].append(target_std)
        stats["pred_std"].append(pred_std)
        stats["target_spread"].append(phases.target_spread)
        alarm = collapse_alarm(target_std, pred_std, run.collapse_min_target_std,
                               run.collapse_min_pred_std)
        if alarm and clock >= spec.collapse_after * spec.budget:
            alarms += 1
            first_alarm = steps if first_alarm is None else first_alarm
        if clock >= next_trace:
            next_trace += spec.trace_every * spec.budget
            trace.append({"seconds": round(clock, 2), "step": steps,
                          **{k: float(np.mean(v[-10:])) for k, v in stats.items()}})
        if clock >= points[0]:
            points.pop(0)
            probe_point()
    phases.remove()
    per_step = {k: v / steps for k, v in phases.totals.items()}
    return {"preset": cfg.preset, "modality": cfg.modality, "version": cfg.version,
            "seed": run.seed, "budget": spec.budget, "steps": steps, "seconds": clock,
            "wall_seconds": wall, "s_per_step": clock / steps, "examples_per_s": examples / clock,
            "flops": flops, "flops_per_step": flops / steps, "step_split": per_step,
            "collapse_alarms": alarms, "first_alarm_step": first_alarm,
            "alarm_thresholds": {"target_std": run.collapse_min_target_std,
                                 "pred_std": run.collapse_min_pred_std},
            "params_M": sum(p.numel() for p in model.student_parameters()) / 1e6,
            "final": curve[-1], "curve": curve, "trace": trace}


# ----------------------------------------------------------------------------- jobs, in parallel


@dataclass
class Job:
    """One arm to run in a worker process."""

    key: str
    modality: str
    version: int
    seed: int
    arm: ArmSpec
    probe: ProbeSpec
    overrides: list[str] = field(default_factory=list)
    preset: str = "matched"


_PROBES: dict[tuple, Probe] = {}


def _worker_init(threads: int) -> None:
    """Torch and the BLAS under numpy / scikit-learn on `threads` threads: with several on a
    busy machine, OpenBLAS threads spin against each other (a 0.2 s fit took 12 s)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


def run_job(job: Job) -> dict[str, Any]:
    """Build the config and (cached per worker) probe, run the arm; the result keyed."""
    cfg = load_matched(job.modality, job.version, job.overrides, job.seed, job.preset)
    probe_key = (job.modality, job.preset, job.probe.max_train, job.probe.c, job.probe.seed)
    if probe_key not in _PROBES:
        _PROBES[probe_key] = Probe(cfg, job.probe)
    load_start = os.getloadavg()
    result = run_arm(cfg, job.arm, _PROBES[probe_key], log=lambda s: print(s, flush=True))
    return {"key": job.key, "overrides": job.overrides, "loadavg_start": list(load_start),
            "loadavg_end": list(os.getloadavg()), **result}


def run_jobs(jobs: list[Job], workers: int, threads: int = 1) -> list[dict[str, Any]]:
    """Every job in `workers` fresh processes (spawned, `threads` torch threads each); results
    in the order of `jobs`."""
    if workers <= 1:
        _worker_init(threads)
        return [run_job(job) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        return list(pool.map(run_job, jobs))


def run_measured(jobs: list[Job], workers: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`run_jobs`, and the record of this invocation that a study's JSON keeps beside the
    runs it measured: command, date, the machine's load while they ran, wall-clock, workers."""
    wall = time.perf_counter()
    load = LoadSampler()
    runs = run_jobs(jobs, workers)
    record = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "load": load.stop(), "total_wall_seconds": time.perf_counter() - wall,
              "workers": workers}
    return runs, record


def study_parser(doc: str, stem: str, results: Path,
                 helps: dict[str, str]) -> argparse.ArgumentParser:
    """The options both studies (``v1_vs_v2.py``, ``ablations.py``) share: one of --quick /
    --smoke / --render, --seeds, --budget, --workers, --out, --name, --update. `helps`: the
    study's own help for quick, smoke, render, budget, workers and update."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    for mode in ("quick", "smoke", "render"):
        group.add_argument(f"--{mode}", action="store_true", help=helps[mode])
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--budget", type=float, help=helps["budget"])
    parser.add_argument("--workers", type=int, default=2, help=helps.get("workers"))
    parser.add_argument("--out", type=Path, default=results, help="where the JSON and PNG go")
    parser.add_argument("--name", help=f"file stem (default {stem}, {stem}_quick, {stem}_smoke "
                                       "by mode)")
    parser.add_argument("--update", action="store_true", help=helps["update"])
    return parser


def mode_and_stem(args: argparse.Namespace, stem: str) -> tuple[str, str]:
    """('full' | 'quick' | 'smoke', the JSON's file stem) of parsed study options."""
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    return mode, args.name or (stem if mode == "full" else f"{stem}_{mode}")


class LoadSampler:
    """The machine's 1-minute load average every `every` seconds, in a background thread."""

    def __init__(self, every: float = 30.0) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while True:
            self.samples.append((round(time.perf_counter() - self._start, 1),
                                 os.getloadavg()[0]))
            if self._stop.wait(every):
                return

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        loads = [v for _, v in self.samples]
        return {"cores": os.cpu_count(), "loadavg_1min_mean": float(np.mean(loads)),
                "loadavg_1min_max": float(np.max(loads)), "samples": self.samples}


# ------------------------------------------------------------------------------------ analysis


def time_to_reach(curve: list[dict[str, Any]], target: float, axis: str = "seconds",
                  key: str = "score") -> float | None:
    """First `axis` value at which the curve reaches `target` (linear between points)."""
    for before, after in zip(curve, curve[1:], strict=False):
        if before[key] >= target:
            return before[axis]
        if after[key] >= target:
            share = (target - before[key]) / (after[key] - before[key])
            return before[axis] + share * (after[axis] - before[axis])
    return curve[-1][axis] if curve and curve[-1][key] >= target else None


def mean_curve(arms: list[dict[str, Any]], keys: tuple[str, ...] = ("score", "score_last")
               ) -> list[dict[str, Any]]:
    """Point-wise mean over seeds (the probe points are the same fractions of one budget):
    seconds, FLOPs and scores averaged, score standard deviation beside."""
    out = []
    for points in zip(*(a["curve"] for a in arms), strict=True):
        row: dict[str, Any] = {"seconds": float(np.mean([p["seconds"] for p in points])),
                               "flops": float(np.mean([p["flops"] for p in points]))}
        for key in keys:
            values = [p[key] for p in points]
            row[key] = float(np.mean(values))
            row[f"{key}_std"] = float(np.std(values))
        out.append(row)
    return out


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)),
            "values": [float(v) for v in values]}

