"""What the HF and fairseq converters share: reading our checkpoints, writing imported ones,
and checking a converted state dict key by key.

Every import (HF base or task model, fairseq 1.0 / 2.0, BEiT) lands in one run layout, the one
``data2vec pretrain`` and ``finetune`` write::

    OUT/config.yaml                         the resolved config (architecture of the model)
    OUT/checkpoints/step-0000000/           model.safetensors + state.pt: {"config", "step": 0,
                                            "imported_from", "notes"[, "finetune", "labels"]}
    OUT/checkpoints/latest                  names that checkpoint
    OUT/tokenizer/                          text: vocab.json + merges.txt, when the source has them

so :func:`data2vec.load`, ``--init OUT``, ``data2vec evaluate OUT`` and ``export`` read it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor, nn

from data2vec.config import Config, to_dict
from data2vec.errors import CheckpointError
from data2vec.modalities.speech import SpeechFrontEndConfig, parse_conv_spec
from data2vec.objective.data2vec import Data2Vec
from data2vec.train.checkpoint import check_keys, save_checkpoint


@dataclass
class ImportReport:
    """What an import did besides copying tensors: kept for the user, printed by the CLI."""

    source: str
    notes: list[str] = field(default_factory=list)


def load_our_model(path: str | Path) -> tuple[Config, Data2Vec]:
    """(config, pre-trained model in eval mode) from a run or checkpoint directory."""
    from data2vec.loading import load_checkpoint

    loaded = load_checkpoint(path)
    if loaded.task is not None:
        raise CheckpointError(f"{loaded.source} is a fine-tuned {loaded.task} model; a "
                              "pre-trained checkpoint was expected here")
    return loaded.cfg, loaded.network


def write_run(out: str | Path, cfg: Config, model: nn.Module, report: ImportReport,
              tokenizer_from: Path | None = None, **extra: Any) -> Path:
    """Write an imported `model` as the run directory `out` (layout in the module docstring);
    `extra` state entries (``finetune``, ``labels``) make it a fine-tuned run. Returns the
    checkpoint directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None and cfg.modality == "text":
        copy_tokenizer(tokenizer_from, out / "tokenizer", report)
    state = {"config": to_dict(cfg), "step": 0, "imported_from": report.source,
             "notes": list(report.notes), **extra}
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return save_checkpoint(out / "checkpoints", 0, model, state, keep_last=1)


def write_checkpoint(out: str | Path, cfg: Config, model: Data2Vec,
                     report: ImportReport) -> Path:
    """Write an imported pre-trained `model` as the run directory `out` (see :func:`write_run`)."""
    return write_run(out, cfg, model, report)


def copy_tokenizer(directory: Path, dst: Path, report: ImportReport) -> None:
    """Copy a source's BPE files (vocab.json + merges.txt) into `dst`, checked by loading them."""
    from data2vec.data.tokenizer import MERGES_FILE, VOCAB_FILE, BPETokenizer

    files = [directory / VOCAB_FILE, directory / MERGES_FILE]
    if not all(f.is_file() for f in files):
        report.notes.append(f"no {VOCAB_FILE} + {MERGES_FILE} in {directory}: copy the model's "
                            f"BPE files to {dst} before 'data2vec evaluate' or 'extract'")
        return
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dst / f.name)
    BPETokenizer.load(dst)  # fails now, naming the file, rather than at evaluation time


def take(sd: dict[str, Tensor], key: str, source: str) -> Tensor:
    """Pop `key` from a source state dict; a missing key is an error naming it."""
    if key not in sd:
        raise CheckpointError(f"{source}: missing key '{key}'")
    return sd.pop(key)


def take_linear(sd: dict[str, Tensor], src: str, out: dict[str, Tensor], dst: str, source: str,
                bias: bool = True) -> None:
    """Move `src`.weight (and .bias) of a source state dict to `dst`.weight/.bias in `out`."""
    out[f"{dst}.weight"] = take(sd, f"{src}.weight", source)
    if bias:
        out[f"{dst}.bias"] = take(sd, f"{src}.bias", source)


def take_conv_feature_encoder(sd: dict[str, Tensor], prefix: str, out: dict[str, Tensor],
                              fe: SpeechFrontEndConfig, source: str) -> None:
    """fairseq's waveform conv stack (`prefix`.conv_layers.i: conv at .0, norm at .2 or .2.1)
    to our frontend.feature_encoder.i; the same layout in data2vec 1.0 and 2.0."""
    for i, _ in enumerate(parse_conv_spec(fe.conv_spec)):
        src, dst = f"{prefix}.conv_layers.{i}", f"frontend.feature_encoder.{i}"
        take_linear(sd, f"{src}.0", out, f"{dst}.conv", source, bias=fe.conv_bias)
        if fe.extractor_mode == "layer_norm":
            take_linear(sd, f"{src}.2.1", out, f"{dst}.norm", source)
        elif i == 0:  # group_norm mode: one GroupNorm, in the first layer only
            take_linear(sd, f"{src}.2", out, f"{dst}.norm", source)


def fail_on_leftovers(sd: dict[str, Tensor], source: str) -> None:
    """Source keys no rule consumed are an error, listed, never dropped silently."""
    if sd:
        raise CheckpointError(f"{source}: unknown keys not mapped: {sorted(sd)}")


__all__ = ["ImportReport", "check_keys", "copy_tokenizer", "fail_on_leftovers", "load_our_model",
           "take", "take_conv_feature_encoder", "take_linear", "write_checkpoint", "write_run"]
