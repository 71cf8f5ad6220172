"""Does data2vec pre-training help? The README's quick-start recipe, measured: pre-train the tiny
preset with its defaults (``data2vec pretrain --modality M``), then fine-tune it and the same
architecture from random weights with the ``data2vec finetune`` defaults (what
``--compare-scratch`` runs), in a low-label regime, 3 seeds:

- speech: CTC letters on 10 minutes of labelled audio, WER (CER beside it) on the test split;
- images: 10 % of the training labels (stratified), top-1 error on the test split;
- text: 300 labelled docstrings of the stdlib-family task, error on the test split.

The seed draws the labelled subset, the head (and, from scratch, every) initialisation, batches
and masks; pre-training happens once per modality. For images the study also fits the same
linear probe (logistic regression on frozen features) to pre-trained features, random-init
features and raw pixels. Writes ``benchmarks/results/pretraining_helps.{json,png}``.

    python benchmarks/pretraining_helps.py                 # the full study (~1 h on 2 cores)
    python benchmarks/pretraining_helps.py --quick         # a smoke run of the whole pipeline
    python benchmarks/pretraining_helps.py --modalities text --update   # re-run one modality
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, print_table, write_result  # noqa: E402
from data2vec.config import load_config  # noqa: E402
from data2vec.finetune.cli import TASK_DEFAULTS  # noqa: E402
from data2vec.finetune.loop import FinetuneConfig, finetune, finetune_config  # noqa: E402
from data2vec.finetune.runs import error_of  # noqa: E402
from data2vec.train.pretrain import pretrain  # noqa: E402

TASK = {"speech": "asr", "image": "image-cls", "text": "text-cls"}
LOW_LABEL = {"speech": ["labeled_minutes=10"], "image": ["label_fraction=0.1"],
             "text": ["max_labeled=300"]}
"""The low-label settings, as the README's finetune commands pass them."""
METRIC = {"speech": "wer", "image": "accuracy", "text": "accuracy"}
GOAL = 0.20
"""The issue's goal: pre-training cuts the error by at least 20 % (relative)."""


def pretrain_default(modality: str, run_dir: Path, threads: int, scale: float) -> float:
    """``data2vec pretrain --modality M`` (the tiny preset's own step count); wall seconds."""
    overrides = ["run.progress=false", "run.tensorboard=false", f"run.threads={threads}"]
    if scale < 1.0:
        steps = max(2, int(load_config(modality, "tiny", 1).run.max_steps * scale))
        overrides += [f"run.max_steps={steps}", f"model.objective.ema_anneal_steps={steps}"]
    cfg = load_config(modality, "tiny", 1, None, overrides)
    start = time.perf_counter()
    pretrain(cfg, run_dir, overwrite=True)
    return time.perf_counter() - start


def finetune_settings(modality: str, init: Path, threads: int, scale: float) -> FinetuneConfig:
    """``data2vec finetune --task T --init RUN`` with the low-label flag, scored on test."""
    task = TASK[modality]
    ft = finetune_config(task, LOW_LABEL[modality], **{
        **TASK_DEFAULTS[task], "init": str(init), "threads": threads, "eval_split": "test",
        "eval_every": 0})  # no intermediate validation: the study reads the last model only
    if scale < 1.0:
        ft = replace(ft, max_steps=max(2, int(ft.max_steps * scale)))
    return ft


def run_modality(modality: str, seeds: list[int], work: Path, threads: int,
                 scale: float) -> dict[str, Any]:
    """Pre-train once, fine-tune both inits for every seed; errors and timings."""
    start, cpu_start = time.perf_counter(), time.process_time()
    pre_dir = work / f"pretrain-{modality}"
    pre_seconds = pretrain_default(modality, pre_dir, threads, scale)
    pre_cpu = time.process_time() - cpu_start
    base = finetune_settings(modality, pre_dir, threads, scale)
    errors: dict[str, list[float]] = {"pretrained": [], "scratch": []}
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for init in ("pretrained", "scratch"):
            ft = replace(base, seed=seed, random_init=init == "scratch")
            cpu = time.process_time()
            result = finetune(ft, work / f"ft-{modality}-{init}-{seed}", progress=False)
            result["cpu_seconds"] = time.process_time() - cpu
            errors[init].append(error_of(METRIC[modality], result[METRIC[modality]]))
            runs.append({"init": init, "seed": seed, **result})
            print(f"{modality:6s} {init:10s} seed {seed}: error {errors[init][-1]:.4f} "
                  f"({result['train_seconds']:.0f} s)", flush=True)
    mean = {k: float(np.mean(v)) for k, v in errors.items()}
    std = {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in errors.items()}
    reduction = (mean["scratch"] - mean["pretrained"]) / max(mean["scratch"], 1e-12)
    out: dict[str, Any] = {
        "metric": "WER" if METRIC[modality] == "wer" else "top-1 error",
        "pretrain_steps": load_config(modality, "tiny", 1).run.max_steps if scale == 1.0
        else None, "pretrain_seconds": pre_seconds, "pretrain_cpu_seconds": pre_cpu,
        "finetune": {k: v for k, v in vars(base).items() if k not in ("init", "seed")},
        "errors": errors, "mean": mean, "std": std, "relative_error_reduction": reduction,
        "goal_met": bool(reduction >= GOAL), "runs": runs}
    if modality == "speech":
        cer = {k: [r["cer"] for r in runs if r["init"] == k] for k in errors}
        out["cer_mean"] = {k: float(np.mean(v)) for k, v in cer.items()}
        out["cer_std"] = {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
                          for k, v in cer.items()}
    if modality == "image":
        out["linear_probe"] = image_probe(pre_dir, seeds, threads)
    out["wall_seconds"] = time.perf_counter() - start
    # one torch thread and no loader workers: the process's CPU time is what the study takes
    # on an otherwise idle core, whatever else shared the machine while it ran
    out["cpu_seconds"] = time.process_time() - cpu_start
    return out


# ------------------------------------------------------------------------ image linear probe


def _images(split: str, cfg) -> tuple[torch.Tensor, np.ndarray]:
    """The demo digits of `split` as the model sees them (eval transform) and their labels."""
    from data2vec.data.images import NORM_STATS
    from data2vec.data.loader import resolve_data_path
    from data2vec.finetune.data import image_folder

    fe = cfg.model.frontend
    data = image_folder(resolve_data_path(cfg), split, fe.image_size, fe.in_channels,
                        NORM_STATS[cfg.data.image_norm])
    return torch.stack([data.get(i, None) for i in range(len(data))]), np.array(data.targets)


@torch.no_grad()
def _features(model: torch.nn.Module, images: torch.Tensor, how: str) -> np.ndarray:
    """Frozen student features: every block's output, mean-pooled over the patches and
    concatenated ('mean'), or the last block's patch tokens flattened ('tokens')."""
    model.eval()
    extra = model.frontend.num_extra_tokens
    depth = len(model.encoder.blocks)
    rows = []
    for start in range(0, len(images), 128):
        x, pad = model.frontend(images[start:start + 128], None, None)
        out = model.encoder(x, pad, collect_layers=depth, target_source="block")
        blocks = [*out.layer_results[:-1], out.x]  # the last one after the final norm
        if how == "mean":
            rows.append(torch.cat([b[:, extra:].mean(1) for b in blocks], 1))
        else:
            rows.append(blocks[-1][:, extra:].flatten(1))
    return torch.cat(rows).numpy()


def _probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                    test_y: np.ndarray) -> float:
    """Logistic regression (L2, C = 0.1) on standardised features: test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=0.1, max_iter=3000).fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == test_y).mean())


def image_probe(pre_dir: Path, seeds: list[int], threads: int) -> dict[str, Any]:
    """The same linear probe on pre-trained features, random-init features and raw pixels, with
    all training labels and with 10 % of them (a stratified subset per seed)."""
    from data2vec.build import build_model
    from data2vec.data.collate import derive_seed
    from data2vec.finetune.data import stratified_subset
    from data2vec.loading import load_checkpoint

    torch.set_num_threads(threads)
    loaded = load_checkpoint(pre_dir)
    cfg, pretrained = loaded.cfg, loaded.network
    torch.manual_seed(derive_seed(0, 99))
    random_init = build_model(cfg)
    train_images, train_y = _images("train", cfg)
    test_images, test_y = _images("test", cfg)
    features = {"raw pixels": (train_images.flatten(1).numpy(), test_images.flatten(1).numpy())}
    for how in ("mean", "tokens"):
        for name, model in (("pre-trained", pretrained), ("random init", random_init)):
            features[f"{name}, {how}"] = (_features(model, train_images, how),
                                          _features(model, test_images, how))
    subsets = {"all labels": [list(range(len(train_y)))],
               "10 % labels": [stratified_subset(train_y.tolist(), 0.1, seed) for seed in seeds]}
    table: dict[str, dict[str, Any]] = {}
    for name, (train_x, test_x) in features.items():
        table[name] = {}
        for regime, picks in subsets.items():
            scores = [_probe_accuracy(train_x[p], train_y[p], test_x, test_y) for p in picks]
            table[name][regime] = {"mean": float(np.mean(scores)),
                                   "std": float(np.std(scores, ddof=1)) if len(scores) > 1
                                   else 0.0, "scores": scores}
    return {"probe": "logistic regression, C = 0.1, standardised features; 'mean' = every "
                     "block's output mean-pooled over patches and concatenated, 'tokens' = the "
                     "last block's patch tokens flattened; test split accuracy",
            "train_examples": len(train_y), "test_examples": len(test_y), "accuracy": table}


# ------------------------------------------------------------------------------------ output


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Bars of mean error ± std per modality, pre-trained vs scratch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, (init, color) in enumerate((("pretrained", "tab:blue"), ("scratch", "tab:gray"))):
        means = [results[m]["mean"][init] for m in names]
        stds = [results[m]["std"][init] for m in names]
        ax.bar(x + (k - 0.5) * 0.38, means, 0.38, yerr=stds, capsize=4, label=init, color=color)
    ax.set_xticks(x, [f"{m}\n({results[m]['metric']})" for m in names])
    ax.set_ylabel("test error (lower is better)")
    ax.set_title("data2vec tiny, README defaults: pre-trained vs random init")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _previous(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Results and superseded entries of an earlier run of the study (empty if none)."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return {}, {}
    record = json.loads(path.read_text())
    return record.get("results", {}), record.get("superseded", {})


def _merged(name: str, mine: dict[str, dict[str, Any]]
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The results on disk with this process's modalities laid over them; an entry another run
    wrote for one of them moves under 'superseded' (kept, not silently overwritten)."""
    results, superseded = _previous(name)
    for modality, result in mine.items():
        old = results.get(modality)
        if old is not None and old.get("run_id") != result["run_id"]:
            superseded.setdefault(modality, []).append(old)
        results[modality] = result
    return results, superseded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--modalities", default="image,text,speech")
    # one thread: on a shared 2-core machine two OpenMP threads per process oversubscribe the
    # cores and spin-wait
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="5 %% of the steps and 1 seed: checks the pipeline, not the claim")
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--update", action="store_true",
                        help="re-run only --modalities; keep the other modalities' results and "
                             "move the replaced ones under 'superseded' (safe for several "
                             "processes, one per modality)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = list(range(1, (1 if args.quick else args.seeds) + 1))
    scale = 0.05 if args.quick else 1.0
    name = "pretraining_helps" + ("_quick" if args.quick else "")
    results: dict[str, dict[str, Any]] = {}
    mine: dict[str, dict[str, Any]] = {}  # what this process measured
    superseded: dict[str, list[Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for modality in args.modalities.split(","):
            result = run_modality(modality, seeds, work, args.threads, scale)
            result["command"] = "python " + " ".join(sys.argv)
            result["run_id"] = f"{os.getpid()}-{time.time():.0f}"
            mine[modality] = results[modality] = result
            if args.update:  # other processes may write other modalities meanwhile: merge
                results, superseded = _merged(name, mine)
            # written after every modality, so a cut-short study keeps what it measured
            path = write_result(name, {"seeds": seeds, "goal_relative_error_reduction": GOAL,
                                       "results": results, "superseded": superseded})
            plot(results, RESULTS / f"{name}.png")
    rows = [{"modality": m, "metric": r["metric"],
             "pretrained": f"{r['mean']['pretrained']:.3f} ± {r['std']['pretrained']:.3f}",
             "scratch": f"{r['mean']['scratch']:.3f} ± {r['std']['scratch']:.3f}",
             "rel. reduction": f"{100 * r['relative_error_reduction']:.0f} %",
             "goal (≥ 20 %)": "met" if r["goal_met"] else "missed",
             "wall min": f"{r['wall_seconds'] / 60:.1f}",
             "CPU min": f"{r['cpu_seconds'] / 60:.1f}" if "cpu_seconds" in r else "-"}
            for m, r in results.items()]
    print_table(rows, list(rows[0]))
    probe = results.get("image", {}).get("linear_probe")
    if probe:
        print_table([{"features": k, **{r: f"{v[r]['mean']:.3f}" for r in v}}
                     for k, v in probe["accuracy"].items()],
                    ["features", "all labels", "10 % labels"])
    print(f"wrote {path} and {name}.png")


if __name__ == "__main__":
    main()
