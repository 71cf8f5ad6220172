"""data2vec 1.0 vs 2.0 tiny: probe quality against pre-training wall-clock, per modality.

For each modality on its demo data, the v1 and the v2 tiny presets (same encoder size) are
pre-trained one after the other in this process, each for the same wall-clock budget (data
loading included, probing excluded), with the same time-based schedule (5 % linear warm-up, then
cosine to 0 at the budget). At fixed fractions of the budget the student is frozen and scored by
the same cheap probe for both versions:

- images: logistic regression on mean-pooled patch features (demo digits), accuracy on
  valid + test;
- text: logistic regression on mean-pooled token features (demo topic labels), accuracy on
  valid + test;
- speech: the demo digit-word task — which of the ten digit words an utterance contains — as
  one-vs-rest logistic regression on mean-pooled frame features, mean average precision on valid.

Reported per arm: seconds per step, examples/s, the probe curve; per modality: both final scores
and the time v2 needs to reach v1's final score (linear interpolation between probe points).

    DATA2VEC_HOME=/tmp/d2vhome python benchmarks/v1_vs_v2.py --budget-seconds 100
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, write_result  # noqa: E402
from data2vec.build import build_model  # noqa: E402
from data2vec.config import Config, load_config  # noqa: E402
from data2vec.data.loader import (  # noqa: E402
    build_pretrain_loader,
    load_or_train_tokenizer,
    resolve_data_path,
)
from data2vec.train.optim import build_optimizer, set_lr  # noqa: E402
from data2vec.train.pretrain import prepare_data  # noqa: E402

FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)
"""Probe points, as fractions of the budget (dense early, to time v2 reaching v1's score)."""
GOALS = {"image": 0.25, "speech": 0.25, "text": 0.5}
"""The issue's goal: v2 reaches v1's final score in at most this fraction of the time."""


# ------------------------------------------------------------------------------------ probes


def _fit_score(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
               test_y: np.ndarray, multilabel: bool) -> float:
    """Logistic-regression probe on standardised features: accuracy, or mAP (multi-label)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    from data2vec.finetune.metrics import mean_average_precision

    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    if multilabel:
        clf = OneVsRestClassifier(LogisticRegression(C=0.1, max_iter=2000)).fit(train_x, train_y)
        return float(mean_average_precision(test_y, clf.predict_proba(test_x)))
    clf = LogisticRegression(C=0.1, max_iter=2000).fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


@torch.no_grad()
def _pooled(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]],
            extra: int) -> np.ndarray:
    """Mean over real positions (extra tokens such as CLS excluded) of the final output."""
    rows = []
    for source, padding_mask in batches:
        out, pad = model.encode(source, padding_mask)
        x = out.x[:, extra:]  # (B, T, D)
        if pad is None:
            rows.append(x.mean(1))
        else:
            keep = (~pad[:, extra:]).unsqueeze(-1).float()
            rows.append((x * keep).sum(1) / keep.sum(1).clamp_min(1))
    return torch.cat(rows).numpy()


class Probe:
    """Frozen features of fixed labelled examples -> one score (higher is better)."""

    def __init__(self, cfg: Config, max_train: int, seed: int) -> None:
        from data2vec.data.collate import pad_right
        from data2vec.data.images import NORM_STATS
        from data2vec.finetune import data as ft

        path = resolve_data_path(cfg)
        rng = np.random.default_rng(seed)
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
        else:
            splits = {s: ft.speech_tags(path, s, max_sample_size=cfg.data.max_sample_size * 4)
                      for s in ("train", "valid")}
            pad_id = 0
        train = splits["train"]
        pick = np.sort(rng.permutation(len(train))[:max_train])
        tests = [(s, list(range(len(d)))) for s, d in splits.items() if s != "train"]

        def inputs(data: Any, indices: list[int]) -> list[tuple[torch.Tensor, Any]]:
            order = sorted(indices, key=lambda i: int(data.sizes[i]))  # similar lengths together
            out = []
            for start in range(0, len(order), 64):
                chunk = [data.get(i, None) for i in order[start:start + 64]]
                if cfg.modality == "image":
                    out.append((torch.stack(chunk), None))
                else:
                    out.append(pad_right(chunk, pad_id))
            labels = [data.targets[i] for i in order]
            return out, labels

        self.train_inputs, train_y = inputs(train, pick.tolist())
        self.test_inputs, test_y = [], []
        for split, indices in tests:
            batches, labels = inputs(splits[split], indices)
            self.test_inputs += batches
            test_y += labels
        stack = (lambda ys: torch.stack(ys).numpy()) if self.multilabel else np.array
        self.train_y, self.test_y = stack(train_y), stack(test_y)
        self.sizes = {"train": len(self.train_y), "test": len(self.test_y)}

    def score(self, model: torch.nn.Module) -> float:
        """Probe score of the current student (eval mode, no masking)."""
        was_training = model.training
        model.eval()
        extra = model.frontend.num_extra_tokens
        train_x = _pooled(model, self.train_inputs, extra)
        test_x = _pooled(model, self.test_inputs, extra)
        model.train(was_training)
        return _fit_score(train_x, self.train_y, test_x, self.test_y, self.multilabel)


# ------------------------------------------------------------------------------- pre-training


def lr_factor(progress: float, warmup: float = 0.05) -> float:
    """Time-based schedule: linear warm-up over `warmup` of the budget, then cosine to 0."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def run_arm(modality: str, version: int, budget: float, probe: Probe, seed: int) -> dict:
    """Pre-train one tiny preset for `budget` seconds, probing at FRACTIONS of it."""
    cfg = load_config(modality, "tiny", version, overrides=[f"run.seed={seed}"])
    prepare_data(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = cfg.optim.clip_norm if cfg.optim.clip_norm > 0 else math.inf
    loader = iter(build_pretrain_loader(cfg))
    curve = [{"seconds": 0.0, "step": 0, "score": probe.score(model), "loss": None}]
    points = [f * budget for f in FRACTIONS]
    clock, steps, examples, rows, losses = 0.0, 0, 0, 0, []
    model.train()
    while points:
        start = time.perf_counter()
        batch = next(loader)
        set_lr(optimizer, cfg.optim.lr * lr_factor(clock / budget))
        out = model(batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.ema_step(steps)
        clock += time.perf_counter() - start
        steps += 1
        examples += len(batch)
        rows += batch.mask.shape[0]
        losses.append(float(out.loss.detach()))
        if clock >= points[0]:
            points.pop(0)
            curve.append({"seconds": clock, "step": steps, "score": probe.score(model),
                          "loss": float(np.mean(losses[-20:]))})
            print(f"  {modality} v{version}: {clock:6.1f} s, step {steps}, "
                  f"probe {curve[-1]['score']:.4f}, loss {curve[-1]['loss']:.4f}", flush=True)
    params_m = sum(p.numel() for p in model.student_parameters()) / 1e6
    return {"modality": modality, "version": version, "steps": steps, "seconds": clock,
            "s_per_step": clock / steps, "examples_per_s": examples / clock,
            "masked_rows_per_s": rows / clock, "batch": cfg.data.batch_size,
            "clones": cfg.model.v2.clone_batch if version == 2 else 1, "params_M": params_m,
            "final_score": curve[-1]["score"], "curve": curve}


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Seconds at which the curve first reaches `target` (linear between probe points)."""
    for before, after in zip(curve, curve[1:], strict=False):
        if after["score"] >= target:
            if before["score"] >= target:
                return before["seconds"]
            share = (target - before["score"]) / (after["score"] - before["score"])
            return before["seconds"] + share * (after["seconds"] - before["seconds"])
    return None


def plot(results: dict[str, dict], path: Path) -> None:
    """One panel per modality: probe score against pre-training seconds, v1 and v2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (modality, res) in zip(axes[0], results.items(), strict=True):
        for arm in (res["v1"], res["v2"]):
            xs = [p["seconds"] for p in arm["curve"]]
            ax.plot(xs, [p["score"] for p in arm["curve"]], marker="o",
                    label=f"v{arm['version']} ({arm['s_per_step']:.3f} s/step)")
        ax.axhline(res["v1"]["final_score"], color="gray", linestyle=":", label="v1 final")
        ax.set_title(f"{modality}: {res['metric']}")
        ax.set_xlabel("pre-training seconds (probing excluded)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-seconds", type=float, default=100.0,
                        help="pre-training wall-clock per arm (v1 and v2 each)")
    parser.add_argument("--modalities", nargs="+", default=["image", "speech", "text"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadier on a shared 2-core machine)")
    parser.add_argument("--probe-train", type=int, default=400,
                        help="labelled training examples of the probe")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--name", default="v1_vs_v2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    wall = time.perf_counter()
    results: dict[str, dict] = {}
    metric = {"image": "probe accuracy", "text": "probe accuracy",
              "speech": "digit-word probe mAP"}
    for modality in args.modalities:
        cfg = load_config(modality, "tiny", 1)
        prepare_data(cfg)
        probe = Probe(cfg, args.probe_train, args.seed)
        v1 = run_arm(modality, 1, args.budget_seconds, probe, args.seed)
        v2 = run_arm(modality, 2, args.budget_seconds, probe, args.seed)
        reach = time_to_reach(v2["curve"], v1["final_score"])
        results[modality] = {
            "metric": metric[modality], "probe_examples": probe.sizes, "v1": v1, "v2": v2,
            "v2_seconds_to_v1_final": reach,
            "v2_time_fraction": reach / v1["seconds"] if reach is not None else None,
            "goal_fraction": GOALS[modality],
        }
    rows = []
    for modality, res in results.items():
        for arm in (res["v1"], res["v2"]):
            rows.append({"modality": modality, "version": arm["version"],
                         "s_per_step": arm["s_per_step"], "examples/s": arm["examples_per_s"],
                         "steps": arm["steps"], "final": arm["final_score"],
                         "v2_s_to_v1_final": res["v2_seconds_to_v1_final"]
                         if arm["version"] == 2 else None,
                         "fraction(goal)": (f"{res['v2_time_fraction']:.2f} "
                                            f"({res['goal_fraction']})"
                                            if arm["version"] == 2 and res["v2_time_fraction"]
                                            is not None else
                                            ("not reached" if arm["version"] == 2 else None))})
    print_table(rows, ["modality", "version", "s_per_step", "examples/s", "steps", "final",
                       "v2_s_to_v1_final", "fraction(goal)"])
    png = RESULTS / f"{args.name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, png)
    path = write_result(args.name, {
        "budget_seconds_per_arm": args.budget_seconds, "threads": args.threads,
        "probe_points": list(FRACTIONS), "data2vec_home": os.environ.get("DATA2VEC_HOME", ""),
        "shared_machine": {"note": "2 cores shared with other jobs while this ran",
                           "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "total_wall_seconds": time.perf_counter() - wall, "table": rows, "results": results,
        "plot": png.name})
    print(path)
    print(png)


if __name__ == "__main__":
    main()
