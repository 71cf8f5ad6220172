"""The data2vec papers' ablations at CPU scale: one setting changed at a time, equal budgets.

Every row is pre-trained for the same budget of CPU seconds (``budget.py``: the clock, the
time-based schedules, the all-blocks probe), with three seeds, on the demo images:

- ``top_k``: the number of top blocks averaged into the target, K ∈ {1, 2, 4, all = 6}
  (data2vec 1.0 images, ``image_v1_matched`` deepened to 6 blocks so that 4 ≠ all);
- ``target_norm``: each target layer normalised by instance norm, layer norm or not at all
  (data2vec 1.0 images with FFN targets: the matched preset's end-of-block targets come out of
  the post-LN block's own layer norm, so "none" would not be none); the collapse alarm
  (``run.collapse_min_target_std`` / ``collapse_min_pred_std``) is counted per run, beside a
  scale-free measure (``target_spread``: std over positions / RMS, 0 = every position the same);
- ``clones``: data2vec 2.0's masked copies per teacher pass, M ∈ {1, 2, 4, 8}, at equal CPU
  time (so a larger M takes fewer, dearer updates);
- ``mask_ratio``: data2vec 2.0 images' masked share, inverse block masks, {0.5, 0.65, 0.8, 0.9}
  (M = 4).

Each row is compared with the setting the paper uses (difference of seed means; "clear" when it
exceeds twice its standard error) and gets a one-sentence reading: whether it agrees with the
paper, derived from that comparison (and the collapse alarm), then, for the full study only, the
likely reason (``REASONS``, written after looking at the measured numbers; ``--render`` rewrites
the JSON, table and plot from the stored runs without training again).

    python benchmarks/ablations.py                  # the full study -> results/ablations.*
    python benchmarks/ablations.py --groups clones --update   # one group, merged in
    python benchmarks/ablations.py --quick          # every group, 1 seed, short (< 5 min)
                                                    #   -> results/ablations_quick.*
    python benchmarks/ablations.py --smoke --out /tmp/x   # two rows of one group (CI)
    python benchmarks/ablations.py --render         # re-render results/ablations.json
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget import (  # noqa: E402
    ArmSpec,
    Job,
    ProbeSpec,
    mode_and_stem,
    run_measured,
    study_parser,
    summary,
)
from common import RESULTS, print_table, write_result  # noqa: E402


@dataclass
class Group:
    """One ablation: a base preset and the settings of one knob."""

    version: int
    base: list[str]
    settings: dict[str, list[str]]
    paper_setting: str
    paper: str


DEEP = ["model.encoder.depth=6"]
GROUPS: dict[str, Group] = {
    "top_k": Group(
        1, DEEP, {"K=1": ["model.objective.top_k=1"], "K=2": ["model.objective.top_k=2"],
                  "K=4": ["model.objective.top_k=4"], "K=all (6)": ["model.objective.top_k=6"]},
        "K=all (6)",
        "data2vec 1.0 (Fig. 3): averaging several top blocks beats the top block alone; the "
        "Base models use K = 6-10 of 12"),
    "target_norm": Group(
        1, ["model.objective.target_source=ffn", "model.objective.final_norm=none"],
        {"none": ["model.objective.layer_norm=none"],
         "instance": ["model.objective.layer_norm=instance"],
         "layer": ["model.objective.layer_norm=layer"]},
        "layer",
        "data2vec 1.0 (sec. 3.3, 5): normalising each target layer keeps the model from "
        "collapsing to a constant representation; the image models use layer norm"),
    "clones": Group(
        2, [], {f"M={m}": [f"model.v2.clone_batch={m}"] for m in (1, 2, 4, 8)},
        "M=8",
        "data2vec 2.0 (sec. 3, ablations): several masked copies per teacher pass amortise the "
        "teacher and make training more efficient; the image models use M = 16"),
    "mask_ratio": Group(
        2, ["model.v2.clone_batch=4"],
        {f"{r:g}": [f"model.v2.mask_prob={r}"] for r in (0.5, 0.65, 0.8, 0.9)},
        "0.8",
        "data2vec 2.0: images are masked at 80 % (inverse block masks), which also makes the "
        "student cheap since it encodes only the visible 20 %"),
}
MODES: dict[str, dict[str, Any]] = {
    "full": {"budget": 40.0, "seeds": [1, 2, 3], "fractions": (1.0,), "probe_train": 1000},
    "quick": {"budget": 4.0, "seeds": [1], "fractions": (1.0,), "probe_train": 300},
    "smoke": {"budget": 1.0, "seeds": [1], "fractions": (1.0,), "probe_train": 100},
}
PROBE_C = 0.1
REASONS: dict[str, dict[str, str]] = {
    "top_k": dict.fromkeys(
        ("K=1", "K=2", "K=4"),
        "the paper measured the gain of averaging several blocks with 12-block Base models after "
        "long training; at 6 blocks and about 350 updates the probe sits near its ceiling and "
        "seed noise is larger than any effect"),
    "target_norm": {
        "none": "without normalisation the student matches ever smaller targets (loss 3e-4), the "
                "shortcut normalisation prevents; the scale-free spread fell (0.30 vs 0.57 with "
                "layer norm) but the targets had not become one constant vector within 40 s",
        "instance": "both norms stop the collapse; data2vec 2.0 uses instance norm everywhere, "
                    "so no difference is what one would expect",
    },
    "clones": {
        **dict.fromkeys(
            ("M=1", "M=2"),
            "the clones do amortise the teacher (M = 8 trains 64 masked views per 0.136 s "
            "update, M = 1 8 views per 0.044 s: 2.6x more views per CPU second), but at equal "
            "time M = 1 makes 3x the updates, and on this 4-block model the probe plateaus near "
            "0.93 whichever way the time is spent; the paper measured its clones with Base models "
            "trained for hundreds of epochs, far from such a plateau"),
        "M=4": "the margin is small (+0.004) and 'clear' only because M = 8's three seeds agree "
               "to 0.001: with 60 % more updates than M = 8 in the same time, M = 4 edges ahead "
               "on a probe that is near its plateau for every M",
    },
    "mask_ratio": {
        "0.5": "less masking makes each copy dearer (half the 64 patches encoded, 297 updates "
               "against 480 at 0.8) and the task easier; within seed noise of 0.8 here",
        "0.65": "0.65 and 0.8 sit on the same plateau (0.934 vs 0.933)",
        "0.9": "at 90 % only about 6 of the 64 patches of a 32 x 32 digit stay visible per copy, "
               "too little context to predict the rest, although 0.9 gets the most updates (579)",
    },
}
"""group -> setting -> the likely reason for what the full study measured (hand-written after
reading results/ablations.json; attached to full-mode rows only, so a quick run never carries a
reason written for other numbers)."""


def jobs_for(groups: dict[str, Group], mode: dict[str, Any]) -> list[Job]:
    jobs = []
    for name, group in groups.items():
        for setting, overrides in group.settings.items():
            for seed in mode["seeds"]:
                jobs.append(Job(f"{name}/{setting}/{seed}", "image", group.version, seed,
                                ArmSpec(budget=mode["budget"], fractions=mode["fractions"],
                                        probe_at_start=False),
                                ProbeSpec(max_train=mode["probe_train"], c=PROBE_C),
                                [*group.base, *overrides]))
    return jobs


def row_of(name: str, group: Group, setting: str, runs: list[dict[str, Any]],
           reference: list[dict[str, Any]] | None, mode: str = "full") -> dict[str, Any]:
    """Seed means of one setting, its difference to the paper's setting (None when that was
    not run), the verdict and the reading."""
    finals = [r["final"]["score"] for r in runs]
    ref = [r["final"]["score"] for r in reference] if reference else []
    diff = float(np.mean(finals) - np.mean(ref)) if ref else None
    stderr = math.sqrt(np.var(finals, ddof=1) / len(finals) + np.var(ref, ddof=1) / len(ref)) \
        if len(finals) > 1 and len(ref) > 1 else float("nan")
    if setting == group.paper_setting:
        versus = "the paper's setting"
    elif diff is None:
        versus = "the paper's setting not run: no verdict"
    elif math.isnan(stderr):
        versus = "one seed: no verdict"
    elif abs(diff) > 2 * stderr:
        versus = "clearly worse" if diff < 0 else "clearly better"
    else:
        versus = "within noise"
    alarms = sum(r["collapse_alarms"] > 0 for r in runs)
    target_std = float(np.mean([r["final"]["target_std"] for r in runs]))
    spread = float(np.mean([r["final"]["target_spread"] for r in runs]))
    reading = agreement(group, setting, versus, diff, alarms, len(runs), target_std, spread)
    reason = REASONS.get(name, {}).get(setting, "") if mode == "full" else ""
    return {
        "group": name, "setting": setting, "overrides": runs[0]["overrides"],
        "probe": summary(finals),
        "probe_last_block": summary([r["final"]["score_last"] for r in runs]),
        "vs_paper_setting": diff, "stderr": stderr, "verdict": versus,
        "steps": summary([r["steps"] for r in runs]),
        "s_per_step": summary([r["s_per_step"] for r in runs]),
        "collapse_alarm_runs": sum(r["collapse_alarms"] > 0 for r in runs),
        "collapse_alarm_steps": [r["collapse_alarms"] for r in runs],
        "first_alarm_step": [r["first_alarm_step"] for r in runs],
        "target_std": summary([r["final"]["target_std"] for r in runs]),
        "pred_std": summary([r["final"]["pred_std"] for r in runs]),
        "target_spread": summary([r["final"]["target_spread"] for r in runs]),
        "loss": summary([r["final"]["loss"] for r in runs]),
        "reading": f"{reading}: {reason}" if reason else reading,
    }


def agreement(group: Group, setting: str, verdict: str, diff: float | None, alarms: int,
              runs: int, target_std: float, spread: float) -> str:
    """The data's half of a reading: does this row agree with the paper's choice (the paper's
    setting is the one it found best), and did the collapse alarm fire."""
    if setting == group.paper_setting:
        text = "the paper's setting (reference)"
    elif verdict == "clearly worse":
        text = f"agrees with the paper: clearly worse than {group.paper_setting} ({diff:+.3f})"
    elif verdict == "clearly better":
        text = f"disagrees with the paper: clearly better than {group.paper_setting} ({diff:+.3f})"
    elif verdict == "within noise":
        text = (f"does not confirm the paper: no clear difference from {group.paper_setting} "
                f"({diff:+.3f})")
    else:
        text = verdict
    if alarms:
        state = "collapsed" if spread < 0.1 else "not collapsed"
        text += (f"; collapse alarm in {alarms}/{runs} runs (target std {target_std:.3f}), "
                 f"target spread {spread:.2f} ({state})")
    return text


def build_rows(runs: list[dict[str, Any]], seeds: list[int], mode: str = "full"
               ) -> list[dict[str, Any]]:
    by_key = {r["key"]: r for r in runs}
    rows = []
    for name, group in GROUPS.items():
        if not any(k.startswith(f"{name}/") for k in by_key):
            continue
        picked = {s: [by_key[f"{name}/{s}/{seed}"] for seed in seeds]
                  for s in group.settings if f"{name}/{s}/{seeds[0]}" in by_key}
        reference = picked.get(group.paper_setting)
        rows += [row_of(name, group, s, r, reference, mode) for s, r in picked.items()]
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per group: probe score (mean ± std over seeds) per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["group"] for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, name in zip(axes[0], groups, strict=True):
        mine = [r for r in rows if r["group"] == name]
        xs = np.arange(len(mine))
        colours = ["tab:orange" if r["setting"] == GROUPS[name].paper_setting else "tab:blue"
                   for r in mine]
        ax.bar(xs, [r["probe"]["mean"] for r in mine], yerr=[r["probe"]["std"] for r in mine],
               color=colours, capsize=4)
        for x, r in zip(xs, mine, strict=True):
            for v in r["probe"]["values"]:
                ax.plot(x, v, "k.", markersize=4)
            if r["collapse_alarm_runs"]:
                ax.annotate("alarm", (x, r["probe"]["mean"]), ha="center", fontsize=7,
                            xytext=(0, 6), textcoords="offset points", color="red")
        ax.set_xticks(xs, [r["setting"] for r in mine], fontsize=8)
        low = min(v for r in mine for v in r["probe"]["values"])
        high = max(v for r in mine for v in r["probe"]["values"])
        ax.set_ylim(low - 0.05, min(1.0, high + 0.03))
        ax.set_title(f"{name} (orange: the paper's)", fontsize=9)
        ax.set_ylabel("image probe accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


TABLE = ["group", "setting", "probe", "vs_paper", "verdict", "steps", "s/step", "alarms",
         "target_std", "spread"]


def table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"group": r["group"], "setting": r["setting"],
             "probe": f"{r['probe']['mean']:.3f}±{r['probe']['std']:.3f}",
             "vs_paper": "" if r["vs_paper_setting"] is None else f"{r['vs_paper_setting']:+.3f}",
             "verdict": r["verdict"],
             "steps": r["steps"]["mean"], "s/step": r["s_per_step"]["mean"],
             "alarms": f"{r['collapse_alarm_runs']}/{len(r['probe']['values'])}",
             "target_std": r["target_std"]["mean"], "spread": r["target_spread"]["mean"]}
            for r in rows]


def finish(payload: dict[str, Any], out: Path, name: str) -> Path:
    rows = build_rows(payload["runs"], payload["seeds"], payload["mode"])
    print_table(table(rows), TABLE)
    for r in rows:
        print(f"{r['group']} {r['setting']}: {r['reading']}")
    png = out / f"{name}.png"
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, png)
    payload.update({"rows": rows, "plot": png.name,
                    "paper": {k: {"setting": g.paper_setting, "claim": g.paper}
                              for k, g in GROUPS.items()}})
    path = write_result(name, payload, out)
    print(path)
    print(png)
    return path


def main() -> None:
    parser = study_parser(__doc__, "ablations", RESULTS, {
        "quick": "every group, 1 seed, 4 s per run (< 5 min)",
        "smoke": "the first setting of one group and the paper's, 1 seed, 1 s (CI)",
        "render": "rebuild rows, readings, table and plot of an existing JSON",
        "budget": "CPU seconds per run",
        "update": "run only --groups and merge them into the existing JSON, keeping the other "
                  "groups' runs (same mode, seeds and budget)"})
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS))
    args = parser.parse_args()
    mode_name, name = mode_and_stem(args, "ablations")
    if args.render:
        render(args.out, name)
        return
    mode = dict(MODES[mode_name])
    chosen = {k: GROUPS[k] for k in (args.groups or GROUPS)}
    if args.smoke:
        first = next(iter(chosen))
        g = chosen[first]
        two = {k: v for k, v in g.settings.items()
               if k in (next(iter(g.settings)), g.paper_setting)}
        chosen = {first: Group(g.version, g.base, two, g.paper_setting, g.paper)}
    if args.seeds:
        mode["seeds"] = args.seeds
    if args.budget:
        mode["budget"] = args.budget
    runs, record = run_measured(jobs_for(chosen, mode), args.workers)
    measured_by = dict.fromkeys(chosen, record)  # which invocation measured each group
    base = {k: f"benchmarks/presets/image_v{g.version}_matched.yaml + {g.base}"
            for k, g in chosen.items()}
    stored_path = args.out / f"{name}.json"
    if args.update and stored_path.exists():
        stored = json.loads(stored_path.read_text())
        if (stored["mode"], stored["seeds"], stored["budget_cpu_seconds"]) != \
                (mode_name, mode["seeds"], mode["budget"]):
            raise SystemExit(f"{stored_path}: mode {stored['mode']}, seeds {stored['seeds']}, "
                             f"budget {stored['budget_cpu_seconds']} differ: cannot merge "
                             "(drop --update)")
        for group_name in stored["measured_by"]:
            if group_name not in chosen:
                runs += [r for r in stored["runs"] if r["key"].startswith(f"{group_name}/")]
                measured_by[group_name] = stored["measured_by"][group_name]
                base[group_name] = stored["base_presets"][group_name]
    order = [k for k in GROUPS if k in measured_by]
    payload = {"mode": mode_name, "seeds": mode["seeds"], "budget_cpu_seconds": mode["budget"],
               "probe_fractions": list(mode["fractions"]),
               "probe": {"kind": "logistic regression on every block's mean-pooled output, "
                                 "concatenated; demo digits, accuracy on valid + test",
                         "c": PROBE_C, "train_examples": mode["probe_train"]},
               "clock": "training CPU seconds of the run's own process (1 torch thread)",
               "threads_per_worker": 1,
               "base_presets": {k: base[k] for k in order},
               "data2vec_home": os.environ.get("DATA2VEC_HOME", ""),
               "measured_by": {k: measured_by[k] for k in order},
               "runs": runs}
    finish(payload, args.out, name)


def render(out: Path, name: str) -> None:
    """Rebuild rows, readings, table and plot of <out>/<name>.json from its stored runs."""
    stored = json.loads((out / f"{name}.json").read_text())
    keep = {k: stored[k] for k in ("command", "machine", "date") if k in stored}
    payload = {k: v for k, v in stored.items()
               if k not in ("command", "machine", "date", "rows", "paper", "plot")}
    path = finish(payload, out, name)
    record = json.loads(path.read_text())
    record.update({**keep, "rendered_by": "python " + " ".join(sys.argv)})
    path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
