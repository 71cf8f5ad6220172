"""data2vec 1.0 vs 2.0 at equal compute: probe score against training time and FLOPs.

Per modality, a matched pair of presets (``benchmarks/presets/{modality}_v{1,2}_matched.yaml``:
the same encoder, the same data, the same batch of examples and EMA schedule; only the method
differs) is pre-trained for the same budget of CPU seconds, three seeds each, and probed at
fixed fractions of the budget (see ``budget.py`` for the clock, the schedules and the probe).

Reported per modality: both curves (mean ± std over seeds) against seconds and against FLOPs,
both final scores, the time v2 needs to reach v1's final score (on the seed-mean curves, linear
between probe points) as a fraction of v1's budget, the same in FLOPs, the goal (the paper's
direction: ≤ 1/2 on images and speech, ≤ 1 on text) and the time per update split into data /
teacher / student / decoder / optimizer / EMA.

    python benchmarks/v1_vs_v2.py                 # the full study -> results/v1_vs_v2.*
    python benchmarks/v1_vs_v2.py --modalities speech --update   # one modality, merged in
    python benchmarks/v1_vs_v2.py --quick         # every modality, 1 seed, short (< 5 min),
                                                  #   -> results/v1_vs_v2_quick.*
    python benchmarks/v1_vs_v2.py --quick --modalities image --out /tmp/x   # the CI test (~30 s)
    python benchmarks/v1_vs_v2.py --smoke --out /tmp/x   # images only, seconds
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget import (  # noqa: E402
    METRICS,
    PHASES,
    ArmSpec,
    Job,
    ProbeSpec,
    mean_curve,
    mode_and_stem,
    run_measured,
    study_parser,
    summary,
    time_to_reach,
)
from common import RESULTS, print_table, write_result  # noqa: E402

GOALS = {"image": 0.5, "speech": 0.5, "text": 1.0}
"""v2 reaches v1's final score in at most this fraction of v1's time (issue 13)."""
MODES: dict[str, dict[str, Any]] = {
    # CPU seconds of training per arm; probe training examples per modality
    "full": {"budget": {"image": 120.0, "speech": 120.0, "text": 120.0}, "seeds": [1, 2, 3],
             "fractions": (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0),
             "probe_train": {"image": 1000, "speech": 600, "text": 1300}},
    "quick": {"budget": {"image": 8.0, "speech": 8.0, "text": 8.0}, "seeds": [1],
              "fractions": (1.0,), "probe_train": {"image": 300, "speech": 150, "text": 300}},
    "smoke": {"budget": {"image": 2.0, "speech": 2.0, "text": 2.0}, "seeds": [1],
              "fractions": (1.0,), "probe_train": {"image": 100, "speech": 60, "text": 100}},
}
PROBE_C = 0.1


def jobs_for(modalities: list[str], mode: dict[str, Any]) -> list[Job]:
    jobs = []
    for modality in modalities:
        for seed in mode["seeds"]:
            for version in (1, 2):
                arm = ArmSpec(budget=mode["budget"][modality], fractions=mode["fractions"])
                probe = ProbeSpec(max_train=mode["probe_train"][modality], c=PROBE_C)
                jobs.append(Job(f"{modality}/v{version}/{seed}", modality, version, seed, arm,
                                probe))
    return jobs


def arm_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One version of one modality over its seeds."""
    curve = mean_curve(runs)
    return {
        "preset": runs[0]["preset"], "seeds": [r["seed"] for r in runs],
        "final": summary([r["final"]["score"] for r in runs]),
        "final_last_block": summary([r["final"]["score_last"] for r in runs]),
        "start": summary([r["curve"][0]["score"] for r in runs]),
        "seconds": summary([r["seconds"] for r in runs]),
        "wall_seconds": summary([r["wall_seconds"] for r in runs]),
        "steps": summary([r["steps"] for r in runs]),
        "s_per_step": summary([r["s_per_step"] for r in runs]),
        "examples_per_s": summary([r["examples_per_s"] for r in runs]),
        "flops": summary([r["flops"] for r in runs]),
        "flops_per_step": summary([r["flops_per_step"] for r in runs]),
        "step_split": {k: float(np.mean([r["step_split"][k] for r in runs])) for k in PHASES},
        "collapse_alarms": [r["collapse_alarms"] for r in runs],
        "params_M": runs[0]["params_M"],
        "mean_curve": curve, "runs": runs,
    }


def compare(modality: str, v1: dict[str, Any], v2: dict[str, Any]) -> dict[str, Any]:
    """Time and FLOPs v2 needs to reach v1's final score, as fractions of v1's; the goal."""
    target = v1["final"]["mean"]
    reach_s = time_to_reach(v2["mean_curve"], target, "seconds")
    reach_f = time_to_reach(v2["mean_curve"], target, "flops")
    per_seed = []
    for a, b in zip(v1["runs"], v2["runs"], strict=True):
        t = time_to_reach(b["curve"], a["final"]["score"], "seconds")
        per_seed.append(None if t is None else t / a["seconds"])
    fraction = None if reach_s is None else reach_s / v1["seconds"]["mean"]
    gain = target - v1["start"]["mean"]
    spread = math.sqrt(v1["final"]["std"] ** 2 + v1["start"]["std"] ** 2)
    learned = gain > 0 and (len(v1["runs"]) < 2 or gain > 2 * spread / math.sqrt(len(v1["runs"])))
    if not learned:
        verdict = "undecided: v1 does not beat its untrained encoder on this probe"
    elif fraction is None:
        verdict = "missed: v2 never reaches v1's final score"
    else:
        verdict = f"{'met' if fraction <= GOALS[modality] else 'missed'}: {fraction:.2f} of " \
                  f"v1's time (goal ≤ {GOALS[modality]:g})"
    return {
        "metric": METRICS[modality], "goal_fraction": GOALS[modality],
        "v1_gain_over_untrained": gain, "v1_beats_untrained": learned, "verdict": verdict,
        "v1_final": target, "v2_final": v2["final"]["mean"],
        "v2_seconds_to_v1_final": reach_s, "v2_time_fraction": fraction,
        "v2_flops_to_v1_final": reach_f,
        "v2_flops_fraction": None if reach_f is None else reach_f / v1["flops"]["mean"],
        "v2_time_fraction_per_seed": per_seed,
        "goal_met": (fraction is not None and fraction <= GOALS[modality]) if learned else None,
        "v1": v1, "v2": v2,
    }


def plot(results: dict[str, dict], path: Path) -> None:
    """Per modality: score vs seconds, score vs FLOPs (mean ± std over seeds), step split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(results)
    fig, axes = plt.subplots(3, cols, figsize=(5 * cols, 11), squeeze=False)
    colours = {"v1": "tab:blue", "v2": "tab:orange"}
    for col, (modality, res) in enumerate(results.items()):
        for row, (axis, scale, label) in enumerate((("seconds", 1.0, "training CPU seconds"),
                                                    ("flops", 1e12, "training TFLOPs"))):
            ax = axes[row][col]
            for version in ("v1", "v2"):
                curve = res[version]["mean_curve"]
                xs = np.array([p[axis] for p in curve]) / scale
                ys = np.array([p["score"] for p in curve])
                sd = np.array([p["score_std"] for p in curve])
                ax.plot(xs, ys, marker="o", color=colours[version],
                        label=f"{version} ({res[version]['s_per_step']['mean']:.3f} s/step)")
                ax.fill_between(xs, ys - sd, ys + sd, color=colours[version], alpha=0.2)
            ax.axhline(res["v1_final"], color="gray", linestyle=":", label="v1 final")
            ax.set_xlabel(label)
            ax.set_title(f"{modality}: {res['metric']} (all blocks)")
            ax.legend(fontsize=8)
        ax = axes[2][col]
        bottom = np.zeros(2)
        for phase in PHASES:
            values = np.array([res[v]["step_split"][phase] for v in ("v1", "v2")])
            ax.bar(["v1", "v2"], values, bottom=bottom, label=phase)
            bottom += values
        ax.set_ylabel("CPU seconds per update")
        ax.set_title(f"{modality}: time per update")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = study_parser(__doc__, "v1_vs_v2", RESULTS, {
        "quick": "every modality, 1 seed, 8 s per arm (< 5 min)",
        "smoke": "images only, 1 seed, 2 s per arm, small probe (a pipeline check)",
        "render": "rebuild the summaries, table and plot of an existing JSON from its stored "
                  "runs (no training)",
        "budget": "CPU seconds per arm, every modality",
        "workers": "arms run side by side in this many processes (1 torch thread each; the "
                   "clock is per-process CPU time)",
        "update": "run only --modalities and merge them into the existing JSON, keeping the "
                  "other modalities' runs (same mode and seeds)"})
    parser.add_argument("--modalities", nargs="+", choices=sorted(GOALS))
    args = parser.parse_args()
    mode_name, name = mode_and_stem(args, "v1_vs_v2")
    if args.render:
        render(args.out, name)
        return
    mode = dict(MODES[mode_name])
    modalities = args.modalities or (["image"] if args.smoke else ["image", "speech", "text"])
    if args.seeds:
        mode["seeds"] = args.seeds
    mode["budget"] = {m: args.budget or mode["budget"][m] for m in modalities}
    mode["probe_train"] = {m: mode["probe_train"][m] for m in modalities}
    runs, record = run_measured(jobs_for(modalities, mode), args.workers)
    runs_by = {m: record for m in modalities}  # which invocation measured each modality
    stored_path = args.out / f"{name}.json"
    if args.update and stored_path.exists():
        stored = json.loads(stored_path.read_text())
        if stored["mode"] != mode_name or stored["seeds"] != mode["seeds"]:
            raise SystemExit(f"{stored_path}: mode {stored['mode']} seeds {stored['seeds']}, "
                             f"not {mode_name} {mode['seeds']}: cannot merge (drop --update)")
        for modality, res in stored["results"].items():
            if modality in modalities:
                continue
            runs += [run for v in ("v1", "v2") for run in res[v]["runs"]]
            runs_by[modality] = stored["measured_by"][modality]
            mode["budget"][modality] = stored["budget_cpu_seconds"][modality]
            mode["probe_train"][modality] = stored["probe"]["train_examples"][modality]
    order = [m for m in GOALS if m in runs_by]
    results, rows, png = analyse(runs, order, mode["seeds"], args.out, name)
    path = write_result(name, {
        "mode": mode_name, "seeds": mode["seeds"], "budget_cpu_seconds": mode["budget"],
        "probe_fractions": list(mode["fractions"]),
        "probe": {"kind": "logistic regression on every block's mean-pooled output, "
                          "concatenated (score); the last block alone (score_last)",
                  "c": PROBE_C, "train_examples": mode["probe_train"]},
        "clock": "training CPU seconds of the arm's own process (1 torch thread; data loading "
                 "in, probing out); wall_seconds beside it",
        "threads_per_worker": 1,
        "presets": {m: [f"benchmarks/presets/{m}_v{v}_matched.yaml" for v in (1, 2)]
                    for m in order},
        "data2vec_home": os.environ.get("DATA2VEC_HOME", ""),
        "measured_by": runs_by,
        "table": rows, "results": results, "plot": png.name}, args.out)
    print(path)
    print(png)


def analyse(runs: list[dict[str, Any]], modalities: list[str], seeds: list[int], out: Path,
            name: str) -> tuple[dict[str, dict], list[dict[str, Any]], Path]:
    """Per-modality summaries and comparison, the printed table, the plot."""
    by_key = {r["key"]: r for r in runs}
    results = {}
    for modality in modalities:
        arms = {f"v{v}": arm_summary([by_key[f"{modality}/v{v}/{s}"] for s in seeds])
                for v in (1, 2)}
        results[modality] = compare(modality, arms["v1"], arms["v2"])
    rows = table(results)
    print_table(rows, list(rows[0]))
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    plot(results, png)
    return results, rows, png


def render(out: Path, name: str) -> None:
    """Re-analyse the runs stored in <out>/<name>.json (after a change to the analysis)."""
    path = out / f"{name}.json"
    record = json.loads(path.read_text())
    runs = [run for res in record["results"].values() for v in ("v1", "v2")
            for run in res[v]["runs"]]
    results, rows, _ = analyse(runs, list(record["results"]), record["seeds"], out, name)
    record.update({"results": results, "table": rows,
                   "rendered_by": "python " + " ".join(sys.argv)})
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(path)


def table(results: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for modality, res in results.items():
        for version in ("v1", "v2"):
            arm = res[version]
            split = arm["step_split"]
            row = {"modality": modality, "version": version,
                   "s/step": arm["s_per_step"]["mean"], "steps": arm["steps"]["mean"],
                   "GFLOP/step": arm["flops_per_step"]["mean"] / 1e9,
                   "start": arm["start"]["mean"],
                   "final": f"{arm['final']['mean']:.3f}±{arm['final']['std']:.3f}",
                   **{k: split[k] for k in ("teacher", "student", "decoder", "optimizer")}}
            if version == "v2":
                frac = res["v2_time_fraction"]
                row["time_to_v1_final"] = ("not reached" if frac is None else
                                           f"{frac:.2f} (goal ≤ {res['goal_fraction']:g})")
                if not res["v1_beats_untrained"]:
                    row["time_to_v1_final"] += ", undecided"
                flops = res["v2_flops_fraction"]
                row["flops_to_v1_final"] = "not reached" if flops is None else f"{flops:.2f}"
            else:
                row["time_to_v1_final"] = row["flops_to_v1_final"] = ""
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
