"""The run configuration: model (per modality), data, optimiser and run settings.

Presets are YAML files under ``data2vec/presets`` named ``{modality}_v{version}_{size}.yaml``; a
user file and dotted overrides (``model.encoder.depth=6``) are merged on top, then validated
against these dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data2vec.configlib import from_dict, load_yaml, merge, parse_overrides, to_dict
from data2vec.errors import ConfigError
from data2vec.nn.transformer import EncoderConfig
from data2vec.objective.data2vec import ObjectiveConfig

Modality = Literal["speech", "image", "text"]
MODALITIES: tuple[str, ...] = ("speech", "image", "text")
PRESET_DIR = Path(__file__).parent / "presets"


def _modality_classes(root: Mapping[str, Any]) -> dict[str, type]:
    from data2vec.modalities import image, speech, text

    modality = root.get("modality", "speech")
    table = {
        "speech": {"frontend": speech.SpeechFrontEndConfig, "masking": speech.SpeechMaskConfig},
        "image": {"frontend": image.ImageFrontEndConfig, "masking": image.ImageMaskConfig},
        "text": {"frontend": text.TextFrontEndConfig, "masking": text.TextMaskConfig},
    }
    if modality not in table:
        raise ConfigError(f"config key 'modality': {modality!r} is not one of {MODALITIES}")
    return table[modality]


def _resolve(section: str):
    return lambda parent, root: _modality_classes(root)[section]


@dataclass
class V2Config:
    """data2vec 2.0 only: multi-mask and the convolutional decoder (ignored by version 1)."""

    clone_batch: int = 8
    """M masked copies of each example share one teacher pass."""
    mask_noise_std: float = 0.01
    """Masked slots enter the decoder as N(0, std) noise."""
    decoder_dim: int = 384
    decoder_layers: int = 4
    decoder_kernel: int = 7
    decoder_groups: int = 16
    decoder_residual: bool = True
    decoder_projection_layers: int = 1
    decoder_input_dropout: float = 0.1
    prenet_depth: int = 0
    """Blocks before the main ones that are never target layers."""
    cls_loss: float = 0.0
    """Weight of the CLS regression loss (images: 0.01)."""
    alibi: bool = False
    """Speech: ALiBi attention bias with a learned per-head scale."""
    mask_prob: float = 0.5
    """Fraction of positions masked, exactly the same count in every row (speech 0.5, images 0.8,
    text 0.48); the data loader computes the masks."""
    mask_length: int = 5
    """Speech: span length around each centre; images: block side (3); text: 1 (random)."""
    mask_prob_adjust: float = 0.05
    """Added to the span/block density before the exact count is forced (overlap compensation)."""
    inverse_mask: bool = False
    """Images: pick blocks to KEEP (1 - mask_prob of the patches visible), then invert."""


@dataclass
class ModelConfig:
    """Everything that shapes the network and the objective."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    frontend: Any = field(default=None, metadata={"resolve": _resolve("frontend")})
    """The modality's front-end (see data2vec.modalities.<modality>)."""
    masking: Any = field(default=None, metadata={"resolve": _resolve("masking")})
    """The modality's masking rule."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    v2: V2Config = field(default_factory=V2Config)


@dataclass
class DataConfig:
    """Where the data is and how it is batched."""

    path: str = ""
    """Data directory or manifest; empty = the embedded demo data of the modality."""
    demo_dir: str = ""
    """Where demo data is prepared and cached; empty = $DATA2VEC_HOME or ~/.cache/data2vec."""
    batch_size: int = 8
    """Examples per micro-batch (images, text; speech when max_tokens is 0)."""
    max_tokens: int = 0
    """Speech: total waveform samples per micro-batch (0 = use batch_size)."""
    max_sample_size: int = 80_000
    """Speech: crop longer utterances to this many samples."""
    min_sample_size: int = 8_000
    """Speech: drop utterances shorter than this."""
    sample_rate: int = 16_000
    resample: bool = False
    """Speech: resample files at another rate instead of failing."""
    normalize: bool = True
    """Speech: zero mean / unit variance per utterance."""
    crop_to_shortest: bool = True
    """Speech pre-training: crop every utterance of a batch to the shortest one (fairseq; no
    padding reaches the model); False = zero-pad to the longest with a padding mask."""
    crop_scale: tuple[float, float] = (0.35, 1.0)
    """Images: random resized crop area range."""
    hflip: bool = True
    image_norm: Literal["imagenet", "half"] = "imagenet"
    """Images: normalise with ImageNet mean/std, or with mean = std = 0.5 (pixels to [-1, 1])."""
    tokens_per_sample: int = 128
    """Text: tokens per block."""
    break_mode: Literal["none", "complete_doc"] = "complete_doc"
    tokenizer: str = ""
    """Text: directory with vocab.json + merges.txt; empty = train a BPE on the corpus."""
    vocab_size: int = 4096
    """Text: BPE vocabulary size when training one."""
    num_workers: int = 0
    skip_bad: bool = False
    """Skip unreadable / empty files (counted in the log) instead of failing."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    schedule: Literal["cosine", "tri_stage", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_fraction: float = 0.03
    """Used when warmup_steps is 0: warm-up as a fraction of run.max_steps."""
    tri_stage: tuple[float, float, float] = (0.03, 0.9, 0.07)
    """Warm-up / hold / decay fractions of the tri-stage schedule."""
    init_lr_scale: float = 0.01
    final_lr_scale: float = 0.01
    min_lr: float = 0.0
    clip_norm: float = 0.0
    """Gradient clipping by global norm; 0 = off."""
    grad_accum: int = 1
    """Micro-batches per optimizer update."""


@dataclass
class RunConfig:
    """Length, precision, logging and checkpointing of a run."""

    max_steps: int = 200
    stop_at: int = 0
    """Stop after this many updates as if interrupted (schedules still span max_steps); 0 = off."""
    seed: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 10
    checkpoint_every: int = 100
    keep_last: int = 2
    collapse_min_target_std: float = 0.1
    collapse_min_pred_std: float = 0.01
    collapse_after_steps: int = 0
    """Check for collapse only after this many updates."""
    abort_on_collapse: bool = False
    tensorboard: bool = True
    progress: bool = True
    threads: int = 0
    """torch intra-op threads; 0 = torch's default."""


@dataclass
class Config:
    """A whole run."""

    modality: Modality = "speech"
    version: Literal[1, 2] = 1
    preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def preset_path(modality: str, size: str, version: int = 1) -> Path:
    """The YAML file of a preset; an unknown one is an error listing those that exist."""
    path = PRESET_DIR / f"{modality}_v{version}_{size}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset '{path.stem}'; available: {', '.join(have)}")
    return path


def load_config(modality: str, size: str = "tiny", version: int = 1,
                config_file: str | Path | None = None,
                overrides: list[str] | None = None) -> Config:
    """Preset, then the user's YAML file, then dotted overrides; validated."""
    if modality not in MODALITIES:
        raise ConfigError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    data = load_yaml(preset_path(modality, size, version))
    if config_file:
        data = merge(data, load_yaml(config_file))
    if overrides:
        data = merge(data, parse_overrides(overrides))
    data.setdefault("modality", modality)
    data.setdefault("version", version)
    data.setdefault("preset", f"{modality}_v{version}_{size}")
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a Config saved with :func:`to_dict` (checkpoints)."""
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks the types cannot express."""
    enc, obj = cfg.model.encoder, cfg.model.objective
    if enc.dim % enc.num_heads:
        raise ConfigError(f"model.encoder.dim={enc.dim} is not divisible by "
                          f"model.encoder.num_heads={enc.num_heads}")
    if not 0 < obj.top_k <= enc.depth:
        raise ConfigError(f"model.objective.top_k={obj.top_k} must be in 1..{enc.depth} "
                          "(model.encoder.depth)")
    if (cfg.modality == "image" and enc.relative_position_bias != "none"
            and not cfg.model.frontend.cls_token):
        raise ConfigError("model.encoder.relative_position_bias needs a CLS token "
                          "(model.frontend.cls_token=true): the BEiT table has CLS entries")
    if cfg.version == 2:
        _validate_v2(cfg)
    elif obj.ema_scope == "context":
        raise ConfigError("model.objective.ema_scope='context' is data2vec 2.0 only (version 2)")
    if cfg.optim.grad_accum < 1:
        raise ConfigError("optim.grad_accum must be >= 1")
    if cfg.run.max_steps < 1:
        raise ConfigError("run.max_steps must be >= 1")


def _validate_v2(cfg: Config) -> None:
    """data2vec 2.0: prenet blocks are never target layers; masks leave something visible."""
    enc, obj, v2 = cfg.model.encoder, cfg.model.objective, cfg.model.v2
    if not 0 <= v2.prenet_depth < enc.depth:
        raise ConfigError(f"model.v2.prenet_depth={v2.prenet_depth} must be in "
                          f"0..{enc.depth - 1} (model.encoder.depth counts prenet blocks too)")
    if obj.top_k > enc.depth - v2.prenet_depth:
        raise ConfigError(f"model.objective.top_k={obj.top_k} would reach the prenet: at most "
                          f"{enc.depth - v2.prenet_depth} (model.encoder.depth - "
                          "model.v2.prenet_depth)")
    if v2.clone_batch < 1:
        raise ConfigError(f"model.v2.clone_batch={v2.clone_batch} must be >= 1")
    if not 0.0 < v2.mask_prob < 1.0:
        raise ConfigError(f"model.v2.mask_prob={v2.mask_prob} must be in (0, 1)")
    if v2.mask_length < 1:
        raise ConfigError(f"model.v2.mask_length={v2.mask_length} must be >= 1")
    if v2.decoder_layers < 1 or v2.decoder_dim < 1 or v2.decoder_dim % v2.decoder_groups:
        raise ConfigError(f"model.v2.decoder_dim={v2.decoder_dim} must be >= 1 and divisible by "
                          f"decoder_groups={v2.decoder_groups}; decoder_layers >= 1")


__all__ = ["Config", "DataConfig", "ModelConfig", "OptimConfig", "RunConfig", "V2Config",
           "config_from_dict", "load_config", "preset_path", "to_dict", "validate"]
