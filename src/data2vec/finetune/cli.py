"""``data2vec finetune`` and ``data2vec evaluate`` (registered by :mod:`data2vec.cli`).

Dotted ``key=value`` words set fine-tuning settings (fields of
:class:`~data2vec.finetune.loop.FinetuneConfig`, e.g. ``lr=1e-4 mask_prob=0.5``); those starting
with ``model.`` change the architecture config (``model.encoder.dropout=0.1``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASK_DEFAULTS: dict[str, dict[str, object]] = {
    # fairseq 10-min recipe shapes, scaled to short demo runs
    "asr": {"schedule": "tri_stage", "lr": 5e-4, "weight_decay": 0.0, "clip_norm": 0.0},
    # the settings of benchmarks/pretraining_helps.py (0.62 top-1 at 10 % labels; 0.16 with
    # layer decay 0.65 and 200 updates)
    "image-cls": {"layer_decay": 0.75, "label_smoothing": 0.1, "lr": 1e-3, "weight_decay": 0.05,
                  "max_steps": 300, "batch_size": 16, "drop_path": 0.1},
    "text-cls": {"lr": 1e-4, "dropout": 0.1, "weight_decay": 0.1},
    "audio-cls": {"lr": 5e-4, "weight_decay": 0.01, "mask_prob": 0.0, "channel_mask_prob": 0.0},
}


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=sorted(TASK_DEFAULTS))
    p.add_argument("--init", required=True,
                   help="pre-training RUN_DIR or CHECKPOINT, or 'scratch' (random, --preset)")
    p.add_argument("--preset", default="tiny", help="architecture for --init scratch")
    p.add_argument("--init-from-teacher", action="store_true",
                   help="start from the EMA teacher's encoder (fairseq load_ema)")
    p.add_argument("--data", help="labelled data directory (default: the demo data)")
    p.add_argument("--glue", help="text: GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte)")
    p.add_argument("--labeled-minutes", type=float, help="speech: minutes of labelled audio")
    p.add_argument("--label-fraction", type=float, help="fraction of labels kept per class")
    p.add_argument("--linear-probe", action="store_true", help="freeze the encoder")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", type=Path, help="run directory (default runs/finetune-<task>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the fine-tuning run already in --out (default: refuse)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="fine-tuning settings (lr=1e-4 mask_prob=0.5) or model.* config keys")


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune and print the validation metrics."""
    from data2vec.finetune.loop import finetune, finetune_config
    from data2vec.train.rundir import RunLock, check_run_dir, clear_run

    model_overrides = [o for o in args.overrides if o.startswith("model.")]
    settings = [o for o in args.overrides if not o.startswith("model.")]
    given = {"init": args.init, "preset": args.preset,
             "from_teacher": args.init_from_teacher or None, "data": args.data,
             "glue": args.glue, "labeled_minutes": args.labeled_minutes,
             "label_fraction": args.label_fraction, "linear_probe": args.linear_probe or None,
             "max_steps": args.max_steps, "batch_size": args.batch_size, "lr": args.lr,
             "seed": args.seed}
    # flags left out keep the task's defaults
    values = {**TASK_DEFAULTS[args.task], **{k: v for k, v in given.items() if v is not None}}
    ft = finetune_config(args.task, settings, **values)
    out = args.out or Path("runs") / f"finetune-{args.task}"
    check_run_dir(out, resume=False, overwrite=args.overwrite)
    with RunLock(out):
        if args.overwrite:
            clear_run(out)
        result = finetune(ft, out, model_overrides)
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))
    print(f"run directory {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a fine-tuned run on a split and print the metrics as JSON."""
    from data2vec.finetune.loop import evaluate

    overrides = list(args.overrides)
    if args.beam is not None:
        overrides.append(f"beam={args.beam}")
    if args.lm:
        overrides.append(f"lm={args.lm}")
    result = evaluate(args.run, args.split, overrides, args.data)
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` and ``evaluate`` verbs."""
    p = sub.add_parser("finetune", help="fine-tune a pre-trained (or random) encoder on a task")
    _finetune_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="score a fine-tuned run")
    p.add_argument("run", type=Path, help="fine-tuning run directory or checkpoint")
    p.add_argument("--split", default="test", help="train | valid | test (default test)")
    p.add_argument("--data", help="labelled data directory (default: the run's)")
    p.add_argument("--beam", type=int, help="asr: beam width (0 = greedy)")
    p.add_argument("--lm", help="asr: ARPA word LM, or 'train' for a bigram of the training text")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="decoding settings: lm_weight=0.5 word_score=1.0 batch_size=16")
    p.set_defaults(func=cmd_evaluate)


__all__ = ["cmd_evaluate", "cmd_finetune", "register"]
