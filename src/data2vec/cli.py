"""The ``data2vec`` command line: pretrain | prepare | plot | extract, plus fine-tuning and
interop (finetune | evaluate | export | import)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from data2vec import __version__
from data2vec.errors import ConfigError, Data2VecError
from data2vec.runtime import say, tune_malloc

if TYPE_CHECKING:
    from data2vec.config import Config

DEFAULT_RUNS = Path("runs")
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")
DEVICE_HELP = "auto | cpu | cuda | mps; auto = CUDA when available, else CPU (default auto)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless the text already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False \
            or action.default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default {action.default})"


def version_text() -> str:
    """`data2vec --version`: ours and the libraries that decide numerics."""
    import platform

    try:
        from importlib.metadata import version

        torch_version = version("torch")
    except Exception:  # noqa: BLE001 - a broken install still reports our version
        torch_version = "?"
    return (f"data2vec {__version__} (torch {torch_version}, Python "
            f"{platform.python_version()})")


def modality_list(text: str) -> str:
    """--modality: one of speech / image / text, or several comma-separated (a joint run)."""
    names = [m.strip() for m in text.split(",")]
    if any(m not in ("speech", "image", "text") for m in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose speech, image or text, or several of them "
            "comma-separated for joint pre-training, e.g. speech,image,text)")
    return ",".join(names)


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modality", required=True, type=modality_list,
                   help="speech | image | text, or several comma-separated: one model "
                   "pre-trained on all of them (joint, e.g. speech,image,text; required)")
    p.add_argument("--preset", default="tiny", help="tiny | base | large (default tiny)")
    p.add_argument("--version", type=int, default=1, choices=[1, 2],
                   help="data2vec 1.0 or 2.0")
    p.add_argument("--config", help="YAML file merged over the preset (default: none)")
    p.add_argument("--data", help="data directory / manifest (default: the demo data)")
    p.add_argument("--out", type=Path, help="run directory (default runs/<modality>-v<V>-<preset>)")
    p.add_argument("--max-steps", type=int,
                   help="optimizer updates (run.max_steps; default: the preset's)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's last checkpoint (default: start anew)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (default: refuse to touch it)")
    p.add_argument("--init", type=Path,
                   help="start from this checkpoint's weights and architecture "
                   "(e.g. one written by `data2vec import`; default: random weights)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable files and count them (default: fail on the first)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit without training "
                   "(default: off)")
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
    if args.device:
        overrides.append(f"run.device={args.device}")
    name = args.modality.replace(",", "+")  # joint runs: runs/speech+image+text-v1-tiny
    out = args.out or DEFAULT_RUNS / f"{name}-v{args.version}-{args.preset}"
    cfg = load_config(args.modality, args.preset, args.version, args.config, overrides)
    if args.data is not None:  # a path, taken literally (never parsed as YAML)
        if "," in args.modality:
            raise ConfigError("--data: a joint run reads one data path per modality; set "
                              + " ".join(f"{m}.data.path=DIR" for m in args.modality.split(",")))
        cfg.data.path = str(args.data)
        overrides.append("data.path=")  # marks it as given (a resumed run takes it)
    if args.init and not args.resume:
        from data2vec.train.pretrain import init_config

        cfg = init_config(cfg, args.init)
    if args.resume:
        cfg = _resumed_config(cfg, saved_config(out), out, overrides)
    validate(cfg)
    if args.print_config:
        import yaml

        from data2vec.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from data2vec.train.distributed import pick_device

    pick_device(cfg.run.device)  # an unavailable device fails now, in one line
    last = pretrain(cfg, out, resume=args.resume, init=None if args.resume else args.init,
                    overwrite=args.overwrite)
    signum = last.pop("stopped_by_signal", None) if last else None
    if signum is not None:
        return _stopped(int(signum), int(last["step"]), out, cfg)
    if last:
        say(f"done: step {last['step']:.0f}, loss {last['loss']:.4f}, "
            f"target std {last['target_std']:.3f}; run directory {out}")
    return 0


RESUME_SETTINGS = ("run.max_steps", "run.threads", "run.progress", "run.tensorboard",
                   "run.device", "run.log_every", "run.checkpoint_every", "run.keep_last",
                   "run.nonfinite", "run.max_consecutive_skips", "data.num_workers",
                   "data.skip_bad", "data.path", "optim.lr", "optim.clip_norm", "run.compile",
                   "run.activation_checkpointing", "run.data_parallel")
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
            for new, old in zip(_sections(cfg, section), _sections(saved, section), strict=True):
                setattr(old, name, getattr(new, name))
    saved.run.stop_at = cfg.run.stop_at if _given(overrides, "run.stop_at") else 0
    return saved


def _sections(cfg: Config, section: str) -> list:
    """``cfg.<section>``; a joint run's ``data``: each modality's data section."""
    if section == "data" and hasattr(cfg, "views"):
        return [view.data for view in cfg.views().values()]
    return [getattr(cfg, section)]


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
        say(f"demo {args.modality} data in {path}")
    else:
        from data2vec.data.audio import write_manifest

        out = Path(args.out) if args.out else Path(args.audio_dir) / "train.tsv"
        n = write_manifest(Path(args.audio_dir), out, valid_fraction=args.valid_fraction,
                           seed=args.seed)
        say(f"wrote {out} ({n} files)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from data2vec.train.plot import plot_run

    say(plot_run(args.run_dir, args.out))
    return 0


def _layers(text: str) -> str | list[int]:
    """--layer: 'all', one index or a comma-separated list (negative = from the top)."""
    if text == "all":
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or layer numbers like 4 or 2,4,-1, "
                                         f"got {text!r}") from None


def cmd_extract(args: argparse.Namespace) -> int:
    from data2vec.extract import collect_inputs, extract
    from data2vec.loading import load
    from data2vec.runtime import set_threads

    set_threads(args.threads)
    model = load(args.model, tokenizer=args.tokenizer, device=args.device or "auto",
                 modality=args.modality)
    items = collect_inputs(model.modality, args.inputs)
    index = extract(model, items, args.out, args.layer, args.format, args.batch_size)
    layers = model.layer_indices(args.layer)
    say(f"extracted layer(s) {','.join(map(str, layers))} of {len(items)} inputs with "
        f"{model.source} -> {args.out} (index {index.name}, {args.format})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data2vec", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print the versions of data2vec, torch and Python and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = _adder(sub)

    p = add("pretrain", help="self-supervised pre-training")
    _pretrain_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = add("prepare", help="prepare demo data or a speech manifest")
    prep = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    demo = prep.add_parser("demo", help="generate the embedded demo data of a modality",
                           formatter_class=HelpFormatter)
    demo.add_argument("--modality", required=True, choices=["speech", "image", "text"],
                      help="which demo corpus (required)")
    demo.add_argument("--out", help="output directory (default: the demo cache, "
                                    "$DATA2VEC_HOME/demo/<modality>)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    demo.add_argument("--force", action="store_true",
                      help="rebuild even if cached (default: reuse)")
    man = prep.add_parser("manifest", help="write a fairseq-style TSV manifest of a folder",
                          formatter_class=HelpFormatter)
    man.add_argument("audio_dir", help="folder of .wav / .flac files (searched recursively)")
    man.add_argument("--out", help="manifest path (default AUDIO_DIR/train.tsv)")
    man.add_argument("--valid-fraction", type=float, default=0.0,
                     help="fraction of files written to valid.tsv instead")
    man.add_argument("--seed", type=int, default=0, help="seed of the train / valid split")
    p.set_defaults(func=cmd_prepare)

    p = add("plot", help="plot the curves of a pre-training or fine-tuning run")
    p.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl")
    p.add_argument("--out", type=Path, help="PNG to write (default RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)

    p = add("extract", help="write layer-wise features of audio files, images or text lines",
            description="Features of every input at the chosen layers, batched and padding-safe "
                        "(a padded input's features equal the input alone). MODEL is anything "
                        "data2vec.load reads: a run or checkpoint directory, an HF directory, a "
                        "fairseq .pt file. Layer 0 = transformer input, i = output of block i.")
    p.add_argument("model", help="run / checkpoint directory, HF directory or fairseq .pt")
    p.add_argument("inputs", nargs="+", help="audio / image files, or .txt files (one input per "
                   "line); folders are searched recursively")
    p.add_argument("--out", required=True, type=Path, help="output directory (required)")
    p.add_argument("--layer", type=_layers, default="all",
                   help="'all', N, or a list like 2,4,-1 (default all)")
    p.add_argument("--format", choices=["npy", "safetensors"], default="npy",
                   help="one .npy per input, or one .safetensors per batch")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass")
    p.add_argument("--tokenizer", help="text: directory with vocab.json + merges.txt "
                                       "(default: the one beside the model)")
    p.add_argument("--modality", choices=["speech", "image", "text"],
                   help="a joint multi-modal run: which modality's front-end to run the shared "
                   "transformer with (default: the model's only modality)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads; 0 = free cores (default 0)")
    p.set_defaults(func=cmd_extract)

    _register_optional(sub)
    return parser


def _adder(sub: argparse._SubParsersAction):
    """sub.add_parser with our help formatter (defaults shown in every option's help)."""
    def add(name: str, **kwargs):
        return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)
    return add


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
    # OpenMP threads that sleep at barriers instead of spinning: with another process on the
    # cores, spinning threads made 2-thread steps 7-30x slower (benchmarks/threads.py). Must be
    # set before torch starts its OpenMP runtime; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Large tensors from the heap instead of fresh mmaps page-faulted at every step
    # (runtime.tune_malloc; measured by benchmarks/speed.py). A user's MALLOC_* settings win.
    if not any(k.startswith("MALLOC_") for k in os.environ):
        tune_malloc()
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
        if getattr(args, "device", None):
            from data2vec.train.distributed import pick_device

            pick_device(args.device)  # an unavailable device: one line, before any work
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
