"""One modality out of a joint checkpoint: the single-modality model that fine-tuning,
extraction and export read (through :func:`data2vec.load` with ``modality=``).

A joint checkpoint (``data2vec pretrain --modality speech,image,text``) holds the shared
transformer once and each modality's front-end, head or decoder, and teacher pieces (see
:mod:`data2vec.objective.joint`). :func:`load_modality` rebuilds the joint model, takes modality
m's view and copies it into an ordinary ``Data2Vec`` / ``Data2VecV2`` built from m's view of the
joint config: the front-end of m, the shared encoder, m's head (v1) or decoder (v2) and the
teacher's copy of what m's teacher tracks. Every key of that model is checked.

Example::

    cfg, model = load_modality("runs/speech+image+text-v1-tiny", "image")
    out, padding = model.encode(images)          # as any image model
    data2vec.load("runs/speech+image+text-v1-tiny", modality="image")   # the same, wrapped
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data2vec.build import build_model
from data2vec.config import Config, config_from_dict, to_dict
from data2vec.configlib import merge, parse_overrides
from data2vec.errors import CheckpointError, ConfigError
from data2vec.joint_config import JointConfig, is_joint, joint_config_from_dict
from data2vec.objective.data2vec import StudentTeacher
from data2vec.train import checkpoint as ckpt


def is_joint_state(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's ``state.pt`` (as loaded) is a joint run's."""
    config = state.get("config")
    return isinstance(config, dict) and is_joint(str(config.get("modality", "")))


def joint_config_of(checkpoint: Path, state: dict[str, Any] | None = None) -> JointConfig:
    """The JointConfig saved in `checkpoint`; an error when the checkpoint is not joint."""
    state = ckpt.load_state(checkpoint) if state is None else state
    if not is_joint_state(state):
        raise CheckpointError(f"{checkpoint} is not a joint multi-modal checkpoint")
    return joint_config_from_dict(state["config"])


def load_modality(path: str | Path, modality: str | None,
                  model_overrides: list[str] | None = None) -> tuple[Config, StudentTeacher]:
    """(config, model in eval mode) of modality `modality` of the joint run or checkpoint `path`.

    `model_overrides`: dotted ``model.*`` settings applied to the modality's config (fine-tuning
    dropout, ...). A `modality` the run does not have, or None, is an error listing those it has.
    """
    checkpoint = ckpt.find_checkpoint(Path(path))
    joint_cfg = joint_config_of(checkpoint)
    have = ", ".join(joint_cfg.modalities)
    if modality is None:
        raise ConfigError(f"{path} is a joint {joint_cfg.modality} model: name the modality to "
                          f"take out of it ({have}), e.g. --modality {joint_cfg.modalities[0]}")
    if modality not in joint_cfg.modalities:
        raise ConfigError(f"{path} is a joint model without {modality} (its modalities: {have})")
    joint = build_model(joint_cfg)
    ckpt.load_model_weights(joint, ckpt.load_weights(checkpoint), str(checkpoint))
    view = joint_cfg.view(modality)
    cfg = config_from_dict(merge(to_dict(view), parse_overrides(model_overrides or [])))
    model = build_model(cfg)
    ckpt.load_model_weights(model, joint.view(modality).state_dict(),
                            f"{checkpoint} ({modality} of the joint model)")
    return cfg, model.eval()


__all__ = ["is_joint_state", "joint_config_of", "load_modality"]
