"""The run configuration: model (per modality), data, optimiser and run settings.

Presets are YAML files under ``data2vec/presets`` named ``{modality}_v{version}_{size}.yaml``; a
user file and dotted overrides (``model.encoder.depth=6``) are merged on top, then validated
against these dataclasses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from data2vec.configlib import from_dict, load_yaml, merge, parse_overrides, to_dict
from data2vec.errors import ConfigError
from data2vec.nn.transformer import EncoderConfig
from data2vec.objective.data2vec import ObjectiveConfig

if TYPE_CHECKING:  # joint_config imports this module
    from data2vec.joint_config import JointConfig

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
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """'auto' = CUDA when available, else CPU; an unavailable device is a one-line error."""
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
    nonfinite: Literal["skip", "stop"] = "skip"
    """A non-finite loss or gradient is caught before the optimizer applies it: 'skip' drops that
    update (the batch is consumed, the step counter stays), 'stop' ends the run with a checkpoint
    of the last finite update."""
    max_consecutive_skips: int = 5
    """With nonfinite=skip: stop after this many non-finite updates in a row."""
    compile: bool = False
    """torch.compile every transformer block (student and teacher); the first steps compile.
    Off by default: on 2 CPU cores it did not pay (benchmarks/speed.py, compile rows)."""
    activation_checkpointing: bool = False
    """Recompute each student block's activations in the backward pass instead of keeping them:
    less memory for about one more forward of compute."""
    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: 'ddp' (every rank holds all weights) or 'fsdp' (FSDP2: weights, gradients
    and optimizer state sharded across ranks)."""


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
                overrides: list[str] | None = None) -> Config | JointConfig:
    """Preset, then the user's YAML file, then dotted overrides; validated.

    Several comma-separated modalities (``'speech,image,text'``) give a joint run's config, a
    :class:`~data2vec.joint_config.JointConfig` (see there)."""
    if "," in modality:
        from data2vec.joint_config import load_joint_config

        return load_joint_config(modality, size, version, config_file, overrides)
    if modality not in MODALITIES:
        raise ConfigError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    data = load_yaml(preset_path(modality, size, version))
    if config_file:
        data = merge(data, load_yaml(config_file))
    if overrides:
        data = merge(data, parse_overrides(overrides, Config, {"modality": modality}))
    data.setdefault("modality", modality)
    data.setdefault("version", version)
    data.setdefault("preset", f"{modality}_v{version}_{size}")
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def config_from_dict(data: Mapping[str, Any]) -> Config | JointConfig:
    """Rebuild a Config saved with :func:`to_dict` (checkpoints); a joint run's gives its
    :class:`~data2vec.joint_config.JointConfig`."""
    if "," in str(data.get("modality", "")):
        from data2vec.joint_config import joint_config_from_dict

        return joint_config_from_dict(data)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config | JointConfig) -> None:
    """Every field's range (see :data:`RULES`), every float finite, then cross-field checks
    (a joint run's: each part's, see :func:`data2vec.joint_config.validate_joint`)."""
    if not isinstance(cfg, Config):
        from data2vec.joint_config import validate_joint

        return validate_joint(cfg)
    check_ranges(cfg, RULES)
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
    _validate_pairs(cfg)


# --------------------------------------------------------------------------- per-field ranges --

Check = Callable[[Any], bool]


def rule(check: Check, expected: str) -> tuple[Check, str]:
    """A range rule: the check and what the error says was expected."""
    return check, expected


def at_least(low: float) -> tuple[Check, str]:
    return rule(lambda v: v >= low, f">= {low}")


def positive() -> tuple[Check, str]:
    return rule(lambda v: v > 0, "> 0")


def fraction(upper_open: bool = False, lower_open: bool = False) -> tuple[Check, str]:
    lo, hi = "(" if lower_open else "[", ")" if upper_open else "]"
    return rule(lambda v: (v > 0 if lower_open else v >= 0) and (v < 1 if upper_open else v <= 1),
                f"in {lo}0, 1{hi}")


def _optional(inner: tuple[Check, str]) -> tuple[Check, str]:
    check, expected = inner
    return rule(lambda v: v is None or check(v), f"null or {expected}")


_DROPOUT = fraction(upper_open=True)
RULES: dict[str, tuple[Check, str]] = {
    # model.encoder
    "model.encoder.depth": at_least(1), "model.encoder.dim": at_least(1),
    "model.encoder.num_heads": at_least(1), "model.encoder.ffn_dim": at_least(1),
    "model.encoder.dropout": _DROPOUT, "model.encoder.attention_dropout": _DROPOUT,
    "model.encoder.activation_dropout": _DROPOUT, "model.encoder.layerdrop": _DROPOUT,
    "model.encoder.drop_path": _DROPOUT, "model.encoder.layer_scale_init": at_least(0),
    "model.encoder.norm_eps": positive(),
    # model.objective
    "model.objective.loss_beta": at_least(0),
    "model.objective.loss_scale": _optional(positive()),
    "model.objective.head_layers": rule(lambda v: v in (1, 2), "1 or 2"),
    "model.objective.ema_start": fraction(), "model.objective.ema_end": fraction(),
    "model.objective.ema_anneal_steps": at_least(0), "model.objective.init_std": positive(),
    # model.frontend (whichever keys the modality has)
    "model.frontend.layer_norm_eps": positive(), "model.frontend.image_size": at_least(1),
    "model.frontend.patch_size": at_least(1),
    "model.frontend.in_channels": rule(lambda v: v in (1, 3), "1 (grey) or 3 (RGB)"),
    "model.frontend.vocab_size": at_least(1),
    # model.masking (whichever keys the modality has)
    "model.masking.mask_ratio": fraction(), "model.masking.min_block": at_least(1),
    "model.masking.max_block": _optional(at_least(1)), "model.masking.min_aspect": positive(),
    "model.masking.max_aspect": _optional(positive()),
    # model.v2
    "model.v2.clone_batch": at_least(1), "model.v2.mask_noise_std": at_least(0),
    "model.v2.decoder_dim": at_least(1), "model.v2.decoder_layers": at_least(1),
    "model.v2.decoder_kernel": at_least(1), "model.v2.decoder_groups": at_least(1),
    "model.v2.decoder_projection_layers": at_least(1),
    "model.v2.decoder_input_dropout": _DROPOUT, "model.v2.prenet_depth": at_least(0),
    "model.v2.cls_loss": at_least(0), "model.v2.mask_prob": fraction(True, True),
    "model.v2.mask_length": at_least(1), "model.v2.mask_prob_adjust": at_least(0),
    # data
    "data.batch_size": at_least(0), "data.max_tokens": at_least(0),
    "data.max_sample_size": at_least(0), "data.min_sample_size": at_least(0),
    "data.sample_rate": at_least(1), "data.tokens_per_sample": at_least(3),
    "data.vocab_size": at_least(262), "data.num_workers": at_least(0),
    # optim
    "optim.lr": positive(), "optim.eps": positive(), "optim.weight_decay": at_least(0),
    "optim.warmup_steps": at_least(0), "optim.warmup_fraction": fraction(),
    "optim.init_lr_scale": fraction(lower_open=True),
    "optim.final_lr_scale": fraction(lower_open=True), "optim.min_lr": at_least(0),
    "optim.clip_norm": at_least(0), "optim.grad_accum": at_least(1),
    # run
    "run.max_steps": at_least(1), "run.stop_at": at_least(0),
    "run.log_every": at_least(1), "run.checkpoint_every": at_least(1),
    "run.keep_last": at_least(0), "run.collapse_min_target_std": at_least(0),
    "run.collapse_min_pred_std": at_least(0), "run.collapse_after_steps": at_least(0),
    "run.threads": at_least(0), "run.max_consecutive_skips": at_least(1),
}
"""Range of every numeric field, by dotted key: (check, what was expected)."""


def _leaves(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every non-dataclass field under `obj`, tuples item by item."""
    for f in fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if is_dataclass(value):
            yield from _leaves(value, key + ".")
        elif isinstance(value, tuple | list):
            for i, item in enumerate(value):
                yield f"{key}[{i}]", item
        else:
            yield key, value


def check_ranges(cfg: Any, rules: dict[str, tuple[Check, str]], what: str = "config key") -> None:
    """No NaN or infinity anywhere in the dataclass `cfg`; every key in `rules` (dotted, tuple
    items as ``key[i]``) within its range. `what` names the key in the error."""
    for key, value in _leaves(cfg, ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{what} '{key}': {value} is not a finite number")
        rule = rules.get(key)
        if rule is not None and not rule[0](value):
            raise ConfigError(f"{what} '{key}': {value!r} is out of range, expected {rule[1]}")


def _validate_pairs(cfg: Config) -> None:
    """Ranges that involve two or more fields."""
    data, optim = cfg.data, cfg.optim
    if cfg.modality == "speech" and data.batch_size < 1 and data.max_tokens < 1:
        raise ConfigError("data.batch_size and data.max_tokens are both 0: set one of them >= 1")
    if cfg.modality != "speech" and data.batch_size < 1:
        raise ConfigError(f"config key 'data.batch_size': {data.batch_size} is out of range, "
                          "expected >= 1")
    if 0 < data.max_sample_size < data.min_sample_size:
        raise ConfigError(f"data.min_sample_size={data.min_sample_size} exceeds "
                          f"data.max_sample_size={data.max_sample_size}: every utterance would "
                          "be dropped")
    low, high = data.crop_scale
    if not 0 < low <= high <= 1:
        raise ConfigError(f"config key 'data.crop_scale': {list(data.crop_scale)} is out of "
                          "range, expected 0 < low <= high <= 1")
    for i, beta in enumerate(optim.betas):
        if not 0 <= beta < 1:
            raise ConfigError(f"config key 'optim.betas[{i}]': {beta} is out of range, expected "
                              "in [0, 1)")
    if any(f < 0 for f in optim.tri_stage) or sum(optim.tri_stage) > 1 + 1e-6:
        raise ConfigError(f"config key 'optim.tri_stage': {list(optim.tri_stage)} must be three "
                          "non-negative fractions of run.max_steps summing to at most 1")
    if optim.min_lr > optim.lr:
        raise ConfigError(f"optim.min_lr={optim.min_lr} exceeds optim.lr={optim.lr}")
    if cfg.modality == "image":
        frontend = cfg.model.frontend
        if frontend.image_size % frontend.patch_size:
            raise ConfigError(f"model.frontend.image_size={frontend.image_size} is not a "
                              f"multiple of model.frontend.patch_size={frontend.patch_size}")
        masking = cfg.model.masking
        if masking.max_block is not None and masking.max_block < masking.min_block:
            raise ConfigError(f"model.masking.max_block={masking.max_block} is below "
                              f"model.masking.min_block={masking.min_block}")
        if masking.max_aspect is not None and masking.max_aspect < masking.min_aspect:
            raise ConfigError(f"model.masking.max_aspect={masking.max_aspect} is below "
                              f"model.masking.min_aspect={masking.min_aspect}")


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
    if v2.decoder_dim % v2.decoder_groups:
        raise ConfigError(f"model.v2.decoder_dim={v2.decoder_dim} is not divisible by "
                          f"model.v2.decoder_groups={v2.decoder_groups}")


__all__ = ["Config", "DataConfig", "ModelConfig", "OptimConfig", "RunConfig", "V2Config",
           "config_from_dict", "load_config", "preset_path", "to_dict", "validate"]
