"""The ``data2vec`` command line: pretrain | prepare | plot, plus fine-tuning and interop."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from data2vec.errors import Data2VecError

if TYPE_CHECKING:
    from data2vec.config import Config

DEFAULT_RUNS = Path("runs")
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modality", required=True, choices=["speech", "image", "text"])
    p.add_argument("--preset", default="tiny", help="tiny | base | large (default tiny)")
    p.add_argument("--version", type=int, default=1, choices=[1, 2])
    p.add_argument("--config", help="YAML file merged over the preset")
    p.add_argument("--data", help="data directory / manifest (default: the demo data)")
    p.add_argument("--out", type=Path, help="run directory (default runs/<modality>-v<V>-<preset>)")
    p.add_argument("--max-steps", type=int, help="optimizer updates (run.max_steps)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (default: refuse to touch it)")
    p.add_argument("--init", type=Path,
                   help="start from this checkpoint's weights and architecture "
                   "(e.g. one written by `data2vec import`)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files and count them")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="dotted config overrides, e.g. model.encoder.depth=6 optim.lr=1e-3")


def _given(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from data2vec.config import load_config, validate
    from data2vec.train.pretrain import pretrain, saved_config

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"run.max_steps={args.max_steps}")
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    out = args.out or DEFAULT_RUNS / f"{args.modality}-v{args.version}-{args.preset}"
    cfg = load_config(args.modality, args.preset, args.version, args.config, overrides)
    if args.data is not None:  # a path, taken literally (never parsed as YAML)
        cfg.data.path = str(args.data)
        overrides.append("data.path=")  # marks it as given (a resumed run takes it)
    if args.init and not args.resume:
        from data2vec.train.pretrain import init_config

        cfg = init_config(cfg, args.init)
    if args.resume:
        cfg = _resumed_config(cfg, saved_config(out), out, overrides)
    validate(cfg)
    if cfg.version == 2:
        try:
            import data2vec.objective.data2vec2  # noqa: F401
        except ModuleNotFoundError:
            raise Data2VecError("data2vec 2.0 (--version 2) is not yet available") from None
    last = pretrain(cfg, out, resume=args.resume, init=None if args.resume else args.init,
                    overwrite=args.overwrite)
    signum = last.pop("stopped_by_signal", None) if last else None
    if signum is not None:
        return _stopped(int(signum), int(last["step"]), out, cfg)
    if last:
        print(f"done: step {last['step']:.0f}, loss {last['loss']:.4f}, "
              f"target std {last['target_std']:.3f}; run directory {out}")
    return 0


RESUME_SETTINGS = ("run.max_steps", "run.threads", "run.progress", "run.tensorboard",
                   "run.device", "run.log_every", "run.checkpoint_every", "run.keep_last",
                   "run.nonfinite", "run.max_consecutive_skips", "data.num_workers",
                   "data.skip_bad", "data.path", "optim.lr", "optim.clip_norm")
"""What a resumed run may change on its command line; everything else comes from the run."""


def _resumed_config(cfg: Config, saved: Config | None, out: Path,
                    overrides: list[str]) -> Config:
    """A resumed run keeps its saved config; the keys of :data:`RESUME_SETTINGS` given on the
    command line replace the saved ones (``run.stop_at`` applies to this invocation only)."""
    if saved is None:
        return cfg
    if (saved.modality, saved.version) != (cfg.modality, cfg.version):
        raise Data2VecError(f"{out / 'config.yaml'}: the run is {saved.modality} "
                            f"v{saved.version}, not {cfg.modality} v{cfg.version}; resume it with "
                            f"--modality {saved.modality} --version {saved.version}")
    for key in RESUME_SETTINGS:
        if _given(overrides, key):
            section, name = key.split(".")
            setattr(getattr(saved, section), name, getattr(getattr(cfg, section), name))
    saved.run.stop_at = cfg.run.stop_at if _given(overrides, "run.stop_at") else 0
    return saved


def _stopped(signum: int, step: int, out: Path, cfg: Config) -> int:
    """SIGTERM / SIGINT ended the run after a checkpoint: say where, and how to continue."""
    import signal

    from data2vec.train.checkpoint import latest_checkpoint

    name = signal.Signals(signum).name
    version = f" --version {cfg.version}" if cfg.version != 1 else ""
    where = latest_checkpoint(out / "checkpoints")
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 says it for everyone
        return 130 if signum == signal.SIGINT else 0
    print(f"stopped by {name} after step {step}: checkpoint {where}; continue with: "
          f"data2vec pretrain --modality {cfg.modality}{version} --out {out} --resume",
          file=sys.stderr)
    return 130 if signum == signal.SIGINT else 0


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.what == "demo":
        from data2vec.data.demo import default_demo_dir, prepare_demo

        out = Path(args.out) if args.out else default_demo_dir(args.modality)
        path = prepare_demo(args.modality, out, seed=args.seed, force=args.force)
        print(f"demo {args.modality} data in {path}")
    else:
        from data2vec.data.audio import write_manifest

        out = Path(args.out) if args.out else Path(args.audio_dir) / "train.tsv"
        n = write_manifest(Path(args.audio_dir), out, valid_fraction=args.valid_fraction,
                           seed=args.seed)
        print(f"wrote {out} ({n} files)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from data2vec.train.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data2vec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="self-supervised pre-training")
    _pretrain_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("prepare", help="prepare demo data or a speech manifest")
    prep = p.add_subparsers(dest="what", required=True)
    demo = prep.add_parser("demo", help="generate the embedded demo data of a modality")
    demo.add_argument("--modality", required=True, choices=["speech", "image", "text"])
    demo.add_argument("--out", help="output directory (default: the demo cache)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="rebuild even if cached")
    man = prep.add_parser("manifest", help="write a fairseq-style TSV manifest of a folder")
    man.add_argument("audio_dir")
    man.add_argument("--out", help="manifest path (default AUDIO_DIR/train.tsv)")
    man.add_argument("--valid-fraction", type=float, default=0.0)
    man.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("plot", help="plot the curves of a run")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_plot)

    _register_optional(sub)
    return parser


def _register_optional(sub: argparse._SubParsersAction) -> None:
    """Verbs that live in their own packages (fine-tuning, interop) add their parsers here."""
    for module_name in ("data2vec.finetune.cli", "data2vec.interop.cli"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name is None or not module_name.startswith(e.name):
                raise  # a missing dependency inside the package is a real error
            continue
        module.register(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point; project errors become one line on stderr and exit code 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may come anywhere on the line, after options too
    overrides = [e for e in extra if OVERRIDE.match(e)]
    unknown = [e for e in extra if not OVERRIDE.match(e)]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    try:
        return args.func(args)
    except Data2VecError as e:
        print(f"data2vec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("data2vec: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a file or disk problem outside our checks: still one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"data2vec: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
