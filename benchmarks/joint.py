"""Joint vs separate pre-training at equal compute: one model for speech + images + text
against three single-modality models, the same updates, FLOPs and batches.

Per seed, two arms on the demo data, tiny size:

- joint: ``joint_v{V}_tiny`` (``--modality speech,image,text``) for 3·U updates, sampling
  1:1:1 — exactly U updates of each modality (each block of 3 holds one of each);
- separate: for each modality m, the joint config's own view of m (the same encoder
  architecture, objective, head/decoder, optimizer and data settings) trained alone for U updates.

Both arms see the same batches: a modality's loader is built from the same config and seed in
both, so the joint run's image updates get exactly the separate image run's batches, in order.
Each update is one ``Trainer.train_step`` (the loop's own step: loss normalisation, clipping, lr
schedule over the arm's length, one EMA update). Equal updates and equal batches make the FLOPs
equal; they are counted anyway, by formula (benchmarks/flops.py: matmuls and convolutions, 2 per
multiply-add, backward = 2 x the student's forward, the teacher's forward once) from every batch.

At fractions of U, each modality's student is frozen and scored by the probes of
benchmarks/v1_vs_v2.py (logistic regression on mean-pooled features: image digit class, text
docstring topic, speech digit-word mAP); reported as mean ± std over the seeds, with curves.

    DATA2VEC_HOME=/tmp/d2vhome python benchmarks/joint.py            # the full study
    DATA2VEC_HOME=/tmp/d2vhome python benchmarks/joint.py --quick    # a smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, write_result  # noqa: E402
from data2vec.build import build_model  # noqa: E402
from data2vec.config import Config, config_from_dict, load_config, to_dict  # noqa: E402
from data2vec.data.loader import build_pretrain_loader  # noqa: E402
from data2vec.joint_config import JointConfig  # noqa: E402
from data2vec.train.distributed import DistInfo  # noqa: E402
from data2vec.train.loop import Trainer  # noqa: E402
from data2vec.train.optim import build_optimizer  # noqa: E402
from data2vec.train.pretrain import prepare_data  # noqa: E402
from flops import update_flops  # noqa: E402
from v1_vs_v2 import Probe  # noqa: E402

MODALITIES = ("speech", "image", "text")
METRICS = {"image": "probe accuracy", "text": "probe accuracy", "speech": "digit-word probe mAP"}
FRACTIONS = (0.0, 1 / 3, 2 / 3, 1.0)
"""Probe points, as fractions of each modality's U updates (--quick: the first and last)."""


def joint_config(version: int, updates: int, seed: int) -> JointConfig:
    """The joint preset for 3·U updates (τ annealed over the whole run, as the preset does)."""
    total = len(MODALITIES) * updates
    cfg = load_config(",".join(MODALITIES), "tiny", version, overrides=[
        f"run.max_steps={total}", f"model.ema_anneal_steps={total}", f"run.seed={seed}",
        "run.threads=1"])
    prepare_data(cfg)
    return cfg


def separate_config(joint: JointConfig, modality: str, updates: int) -> Config:
    """The joint config's view of `modality`, alone, for U updates (τ annealed over them)."""
    cfg = config_from_dict(to_dict(joint.view(modality)))  # a copy: the view shares objects
    cfg.run.max_steps = updates
    cfg.model.objective.ema_anneal_steps = updates
    return cfg


class Arm:
    """One model trained update by update with the loop's own step, probed along the way."""

    def __init__(self, cfg: Config | JointConfig, seed: int, work: Path) -> None:
        torch.manual_seed(seed)
        self.cfg, self.model = cfg, build_model(cfg)
        self.batches = build_pretrain_loader(cfg)
        self.trainer = Trainer(cfg, work, self.model, build_optimizer(self.model, cfg.optim),
                               self.batches, DistInfo())
        self.seconds = 0.0
        self.flops: dict[str, int] = {}
        self.updates: dict[str, int] = {}
        self.losses: dict[str, list[tuple[int, float]]] = {}

    def view(self, modality: str) -> Config:
        return self.cfg.view(modality) if isinstance(self.cfg, JointConfig) else self.cfg

    def network(self, modality: str) -> torch.nn.Module:
        return self.model.view(modality) if isinstance(self.cfg, JointConfig) else self.model

    def step(self) -> str:
        """One update; returns its modality."""
        start = time.perf_counter()
        batch = next(self.batches)
        result = self.trainer.train_step([batch])
        self.seconds += time.perf_counter() - start
        modality = batch.modality or self.cfg.modality
        self.updates[modality] = self.updates.get(modality, 0) + 1
        self.flops[modality] = (self.flops.get(modality, 0)
                                + update_flops(self.view(modality), batch)["total"])
        self.losses.setdefault(modality, []).append((self.updates[modality], result.loss))
        return modality


def probe_points(updates: int, fractions: tuple[float, ...] = FRACTIONS) -> list[int]:
    return sorted({round(f * updates) for f in fractions})


def shrink(probe: Probe, chunks: int) -> Probe:
    """--quick: score on the first `chunks` test batches only (64 examples each)."""
    kept = sum(len(source) for source, _ in probe.test_inputs[:chunks])
    probe.test_inputs, probe.test_y = probe.test_inputs[:chunks], probe.test_y[:kept]
    probe.sizes = {"train": len(probe.train_y), "test": kept}
    return probe


def run_seed(version: int, updates: int, seed: int, probes: dict[str, Probe], work: Path,
             points: list[int]) -> dict[str, Any]:
    """Both arms of one seed: curves, FLOPs, updates, seconds."""
    cfg = joint_config(version, updates, seed)
    out: dict[str, Any] = {"joint": {}, "separate": {}}

    joint = Arm(cfg, seed, work / f"joint-{seed}")
    curves = {m: [(0, probes[m].score(joint.network(m)))] for m in MODALITIES}
    while joint.trainer.step < cfg.run.max_steps:
        modality = joint.step()
        done = joint.updates[modality]
        if done in points and done > 0:
            curves[modality].append((done, probes[modality].score(joint.network(modality))))
            print(f"  seed {seed} joint {modality}: {done} updates, probe "
                  f"{curves[modality][-1][1]:.4f}", flush=True)
    out["joint"] = {"seconds": joint.seconds, "updates": joint.updates, "flops": joint.flops,
                    "curves": curves, "losses": joint.losses}

    seconds, flops, counts, curves, losses = 0.0, {}, {}, {}, {}
    for modality in MODALITIES:
        arm = Arm(separate_config(cfg, modality, updates), seed, work / f"{modality}-{seed}")
        curves[modality] = [(0, probes[modality].score(arm.network(modality)))]
        while arm.trainer.step < updates:
            arm.step()
            done = arm.updates[modality]
            if done in points:
                curves[modality].append((done, probes[modality].score(arm.network(modality))))
                print(f"  seed {seed} separate {modality}: {done} updates, probe "
                      f"{curves[modality][-1][1]:.4f}", flush=True)
        seconds += arm.seconds
        flops.update(arm.flops)
        counts.update(arm.updates)
        losses.update(arm.losses)
    out["separate"] = {"seconds": seconds, "updates": counts, "flops": flops, "curves": curves,
                       "losses": losses}
    return out


def summarise(seeds: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Table rows (final probe mean ± std per modality and arm) and the curves' means."""
    rows, curves = [], {}
    for modality in MODALITIES:
        finals = {arm: [s[arm]["curves"][modality][-1][1] for s in seeds]
                  for arm in ("joint", "separate")}
        diff = [j - s for j, s in zip(finals["joint"], finals["separate"], strict=True)]
        rows.append({
            "modality": modality, "metric": METRICS[modality],
            "updates": seeds[0]["joint"]["updates"][modality],
            "joint": f"{np.mean(finals['joint']):.3f} ± {np.std(finals['joint']):.3f}",
            "separate": f"{np.mean(finals['separate']):.3f} ± {np.std(finals['separate']):.3f}",
            "joint - separate": f"{np.mean(diff):+.3f} ± {np.std(diff):.3f}",
            "seeds joint better": f"{sum(d > 0 for d in diff)}/{len(diff)}",
            "GFLOPs (each arm)": seeds[0]["joint"]["flops"][modality] / 1e9})
        curves[modality] = {arm: {
            "updates": [u for u, _ in seeds[0][arm]["curves"][modality]],
            "mean": np.mean([[v for _, v in s[arm]["curves"][modality]] for s in seeds],
                            0).tolist(),
            "std": np.std([[v for _, v in s[arm]["curves"][modality]] for s in seeds],
                          0).tolist()} for arm in ("joint", "separate")}
    return rows, curves


def plot(seeds: list[dict[str, Any]], curves: dict[str, Any], path: Path) -> None:
    """Top: probe score against the modality's updates; bottom: its pre-training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(MODALITIES), figsize=(5 * len(MODALITIES), 7))
    colors = {"joint": "tab:red", "separate": "tab:blue"}
    for col, modality in enumerate(MODALITIES):
        ax = axes[0, col]
        for arm, curve in curves[modality].items():
            xs, mean, std = (np.array(curve[k]) for k in ("updates", "mean", "std"))
            ax.plot(xs, mean, marker="o", color=colors[arm], label=f"{arm} (mean of "
                    f"{len(seeds)} seeds)")
            ax.fill_between(xs, mean - std, mean + std, color=colors[arm], alpha=0.2)
        ax.set_title(f"{modality}: {METRICS[modality]}")
        ax.set_xlabel(f"{modality} updates")
        ax.legend(fontsize=8)
        ax = axes[1, col]
        for arm in ("joint", "separate"):
            for i, seed in enumerate(seeds):
                steps, losses = zip(*seed[arm]["losses"][modality], strict=True)
                window = max(1, len(losses) // 20)
                smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
                ax.plot(steps[window - 1:], smooth, color=colors[arm], alpha=0.6,
                        label=arm if i == 0 else None)
        ax.set_title(f"{modality}: pre-training loss (running mean)")
        ax.set_xlabel(f"{modality} updates")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=300,
                        help="updates per modality U (joint: 3·U; default 300, the tiny presets')")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--version", type=int, default=1, choices=[1, 2])
    parser.add_argument("--probe-train", type=int, default=400,
                        help="labelled training examples of each probe")
    parser.add_argument("--budget-minutes", type=float, default=40.0,
                        help="the wall-clock budget this run was sized for (recorded)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 12 updates per modality, 1 seed, small probes")
    parser.add_argument("--name", default="joint")
    args = parser.parse_args()
    if args.quick:
        args.updates, args.seeds, args.probe_train = 12, args.seeds[:1], 60
        args.name = args.name if args.name != "joint" else "joint_quick"
    torch.set_num_threads(1)
    load_start, wall = os.getloadavg(), time.perf_counter()
    single = {m: load_config(m, "tiny", args.version) for m in MODALITIES}
    for cfg in single.values():
        prepare_data(cfg)
    probes = {m: Probe(cfg, args.probe_train, seed=0) for m, cfg in single.items()}
    points = probe_points(args.updates, (0.0, 1.0) if args.quick else FRACTIONS)
    if args.quick:
        probes = {m: shrink(probe, chunks=2) for m, probe in probes.items()}
    seeds = []
    with tempfile.TemporaryDirectory(prefix="d2v-joint-bench-") as work:
        for seed in args.seeds:
            seeds.append(run_seed(args.version, args.updates, seed, probes, Path(work),
                                  points))
    rows, curves = summarise(seeds)
    print_table(rows, ["modality", "metric", "updates", "joint", "separate", "joint - separate",
                       "seeds joint better", "GFLOPs (each arm)"])
    timing = [{"seed": seed, "arm": arm, "seconds": s[arm]["seconds"],
               "updates": sum(s[arm]["updates"].values()),
               "GFLOPs": sum(s[arm]["flops"].values()) / 1e9}
              for seed, s in zip(args.seeds, seeds, strict=True) for arm in ("joint", "separate")]
    print_table(timing, ["seed", "arm", "seconds", "updates", "GFLOPs"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"{args.name}.png"
    plot(seeds, curves, png)
    path = write_result(args.name, {
        "version": args.version, "preset": f"joint_v{args.version}_tiny",
        "updates_per_modality": args.updates, "seeds": args.seeds,
        "probe_train_examples": args.probe_train,
        "probe_examples": {m: p.sizes for m, p in probes.items()},
        "probe_points": points,
        "flops_counted": "forward matmuls and convolutions (2 per multiply-add) of student and "
                         "teacher from each batch's shapes; backward = 2 x the student's forward; "
                         "norms, activations, softmax, loss, optimizer and EMA not counted "
                         "(benchmarks/flops.py)",
        "budget": {"wall_minutes_sized_for": args.budget_minutes,
                   "wall_minutes_used": (time.perf_counter() - wall) / 60, "threads": 1,
                   "note": "2 cores shared with other jobs while this ran",
                   "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg())},
        "table": rows, "timing": timing, "curves": curves, "per_seed": seeds, "plot": png.name})
    print(path)
    print(png)


if __name__ == "__main__":
    main()
