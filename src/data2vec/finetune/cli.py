"""``data2vec finetune`` and ``data2vec evaluate`` (registered by :mod:`data2vec.cli`).

Dotted ``key=value`` words set fine-tuning settings (fields of
:class:`~data2vec.finetune.loop.FinetuneConfig`, e.g. ``lr=1e-4 mask_prob=0.5``); those starting
with ``model.`` change the architecture config (``model.encoder.dropout=0.1``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

TASK_DEFAULTS: dict[str, dict[str, object]] = {
    # the settings of benchmarks/pretraining_helps.py: from the default speech pre-training,
    # 10 min of labels reach WER 0.48 / CER 0.24 (valid) in 600 updates (~3 min on 2 cores);
    # the fairseq 10-min recipe's masking (0.65, channels 0.25 x 64) left a tiny model all blank
    "asr": {"schedule": "tri_stage", "lr": 1e-3, "weight_decay": 0.0, "clip_norm": 0.0,
            "max_steps": 600, "mask_prob": 0.3, "channel_mask_prob": 0.1,
            "channel_mask_length": 16},
    # the settings of benchmarks/pretraining_helps.py (layer decay 0.65 and 200 updates: 0.16)
    "image-cls": {"layer_decay": 0.75, "label_smoothing": 0.1, "lr": 1e-3, "weight_decay": 0.05,
                  "max_steps": 300, "batch_size": 16, "drop_path": 0.1},
    # lr 1e-4 for 200 updates stayed at the majority class (0.21); 3e-4 x 400 reaches ~0.6
    "text-cls": {"lr": 3e-4, "dropout": 0.1, "weight_decay": 0.1, "max_steps": 400,
                 "batch_size": 16, "max_tokens": 64},
    "audio-cls": {"lr": 5e-4, "weight_decay": 0.01, "mask_prob": 0.0, "channel_mask_prob": 0.0},
}


def settings_help() -> str:
    """The ``key=value`` settings (FinetuneConfig fields), their defaults and the per-task
    defaults, for ``finetune --help``; read from the source, so no heavy import."""
    from data2vec.configlib import field_docs

    fields = field_docs(Path(__file__).with_name("loop.py"), "FinetuneConfig")
    lines = ["settings (key=value words; flags above set the same keys):"]
    for f in fields:
        doc = f" — {f.doc}" if f.doc else ""
        default = f.default.strip("'")
        if default.startswith("("):  # tuples are written as YAML lists on the command line
            default = "[" + default[1:-1] + "]"
        lines.append(f"  {f.name}={default}  ({f.type}){doc}")
    lines.append("task defaults (replace the defaults above; key=value and flags win):")
    for task, values in TASK_DEFAULTS.items():
        lines.append(f"  {task}: " + " ".join(f"{k}={v}" for k, v in values.items()))
    lines.append("model.* words change the architecture config, e.g. model.encoder.dropout=0.1")
    return "\n".join(lines)


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=sorted(TASK_DEFAULTS),
                   help="what to fine-tune for (required)")
    p.add_argument("--init", required=True,
                   help="pre-training RUN_DIR or CHECKPOINT (anything data2vec.load reads in our "
                   "format, imports included), or 'scratch' (random, --preset) (required)")
    p.add_argument("--preset", default="tiny", help="architecture for --init scratch")
    p.add_argument("--init-from-teacher", action="store_true",
                   help="start from the EMA teacher's encoder (fairseq load_ema; default: the "
                   "student's)")
    p.add_argument("--data", help="labelled data directory (default: the demo data)")
    p.add_argument("--glue", help="text: GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte; "
                                  "default: the demo topic task)")
    p.add_argument("--labeled-minutes", type=float,
                   help="speech: minutes of labelled audio (default: all)")
    p.add_argument("--label-fraction", type=float,
                   help="fraction of labels kept per class (default 1.0)")
    p.add_argument("--linear-probe", action="store_true",
                   help="freeze the encoder (default: fine-tune it)")
    p.add_argument("--max-steps", type=int, help="optimizer updates (default: the task's)")
    p.add_argument("--batch-size", type=int, help="examples per update (default: the task's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the task's)")
    p.add_argument("--seed", type=int, help="seed of subsets, order, masks (default 1)")
    p.add_argument("--eval-every", type=int,
                   help="validate every N updates; 0 = only at the end (default 100)")
    p.add_argument("--device", help="auto | cpu | cuda | mps (default auto: CUDA when "
                                    "available, else CPU)")
    p.add_argument("--out", type=Path, help="run directory (default runs/finetune-<task>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the fine-tuning run already in --out (default: refuse)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings as YAML and exit (default: off)")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON line instead of the summary line "
                   "(default: off)")
    p.add_argument("--compare-scratch", action="store_true",
                   help="also fine-tune the same architecture from random weights with the same "
                   "settings (into OUT/scratch) and print both scores and the relative error "
                   "reduction (default: off)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="fine-tuning settings (lr=1e-4 mask_prob=0.5; listed below) or model.* "
                   "config keys")


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune, then print the summary line (split, examples, metrics, run directory)."""
    from data2vec.errors import ConfigError
    from data2vec.finetune.loop import finetune, finetune_config
    from data2vec.finetune.runs import SUMMARY_FILE, comparison_line, summary_line
    from data2vec.runtime import say
    from data2vec.train.rundir import RunLock, check_run_dir, clear_run

    model_overrides = [o for o in args.overrides if o.startswith("model.")]
    settings = [o for o in args.overrides if not o.startswith("model.")]
    given = {"init": args.init, "preset": args.preset,
             "from_teacher": args.init_from_teacher or None, "data": args.data,
             "glue": args.glue, "labeled_minutes": args.labeled_minutes,
             "label_fraction": args.label_fraction, "linear_probe": args.linear_probe or None,
             "max_steps": args.max_steps, "batch_size": args.batch_size, "lr": args.lr,
             "seed": args.seed, "eval_every": args.eval_every, "device": args.device}
    # flags left out keep the task's defaults
    values = {**TASK_DEFAULTS[args.task], **{k: v for k, v in given.items() if v is not None}}
    ft = finetune_config(args.task, settings, **values)
    if args.print_config:
        import yaml

        from data2vec.configlib import to_dict

        print(yaml.safe_dump({"finetune": to_dict(ft), "model_overrides": model_overrides},
                             sort_keys=False), end="")
        return 0
    out = args.out or Path("runs") / f"finetune-{args.task}"
    if args.compare_scratch and ft.init == "scratch":
        raise ConfigError("--compare-scratch compares a pre-trained --init with random weights; "
                          "--init scratch is already the random one")
    check_run_dir(out, resume=False, overwrite=args.overwrite)
    with RunLock(out):
        if args.overwrite:
            clear_run(out)
        result = finetune(ft, out, model_overrides)
        if args.compare_scratch:
            finetune(replace(ft, random_init=True, from_teacher=False), out / "scratch",
                     model_overrides)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    if args.json:
        say(json.dumps({"split": ft.eval_split, "run": str(out),
                        **{k: round(v, 4) for k, v in result.items()}}))
    else:
        say(summary_line(ft.task, summary))
    if args.compare_scratch:
        scratch = json.loads((out / "scratch" / SUMMARY_FILE).read_text())
        say(comparison_line(ft.task, summary, scratch))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a fine-tuned run on a split: one line naming the split, its size and the metrics."""
    from data2vec.finetune.loop import evaluate
    from data2vec.finetune.runs import format_metrics
    from data2vec.runtime import say

    overrides = list(args.overrides)
    if args.beam is not None:
        overrides.append(f"beam={args.beam}")
    if args.lm:
        overrides.append(f"lm={args.lm}")
    if args.device:
        overrides.append(f"device={args.device}")
    result = evaluate(args.run, args.split, overrides, args.data, args.predictions)
    if args.json:
        say(json.dumps({"split": result.split, "examples": result.examples,
                        **{k: round(v, 4) for k, v in result.metrics.items()}}))
    else:
        wrote = f"; predictions in {args.predictions}" if args.predictions else ""
        say(f"evaluate {args.run}: {result.split} split, {result.examples} examples: "
            f"{format_metrics(result.metrics)}{wrote}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` and ``evaluate`` verbs."""
    from data2vec.cli import HelpFormatter

    p = sub.add_parser("finetune", help="fine-tune a pre-trained (or random) encoder on a task",
                       formatter_class=HelpFormatter, epilog=settings_help(),
                       description="Fine-tune into a run directory (config.yaml, metrics.jsonl, "
                                   "tensorboard/, train.log, checkpoints/step-N and "
                                   "checkpoints/best, finetune.json), validating every "
                                   "eval_every updates, and print a summary line.")
    _finetune_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="score a fine-tuned run",
                       formatter_class=HelpFormatter)
    p.add_argument("run", type=Path, help="fine-tuning run directory or checkpoint")
    p.add_argument("--split", default="test", help="train | valid | test (default test)")
    p.add_argument("--data", help="labelled data directory (default: the run's)")
    p.add_argument("--beam", type=int,
                   help="asr: beam width, 0 = greedy (default: the run's, 0)")
    p.add_argument("--lm", help="asr: ARPA word LM, or 'train' for a bigram of the training "
                                "text (default: none)")
    p.add_argument("--predictions", type=Path,
                   help="write one JSON line per example (input, target, prediction) to this "
                   "file (default: none)")
    p.add_argument("--device", help="auto | cpu | cuda | mps (default auto)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line instead of the summary line (default: off)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="decoding settings: lm_weight=0.5 word_score=1.0 batch_size=16")
    p.set_defaults(func=cmd_evaluate)


__all__ = ["TASK_DEFAULTS", "cmd_evaluate", "cmd_finetune", "register", "settings_help"]
