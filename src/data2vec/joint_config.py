"""The config of a joint multi-modal run: one shared transformer, one part per modality.

``data2vec pretrain --modality speech,image,text`` reads ``presets/joint_v{version}_{size}.yaml``
on top of each modality's own preset (``{modality}_v{version}_{size}.yaml``):

- ``model.encoder`` is THE transformer every modality runs through: one architecture, which
  replaces every modality preset's ``model.encoder`` (where the presets disagree — pre-LN images
  against post-LN speech and text in data2vec 1.0, a BEiT relative position bias that only images
  can use — the joint preset decides, and says why);
- ``model.ema_*`` is the τ schedule of the one EMA teacher and ``model.init_std`` the weight init;
  each part's ``objective`` takes these values (a part that sets another value is an error);
- ``sampling.<modality>`` are integer weights: each block of ``sum(weights)`` updates holds
  exactly ``weight`` updates of each modality, in a seeded random order (see
  :mod:`data2vec.data.joint`);
- ``<modality>.model`` (``frontend``, ``masking``, ``objective``, ``v2``) and ``<modality>.data``
  come from the modality's preset, with the joint preset's ``<modality>:`` section merged over them:
  masking, top-K, target norms, loss β / scale, head or decoder stay each modality's own;
- ``optim`` and ``run``: one optimizer and one run.

:meth:`JointConfig.view` gives one modality's part as an ordinary single-modality
:class:`~data2vec.config.Config` (sharing the joint config's objects): what the part's model, data
loader, fine-tuning and export are built from.

Dotted overrides address the parts by name (``text.data.batch_size=4``,
``image.model.masking.mask_ratio=0.6``); ``data.<key>=...`` sets the key in every part
(``data.num_workers=2``, ``--skip-bad``), except ``data.path``, which is per modality.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data2vec.config import (
    MODALITIES,
    PRESET_DIR,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    V2Config,
    preset_path,
    validate,
)
from data2vec.configlib import from_dict, load_yaml, merge, parse_overrides
from data2vec.errors import ConfigError
from data2vec.modalities.image import ImageFrontEndConfig, ImageMaskConfig
from data2vec.modalities.speech import SpeechFrontEndConfig, SpeechMaskConfig
from data2vec.modalities.text import TextFrontEndConfig, TextMaskConfig
from data2vec.nn.transformer import EncoderConfig
from data2vec.objective.data2vec import ObjectiveConfig

SHARED_OBJECTIVE_KEYS = ("ema_start", "ema_end", "ema_anneal_steps", "init_std")
"""Objective settings that belong to the joint model (one teacher, one init), not to a part."""


def is_joint(modality: str) -> bool:
    """Whether a ``modality`` value names a joint run (several modalities, comma-separated)."""
    return "," in str(modality)


def parse_modalities(modality: str) -> tuple[str, ...]:
    """``'speech,image,text'`` -> ('speech', 'image', 'text'); unknown or repeated names fail."""
    names = tuple(m.strip() for m in str(modality).split(","))
    unknown = [m for m in names if m not in MODALITIES]
    if unknown:
        raise ConfigError(f"modality {unknown[0]!r} (in {modality!r}) is not one of "
                          f"{', '.join(MODALITIES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"modality {modality!r} names a modality twice")
    if len(names) < 2:
        raise ConfigError(f"a joint run needs at least two modalities, got {modality!r}")
    return names


@dataclass
class JointModelConfig:
    """What the modalities share: the transformer, the teacher's τ schedule, the init."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The one transformer (replaces each modality preset's ``model.encoder``)."""
    ema_start: float = 0.999
    ema_end: float = 0.9999
    ema_anneal_steps: int = 30_000
    """τ of the one EMA teacher rises linearly from ema_start to ema_end over this many updates
    (counting every update, whatever its modality)."""
    init_std: float = 0.02


@dataclass
class SamplingConfig:
    """Integer weights of the modalities' updates (a modality not in the run is ignored)."""

    speech: int = 1
    image: int = 1
    text: int = 1


@dataclass
class SpeechPartModel:
    """The speech part of a joint model: everything of speech's ModelConfig but the encoder."""

    frontend: SpeechFrontEndConfig = field(default_factory=SpeechFrontEndConfig)
    masking: SpeechMaskConfig = field(default_factory=SpeechMaskConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    v2: V2Config = field(default_factory=V2Config)


@dataclass
class ImagePartModel:
    """The image part of a joint model: everything of images' ModelConfig but the encoder."""

    frontend: ImageFrontEndConfig = field(default_factory=ImageFrontEndConfig)
    masking: ImageMaskConfig = field(default_factory=ImageMaskConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    v2: V2Config = field(default_factory=V2Config)


@dataclass
class TextPartModel:
    """The text part of a joint model: everything of text's ModelConfig but the encoder."""

    frontend: TextFrontEndConfig = field(default_factory=TextFrontEndConfig)
    masking: TextMaskConfig = field(default_factory=TextMaskConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    v2: V2Config = field(default_factory=V2Config)


@dataclass
class SpeechPart:
    model: SpeechPartModel = field(default_factory=SpeechPartModel)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class ImagePart:
    model: ImagePartModel = field(default_factory=ImagePartModel)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class TextPart:
    model: TextPartModel = field(default_factory=TextPartModel)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class JointConfig:
    """A joint run; ``modality`` lists its modalities in order (``'speech,image,text'``)."""

    modality: str = "speech,image,text"
    version: Literal[1, 2] = 1
    preset: str = ""
    model: JointModelConfig = field(default_factory=JointModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    speech: SpeechPart | None = None
    image: ImagePart | None = None
    text: TextPart | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The run's modalities, in the order ``modality`` lists them."""
        return parse_modalities(self.modality)

    def weights(self) -> dict[str, int]:
        """Sampling weight of each of the run's modalities."""
        return {m: getattr(self.sampling, m) for m in self.modalities}

    def view(self, modality: str) -> Config:
        """Modality `modality`'s part as a single-modality Config: the shared encoder, the part's
        front-end / masking / objective / v2 and data, the joint optim and run. The objects are
        the joint config's own (a change through the view is a change of the joint config)."""
        part = getattr(self, modality, None) if modality in MODALITIES else None
        if part is None:
            raise ConfigError(f"modality {modality!r} is not part of this joint run "
                              f"({self.modality})")
        model = ModelConfig(encoder=self.model.encoder, frontend=part.model.frontend,
                            masking=part.model.masking, objective=part.model.objective,
                            v2=part.model.v2)
        return Config(modality=modality, version=self.version, preset=f"{self.preset}:{modality}",
                      model=model, data=part.data, optim=self.optim, run=self.run)

    def views(self) -> dict[str, Config]:
        """:meth:`view` of every modality of the run."""
        return {m: self.view(m) for m in self.modalities}


# ------------------------------------------------------------------------------- loading --


def joint_preset_path(size: str, version: int = 1) -> Path:
    """``presets/joint_v{version}_{size}.yaml``; a missing one is an error listing those there."""
    path = PRESET_DIR / f"joint_v{version}_{size}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in PRESET_DIR.glob("joint_*.yaml"))
        raise ConfigError(f"no joint preset '{path.stem}'; available: {', '.join(have)}")
    return path


def _part_from_preset(modality: str, size: str, version: int) -> dict[str, Any]:
    """The modality preset's model (minus the encoder and the shared objective keys) and data."""
    single = load_yaml(preset_path(modality, size, version))
    model = {k: v for k, v in (single.get("model") or {}).items() if k != "encoder"}
    model["objective"] = {k: v for k, v in (model.get("objective") or {}).items()
                          if k not in SHARED_OBJECTIVE_KEYS}
    return {"model": model, "data": dict(single.get("data") or {})}


def _broadcast_data(overrides: list[str], modalities: tuple[str, ...]) -> list[str]:
    """``data.<key>=v`` -> ``<m>.data.<key>=v`` for every modality (``data.path`` is refused)."""
    out = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith("data."):
            out.append(item)
            continue
        if key == "data.path":
            raise ConfigError("data.path: a joint run reads one data path per modality; set "
                              + " ".join(f"{m}.data.path=DIR" for m in modalities))
        out += [f"{m}.{item.strip()}" for m in modalities]
    return out


def _share_objective_keys(data: dict[str, Any], modalities: tuple[str, ...]) -> None:
    """Give every part's objective the joint model's τ schedule and init; a part that sets
    another value is an error naming its key."""
    joint_model = data.get("model") or {}
    defaults = JointModelConfig()
    for m in modalities:
        part = data.get(m)
        if not isinstance(part, dict):
            continue
        model = part.setdefault("model", {})
        objective = dict(model.get("objective") or {})
        for key in SHARED_OBJECTIVE_KEYS:
            value = joint_model.get(key, getattr(defaults, key))
            if key in objective and objective[key] != value:
                raise ConfigError(f"config key '{m}.model.objective.{key}'={objective[key]!r}: a "
                                  f"joint model has one teacher and one init: set model.{key} "
                                  f"(now {value!r}) instead")
            objective[key] = value
        model["objective"] = objective


def _check_parts(data: Mapping[str, Any], modalities: tuple[str, ...]) -> None:
    for m in MODALITIES:
        if m not in modalities and data.get(m) is not None:
            raise ConfigError(f"config section '{m}' is set but {m} is not one of this run's "
                              f"modalities ({','.join(modalities)})")


def load_joint_config(modality: str, size: str = "tiny", version: int = 1,
                      config_file: str | Path | None = None,
                      overrides: list[str] | None = None) -> JointConfig:
    """Joint preset + each modality's preset, then the user's YAML file, then dotted overrides."""
    modalities = parse_modalities(modality)
    joint = load_yaml(joint_preset_path(size, version))
    data: dict[str, Any] = {k: v for k, v in joint.items() if k not in MODALITIES}
    for m in modalities:
        data[m] = merge(_part_from_preset(m, size, version), joint.get(m) or {})
    if config_file:
        data = merge(data, load_yaml(config_file))
    if overrides:
        data = merge(data, parse_overrides(_broadcast_data(list(overrides), modalities),
                                           JointConfig, {}))
    data.update(modality=",".join(modalities), version=version)
    data.setdefault("preset", f"joint_v{version}_{size}")
    return joint_config_from_dict(data)


def joint_config_from_dict(data: Mapping[str, Any]) -> JointConfig:
    """A validated JointConfig from its nested-dict form (a run's config.yaml, a checkpoint)."""
    modalities = parse_modalities(str(data.get("modality", "")))
    _check_parts(data, modalities)
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for m in modalities:
        data.setdefault(m, {})
    _share_objective_keys(data, modalities)
    cfg = from_dict(JointConfig, data)
    validate_joint(cfg)
    return cfg


def validate_joint(cfg: JointConfig) -> None:
    """Joint checks, then every part's single-modality checks (errors name the part)."""
    modalities = cfg.modalities
    for m in MODALITIES:
        if (getattr(cfg, m) is not None) != (m in modalities):
            raise ConfigError(f"config section '{m}' must be set exactly when {m} is one of the "
                              f"run's modalities ({cfg.modality})")
    if cfg.model.encoder.relative_position_bias != "none":
        raise ConfigError(f"model.encoder.relative_position_bias="
                          f"{cfg.model.encoder.relative_position_bias}: a BEiT relative position "
                          "bias over the image patch grid cannot be shared with other modalities "
                          "(use image.model.frontend.positions=learned)")
    for m, weight in cfg.weights().items():
        if weight < 1:
            raise ConfigError(f"sampling.{m}={weight}: every modality of the run needs a weight "
                              ">= 1 (leave it out of --modality instead)")
    for m, view in cfg.views().items():
        for key in SHARED_OBJECTIVE_KEYS:
            if getattr(view.model.objective, key) != getattr(cfg.model, key):
                raise ConfigError(f"{m}.model.objective.{key} differs from model.{key}: a joint "
                                  "model has one teacher and one init")
        try:
            validate(view)
        except ConfigError as e:
            raise ConfigError(f"{m}: {e}") from None


__all__ = ["JointConfig", "JointModelConfig", "SamplingConfig", "is_joint",
           "joint_config_from_dict", "joint_preset_path", "load_joint_config", "parse_modalities",
           "validate_joint"]
