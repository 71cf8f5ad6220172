"""What the HF and fairseq converters share: reading our checkpoints, writing imported ones,
and checking a converted state dict key by key.

An imported checkpoint is a directory in the training loop's format::

    OUT/model.safetensors   the Data2Vec state dict (student, head, EMA teacher)
    OUT/state.pt            {"config": to_dict(cfg), "step": 0, "imported_from": str,
                             "notes": [str, ...]}  (torch.load(weights_only=True) reads it)

so ``data2vec.train.checkpoint.find_checkpoint`` / ``load_weights`` / ``load_state`` and
``config_from_dict`` rebuild the model (fine-tuning ``--init OUT``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from data2vec.build import build_model
from data2vec.config import Config, config_from_dict, to_dict
from data2vec.errors import CheckpointError
from data2vec.modalities.speech import SpeechFrontEndConfig, parse_conv_spec
from data2vec.objective.data2vec import Data2Vec
from data2vec.train.checkpoint import (
    STATE,
    check_keys,
    find_checkpoint,
    load_model_weights,
    load_state,
    load_weights,
    write_checkpoint_dir,
)


@dataclass
class ImportReport:
    """What an import did besides copying tensors: kept for the user, printed by the CLI."""

    source: str
    notes: list[str] = field(default_factory=list)


def load_our_model(path: str | Path) -> tuple[Config, Data2Vec]:
    """(config, model in eval mode) from a run directory or a checkpoint directory."""
    ckpt = find_checkpoint(Path(path))
    state = load_state(ckpt)
    if "config" not in state:
        raise CheckpointError(f"{ckpt / STATE} has no 'config' entry")
    cfg = config_from_dict(state["config"])
    model = build_model(cfg)
    load_model_weights(model, load_weights(ckpt), str(ckpt))
    return cfg, model.eval()


def write_checkpoint(out: str | Path, cfg: Config, model: Data2Vec,
                     report: ImportReport) -> Path:
    """Write `model` as a checkpoint directory `out` (atomically: temp dir, then rename)."""
    state = {"config": to_dict(cfg), "step": 0, "imported_from": report.source,
             "notes": list(report.notes)}
    return write_checkpoint_dir(Path(out), model, state)


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


__all__ = ["ImportReport", "check_keys", "fail_on_leftovers", "load_our_model", "take",
           "take_conv_feature_encoder", "take_linear", "write_checkpoint"]
