"""Does data2vec pre-training help? Fine-tune the tiny pre-trained model and a randomly initialised
one with the same budget, in a low-label regime, on each modality's demo data.

- speech: CTC letters, 10 minutes of labelled audio, WER on the test split (greedy);
- images: 10 % of the training labels (stratified), top-1 error on the test split;
- text: a small labelled subset of the stdlib-docstring family task, error on the test split.

For each modality one tiny model is pre-trained with ``data2vec.train.pretrain.pretrain``; then
both initialisations are fine-tuned with identical settings for every seed (the seed draws the
labelled subset, the head init, batches and masks). Writes
``benchmarks/results/pretraining_helps.{json,png}``.

    python benchmarks/pretraining_helps.py                 # the full study (~30 min, 2 cores)
    python benchmarks/pretraining_helps.py --quick         # a smoke run of the whole pipeline
"""

from __future__ import annotations

import argparse
import json
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
from data2vec.finetune.loop import FinetuneConfig, finetune  # noqa: E402
from data2vec.train.pretrain import pretrain  # noqa: E402

# Pre-training updates per modality and the fine-tuning settings shared by both inits.
PRETRAIN_STEPS = {"speech": 300, "image": 1500, "text": 300}  # image 400: no gain
FINETUNE: dict[str, FinetuneConfig] = {
    "speech": FinetuneConfig(task="asr", labeled_minutes=10.0, max_steps=250, batch_size=8,
                             lr=2e-3, schedule="tri_stage", weight_decay=0.0,
                             mask_prob=0.3, channel_mask_prob=0.1, channel_mask_length=16,
                             eval_split="test"),
    "image": FinetuneConfig(task="image-cls", label_fraction=0.1, max_steps=300, batch_size=16,
                            lr=1e-3, layer_decay=0.75, label_smoothing=0.1, drop_path=0.1,
                            crop_scale=(0.5, 1.0), weight_decay=0.05, eval_split="test"),
    "text": FinetuneConfig(task="text-cls", max_labeled=300, max_steps=200, batch_size=16,
                           max_tokens=64, lr=5e-4, dropout=0.1, weight_decay=0.01,
                           eval_split="test"),
}
METRIC = {"speech": "wer", "image": "accuracy", "text": "accuracy"}


def error_of(modality: str, result: dict[str, float]) -> float:
    """The error the study compares: WER for speech, 1 − accuracy otherwise."""
    value = result[METRIC[modality]]
    return value if METRIC[modality] == "wer" else 1.0 - value


def pretrain_tiny(modality: str, steps: int, run_dir: Path, threads: int) -> float:
    """Pre-train the tiny preset for `steps` updates (EMA annealed over the run); seconds."""
    overrides = [f"run.max_steps={steps}", f"model.objective.ema_anneal_steps={steps}",
                 "run.progress=false", "run.tensorboard=false", f"run.threads={threads}",
                 f"run.checkpoint_every={steps}"]
    cfg = load_config(modality, "tiny", 1, None, overrides)
    start = time.perf_counter()
    pretrain(cfg, run_dir, overwrite=True)  # a re-run of the study replaces its runs
    return time.perf_counter() - start


def run_modality(modality: str, seeds: list[int], work: Path, threads: int,
                 steps_scale: float) -> dict[str, Any]:
    """Pre-train once, fine-tune both inits for every seed; errors and timings."""
    steps = max(2, int(PRETRAIN_STEPS[modality] * steps_scale))
    pre_dir = work / f"pretrain-{modality}"
    pre_seconds = pretrain_tiny(modality, steps, pre_dir, threads)
    base = FINETUNE[modality]
    base = replace(base, max_steps=max(2, int(base.max_steps * steps_scale)), threads=threads)
    errors: dict[str, list[float]] = {"pretrained": [], "scratch": []}
    losses: dict[str, list[float]] = {"pretrained": [], "scratch": []}
    details: list[dict[str, Any]] = []
    for seed in seeds:
        for init, path in (("pretrained", str(pre_dir)), ("scratch", "scratch")):
            ft = replace(base, init=path, seed=seed)
            result = finetune(ft, work / f"ft-{modality}-{init}-{seed}")
            errors[init].append(error_of(modality, result))
            losses[init].append(result["final_train_loss"])
            details.append({"init": init, "seed": seed, **result})
            print(f"{modality:6s} {init:10s} seed {seed}: error {errors[init][-1]:.4f} "
                  f"({result['train_seconds']:.0f} s)", flush=True)
    mean = {k: float(np.mean(v)) for k, v in errors.items()}
    std = {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in errors.items()}
    reduction = (mean["scratch"] - mean["pretrained"]) / max(mean["scratch"], 1e-12)
    return {"metric": "WER" if METRIC[modality] == "wer" else "top-1 error",
            "pretrain_steps": steps, "pretrain_seconds": pre_seconds,
            "finetune": {k: v for k, v in vars(base).items() if k not in ("init", "seed")},
            "errors": errors, "final_train_loss": losses, "mean": mean, "std": std,
            "relative_error_reduction": reduction,
            "goal_met": bool(reduction >= 0.20), "runs": details}


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
    ax.set_title("data2vec tiny: pre-trained vs random init, low-label fine-tuning")
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
    results = record.get("results", {})
    for entry in results.values():  # an older file kept the command once, at the top
        entry.setdefault("command", record.get("command"))
        entry.setdefault("wall_seconds", record.get("wall_seconds"))
    return results, record.get("superseded", {})


def _steps(spec: str) -> dict[str, int]:
    """``image=1500,speech=600`` -> {"image": 1500, "speech": 600}."""
    pairs = [item.split("=") for item in spec.split(",") if item]
    return {k.strip(): int(v) for k, v in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--modalities", default="image,text,speech")
    # one thread: on a shared 2-core machine two OpenMP threads per process oversubscribe the
    # cores and spin-wait, which made pre-training ~30x slower here
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="5 %% of the steps and 1 seed: checks the pipeline, not the claim")
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--update", action="store_true",
                        help="re-run only --modalities; keep the other modalities' results and "
                             "move the replaced ones under 'superseded'")
    parser.add_argument("--pretrain-steps", help="e.g. image=1500,speech=600")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = list(range(1, (1 if args.quick else args.seeds) + 1))
    scale = 0.05 if args.quick else 1.0
    start = time.perf_counter()
    name = "pretraining_helps" + ("_quick" if args.quick else "")
    results: dict[str, dict[str, Any]] = {}
    superseded: dict[str, list[Any]] = {}
    if args.update:
        results, superseded = _previous(name)
        for modality in args.modalities.split(","):
            if modality in results:  # kept, not silently overwritten
                superseded.setdefault(modality, []).append(results.pop(modality))
    if args.pretrain_steps:
        PRETRAIN_STEPS.update(_steps(args.pretrain_steps))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for modality in args.modalities.split(","):
            results[modality] = run_modality(modality, seeds, work, args.threads, scale)
            results[modality]["command"] = "python " + " ".join(sys.argv)
            results[modality]["wall_seconds"] = time.perf_counter() - start
            (work / f"result-{modality}.json").write_text(json.dumps(results[modality]))
            if args.update:  # another modality may have been written meanwhile: keep it
                results = {**_previous(name)[0], **results}
            # written after every modality, so a cut-short study keeps what it measured
            wall = time.perf_counter() - start
            path = write_result(name, {"seeds": seeds, "results": results,
                                       "superseded": superseded})
            plot(results, RESULTS / f"{name}.png")
    rows = [{"modality": m, "metric": r["metric"],
             "pretrained": f"{r['mean']['pretrained']:.3f} ± {r['std']['pretrained']:.3f}",
             "scratch": f"{r['mean']['scratch']:.3f} ± {r['std']['scratch']:.3f}",
             "rel. reduction": f"{100 * r['relative_error_reduction']:.0f} %",
             "goal (≥ 20 %)": "met" if r["goal_met"] else "missed"}
            for m, r in results.items()]
    print_table(rows, list(rows[0]))
    print(f"wrote {path} and {name}.png in {wall / 60:.1f} min")

if __name__ == "__main__":
    main()
