"""Build a model from a config: the one place that knows every modality."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from data2vec.config import Config, ModelConfig
from data2vec.modalities.base import FrontEnd
from data2vec.nn.transformer import TransformerEncoder
from data2vec.objective.data2vec import Data2Vec

if TYPE_CHECKING:  # the fine-tuning package imports this module
    from data2vec.finetune.models import FineTuneModel
    from data2vec.joint_config import JointConfig
    from data2vec.objective.joint import JointData2Vec


def build_frontend(modality: str, model_cfg: ModelConfig) -> FrontEnd:
    """The modality's front-end, projecting to the encoder width."""
    from data2vec.modalities import image, speech, text

    builders = {"speech": speech.build_frontend, "image": image.build_frontend,
                "text": text.build_frontend}
    return builders[modality](model_cfg.frontend, model_cfg.encoder.dim)


def build_encoder(model_cfg: ModelConfig, frontend: FrontEnd) -> TransformerEncoder:
    """The shared transformer, given the front-end's patch grid (for relative position bias)."""
    return TransformerEncoder(model_cfg.encoder, window_size=frontend.window_size)


def build_model(cfg: Config | JointConfig, encoder: TransformerEncoder | None = None
                ) -> Data2Vec | JointData2Vec:
    """data2vec model (student + EMA teacher) for ``cfg.modality`` and ``cfg.version``; a joint
    config gives a :class:`~data2vec.objective.joint.JointData2Vec`. `encoder`: build the model
    around this transformer instead of a new one (the joint model's parts share one)."""
    if not isinstance(cfg, Config):
        return build_joint_model(cfg)
    frontend = build_frontend(cfg.modality, cfg.model)
    if encoder is None:
        encoder = build_encoder(cfg.model, frontend)
    if cfg.version == 2:
        from data2vec.objective.data2vec2 import Data2VecV2

        return Data2VecV2(frontend, encoder, cfg.model)
    return Data2Vec(frontend, encoder, cfg.model.objective)


def build_alibi(cfg: Config) -> nn.Module | None:
    """data2vec 2.0 speech: the ALiBi bias module the encoder attends with (else None)."""
    if cfg.version == 2 and cfg.model.v2.alibi:
        from data2vec.objective.data2vec2 import AlibiBias

        return AlibiBias(cfg.model.encoder.num_heads)
    return None


def build_task_model(cfg: Config, task: str, num_outputs: int, pooling: str = "mean",
                     dropout: float = 0.0, final_norm: bool | None = None) -> FineTuneModel:
    """A fine-tuned model's architecture (front-end, transformer, ALiBi, task head), freshly
    initialised: what a fine-tuned checkpoint or an imported HF task model is loaded into."""
    from data2vec.finetune.models import FineTuneModel

    frontend = build_frontend(cfg.modality, cfg.model)
    encoder = build_encoder(cfg.model, frontend)
    return FineTuneModel(frontend, encoder, task, num_outputs, pooling, dropout,  # type: ignore
                         build_alibi(cfg), final_norm)


def build_joint_model(cfg: JointConfig) -> JointData2Vec:
    """One shared transformer, each modality's part built around it (its front-end, head or
    decoder, objective), one EMA teacher."""
    from data2vec.objective.joint import JointData2Vec

    encoder = TransformerEncoder(cfg.model.encoder)  # no patch grid: no relative position bias
    parts = {m: build_model(view, encoder) for m, view in cfg.views().items()}
    return JointData2Vec(parts, cfg.model.ema_start, cfg.model.ema_end,
                         cfg.model.ema_anneal_steps)
