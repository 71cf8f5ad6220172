"""``data2vec export --to hf`` and ``data2vec import --from hf|fairseq`` (registered by cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from data2vec.errors import Data2VecError
from data2vec.interop.common import ImportReport
from data2vec.runtime import say


def refuse_to_replace(out: Path, overwrite: bool, option: str) -> None:
    """An output directory that already holds something is replaced only on request."""
    if out.exists() and not out.is_dir():
        raise Data2VecError(f"{option} {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise Data2VecError(f"{option} {out}: the directory is not empty; choose a new one, or "
                            "pass --overwrite to replace what is there")


def cmd_export(args: argparse.Namespace) -> int:
    from data2vec.interop.hf import export_hf

    refuse_to_replace(args.out_dir, args.overwrite, "export to")
    out = export_hf(args.source, args.out_dir, args.modality, args.remote_code)
    files = " + ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    say(f"wrote a HuggingFace model directory {out} ({files})")
    return 0


def _print_report(out: Path, report: ImportReport) -> None:
    say(f"imported {report.source} -> run {out.parent.parent} (checkpoint {out})")
    for note in report.notes:
        say(f"  note: {note}")


def cmd_import(args: argparse.Namespace) -> int:
    refuse_to_replace(args.out, args.overwrite, "--out")
    if args.from_ == "hf":
        from data2vec.interop.hf import import_hf

        out, report = import_hf(args.source, args.out)
    else:
        from data2vec.interop.fairseq import import_fairseq

        out, report = import_fairseq(args.source, args.out)
    _print_report(out, report)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` and ``import`` verbs to the top-level parser."""
    from data2vec.cli import HelpFormatter

    p = sub.add_parser("export", help="write a model in another library's format",
                       formatter_class=HelpFormatter,
                       description="Export a model (anything data2vec.load reads) as a "
                                   "HuggingFace transformers directory: data2vec 1.0 as "
                                   "Data2Vec{Audio,Vision,Text}Model (or its task model) with "
                                   "what HF pipelines need beside it; data2vec 2.0 with its model "
                                   "code in the directory (load with trust_remote_code=True).")
    p.add_argument("--to", required=True, choices=["hf"], help="target format (required)")
    p.add_argument("source", type=Path, help="run directory or checkpoint directory")
    p.add_argument("out_dir", type=Path, help="output directory (config.json + model.safetensors"
                   " [+ the data2vec 2.0 model code])")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty OUT_DIR (default: refuse)")
    p.add_argument("--modality", choices=["speech", "image", "text"],
                   help="a joint multi-modal run: which modality's model to export "
                   "(default: the model's only modality)")
    p.add_argument("--remote-code", action="store_true",
                   help="data2vec 1.0: write our model code (trust_remote_code=True) also where "
                   "transformers' own class cannot express the model (default: refuse, naming "
                   "the option)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="build a run directory from HF or fairseq weights",
                       formatter_class=HelpFormatter,
                       description="Import a HuggingFace data2vec model directory (or a hub id "
                                   "already in the local cache; never downloads) or a released "
                                   "fairseq data2vec 1.0 / 2.0 or BEiT-format .pt file (read "
                                   "without executing code) into a run directory "
                                   "(config.yaml + checkpoints/step-0000000); a task model "
                                   "becomes a fine-tuned run.")
    p.add_argument("--from", dest="from_", required=True, choices=["hf", "fairseq"],
                   help="source format (required)")
    p.add_argument("source", help="HF directory or cached hub id, or a fairseq .pt file")
    p.add_argument("--out", required=True, type=Path,
                   help="run directory to write (required)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (default: refuse)")
    p.set_defaults(func=cmd_import)


__all__ = ["register"]
