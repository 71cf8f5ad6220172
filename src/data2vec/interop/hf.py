"""HuggingFace ``transformers`` <-> our data2vec 1.0 models (audio, vision, text; base and task).

Export writes a directory that ``Data2Vec{Audio,Vision,Text}Model.from_pretrained`` loads
(config.json + model.safetensors); import builds our model from such a directory (or a hub id
already in the local HF cache: everything runs offline). ``transformers`` is imported only by
:func:`export_hf` (to write a genuine HF directory); :func:`import_hf` reads the files directly.

The weight mapping is one table per modality (:func:`key_table`): each entry says which of our
tensors equals which HF tensor(s), concatenated on dim 0 (our fused qkv = HF q, k, v). Both
directions use the same table, and every tensor on either side must be covered: nothing is
dropped silently. What is outside both models (our EMA teacher and regression head; HF's pooler
and task heads) is reported, not copied.

Options HF cannot express (data2vec 2.0, sin-cos positions, pre-LN audio, a second input norm …)
make export fail with a :class:`~data2vec.errors.ConfigError` naming the option.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from data2vec.build import build_model
from data2vec.config import Config, config_from_dict, load_config, to_dict
from data2vec.errors import CheckpointError, ConfigError
from data2vec.files import read_text
from data2vec.interop.common import ImportReport, check_keys, write_run
from data2vec.interop.hf_processors import write_preprocessing
from data2vec.interop.hf_tasks import (
    build_task_network,
    detect_task,
    head_from_hf,
    split_head,
    write_task_run,
)
from data2vec.interop.safe_unpickle import load_checkpoint_file
from data2vec.modalities.speech import parse_conv_spec
from data2vec.objective.data2vec import Data2Vec
from data2vec.runtime import honour_umask

MODEL_TYPES = {"data2vec-audio": "speech", "data2vec-vision": "image", "data2vec-text": "text"}
HF_CLASSES = {"speech": "Data2VecAudioModel", "image": "Data2VecVisionModel",
              "text": "Data2VecTextModel"}
# Prefixes the task models (…ForCTC, …ForImageClassification, …ForSequenceClassification) put
# before the base model's keys.
BASE_PREFIXES = ("data2vec_audio.", "data2vec_vision.", "data2vec_text.")
# The only fixed epsilon in HF Data2VecAudio: its conv-layer and positional-conv LayerNorms.
HF_AUDIO_CONV_EPS = 1e-5


@dataclass(frozen=True)
class Entry:
    """Our tensor ``ours`` = torch.cat(HF tensors ``hf``, dim 0), reshaped to the target shape."""

    ours: str
    hf: tuple[str, ...]


def _one(ours: str, hf: str) -> Entry:
    return Entry(ours, (hf,))


def _wb(ours: str, hf: str, bias: bool = True) -> Iterator[Entry]:
    yield _one(f"{ours}.weight", f"{hf}.weight")
    if bias:
        yield _one(f"{ours}.bias", f"{hf}.bias")


# ------------------------------------------------------------------------------- key tables


def _speech_table(cfg: Config) -> Iterator[Entry]:
    fe = cfg.model.frontend
    for i, _ in enumerate(parse_conv_spec(fe.conv_spec)):
        src = f"feature_extractor.conv_layers.{i}"
        yield from _wb(f"frontend.feature_encoder.{i}.conv", f"{src}.conv", fe.conv_bias)
        yield from _wb(f"frontend.feature_encoder.{i}.norm", f"{src}.layer_norm")
    yield from _wb("frontend.feature_norm", "feature_projection.layer_norm")
    yield from _wb("frontend.feature_proj", "feature_projection.projection")
    yield _one("frontend.mask_emb", "masked_spec_embed")
    for i in range(fe.pos_conv_depth):
        yield from _wb(f"frontend.pos_conv.layers.{i}.conv",
                       f"encoder.pos_conv_embed.layers.{i}.conv")
    yield from _wb("encoder.input_norm", "encoder.layer_norm")
    for i in range(cfg.model.encoder.depth):
        ours, hf = f"encoder.blocks.{i}", f"encoder.layers.{i}"
        att = f"{hf}.attention"
        for kind in ("weight", "bias"):
            yield Entry(f"{ours}.attn.qkv.{kind}",
                        tuple(f"{att}.{p}_proj.{kind}" for p in ("q", "k", "v")))
        yield from _wb(f"{ours}.attn.proj", f"{att}.out_proj")
        yield from _wb(f"{ours}.norm1", f"{hf}.layer_norm")
        yield from _wb(f"{ours}.mlp.fc1", f"{hf}.feed_forward.intermediate_dense")
        yield from _wb(f"{ours}.mlp.fc2", f"{hf}.feed_forward.output_dense")
        yield from _wb(f"{ours}.norm2", f"{hf}.final_layer_norm")


def _text_table(cfg: Config) -> Iterator[Entry]:
    yield _one("frontend.embed_tokens.weight", "embeddings.word_embeddings.weight")
    yield _one("frontend.embed_positions.weight", "embeddings.position_embeddings.weight")
    # HF adds token_type_embeddings[0] to every position (no token_type_ids given): a constant.
    yield _one("frontend.token_type", "embeddings.token_type_embeddings.weight")
    yield from _wb("frontend.layer_norm", "embeddings.LayerNorm")
    for i in range(cfg.model.encoder.depth):
        ours, hf = f"encoder.blocks.{i}", f"encoder.layer.{i}"
        for kind in ("weight", "bias"):
            yield Entry(f"{ours}.attn.qkv.{kind}", tuple(
                f"{hf}.attention.self.{p}.{kind}" for p in ("query", "key", "value")))
        yield from _wb(f"{ours}.attn.proj", f"{hf}.attention.output.dense")
        yield from _wb(f"{ours}.norm1", f"{hf}.attention.output.LayerNorm")
        yield from _wb(f"{ours}.mlp.fc1", f"{hf}.intermediate.dense")
        yield from _wb(f"{ours}.mlp.fc2", f"{hf}.output.dense")
        yield from _wb(f"{ours}.norm2", f"{hf}.output.LayerNorm")


def _image_table(cfg: Config) -> Iterator[Entry]:
    fe, enc = cfg.model.frontend, cfg.model.encoder
    yield _one("frontend.cls_token", "embeddings.cls_token")
    if fe.mask_token:
        yield _one("frontend.mask_token", "embeddings.mask_token")
    if fe.positions == "learned":
        yield _one("frontend.pos_embed", "embeddings.position_embeddings")
    yield from _wb("frontend.patch_embed", "embeddings.patch_embeddings.projection")
    table = "relative_position_bias.relative_position_bias_table"
    if enc.relative_position_bias == "shared":
        yield _one("encoder.rel_pos_bias.relative_position_bias_table", f"encoder.{table}")
    for i in range(enc.depth):
        ours, hf = f"encoder.blocks.{i}", f"encoder.layer.{i}"
        att = f"{hf}.attention.attention"
        yield Entry(f"{ours}.attn.qkv.weight",
                    tuple(f"{att}.{p}.weight" for p in ("query", "key", "value")))
        yield _one(f"{ours}.attn.q_bias", f"{att}.query.bias")  # HF's key has no bias (BEiT)
        yield _one(f"{ours}.attn.v_bias", f"{att}.value.bias")
        if enc.relative_position_bias == "per_block":
            yield _one(f"{ours}.rel_pos_bias.relative_position_bias_table", f"{att}.{table}")
        yield from _wb(f"{ours}.attn.proj", f"{hf}.attention.output.dense")
        yield from _wb(f"{ours}.norm1", f"{hf}.layernorm_before")
        yield from _wb(f"{ours}.norm2", f"{hf}.layernorm_after")
        yield from _wb(f"{ours}.mlp.fc1", f"{hf}.intermediate.dense")
        yield from _wb(f"{ours}.mlp.fc2", f"{hf}.output.dense")
        if enc.layer_scale_init > 0:
            yield _one(f"{ours}.ls1.gamma", f"{hf}.lambda_1")
            yield _one(f"{ours}.ls2.gamma", f"{hf}.lambda_2")
    if enc.final_norm:  # HF applies `layernorm` to the sequence when use_mean_pooling is off
        yield from _wb("encoder.final_norm", "layernorm")


def key_table(cfg: Config) -> list[Entry]:
    """Our student's front-end + encoder tensors and the HF base-model tensors they equal."""
    tables = {"speech": _speech_table, "text": _text_table, "image": _image_table}
    return list(tables[cfg.modality](cfg))


# ------------------------------------------------------------------------------- config maps


def _refuse(option: str, why: str) -> ConfigError:
    return ConfigError(f"cannot export to HuggingFace: {option} — {why}")


def _check_common(cfg: Config) -> None:
    enc = cfg.model.encoder
    if cfg.version != 1:
        raise _refuse("version=2", "transformers has no data2vec 2.0 classes (transformers "
                      "issues #23069, #31346; no ALiBi, no v2 decoders)")
    if enc.relative_position_bias != "none" and cfg.modality != "image":
        raise _refuse(f"model.encoder.relative_position_bias={enc.relative_position_bias}",
                      f"HF {HF_CLASSES[cfg.modality]} has no relative position bias")


def _check_post_ln(cfg: Config, input_norm: bool) -> None:
    enc, name = cfg.model.encoder, HF_CLASSES[cfg.modality]
    if enc.layer_norm_first:
        raise _refuse("model.encoder.layer_norm_first=true", f"HF {name} is post-LN only "
                      "(it has no 'stable layer norm' variant)")
    if enc.input_norm != input_norm:
        raise _refuse(f"model.encoder.input_norm={str(enc.input_norm).lower()}",
                      f"HF {name} {'always has an' if input_norm else 'has no'} encoder "
                      "input LayerNorm")
    if enc.final_norm:
        raise _refuse("model.encoder.final_norm=true", f"HF {name} has no final LayerNorm")
    if enc.qkv_bias != "all":
        raise _refuse(f"model.encoder.qkv_bias={enc.qkv_bias}",
                      f"HF {name} has q, k and v biases")
    if enc.layer_scale_init > 0:
        raise _refuse("model.encoder.layer_scale_init", f"HF {name} has no layer scale")


def hf_config_dict(cfg: Config) -> dict[str, Any]:
    """The HF config (as keyword arguments) equivalent to `cfg`; ConfigError when there is none."""
    _check_common(cfg)
    enc, fe = cfg.model.encoder, cfg.model.frontend
    common = {"hidden_size": enc.dim, "num_hidden_layers": enc.depth,
              "num_attention_heads": enc.num_heads, "intermediate_size": enc.ffn_dim,
              "hidden_act": "gelu", "layer_norm_eps": enc.norm_eps}
    if cfg.modality == "speech":
        _check_post_ln(cfg, input_norm=True)
        if fe.extractor_mode != "layer_norm":
            raise _refuse(f"model.frontend.extractor_mode={fe.extractor_mode}",
                          "HF Data2VecAudio has a LayerNorm in every conv layer")
        if fe.layer_norm_eps != HF_AUDIO_CONV_EPS or enc.norm_eps != fe.layer_norm_eps:
            raise _refuse(f"model.frontend.layer_norm_eps={fe.layer_norm_eps} / "
                          f"model.encoder.norm_eps={enc.norm_eps}",
                          f"HF fixes the conv LayerNorm epsilon at {HF_AUDIO_CONV_EPS} and uses "
                          "layer_norm_eps for the feature projection and the encoder")
        conv = parse_conv_spec(fe.conv_spec)
        return {**common, "hidden_dropout": enc.dropout, "attention_dropout": enc.attention_dropout,
                "activation_dropout": enc.activation_dropout, "layerdrop": enc.layerdrop,
                "feat_proj_dropout": 0.0, "feat_extract_activation": "gelu",
                "conv_dim": [c for c, _, _ in conv], "conv_kernel": [k for _, k, _ in conv],
                "conv_stride": [s for _, _, s in conv], "conv_bias": fe.conv_bias,
                "num_conv_pos_embeddings": fe.pos_conv_depth,
                "conv_pos_kernel_size": fe.pos_conv_kernel,
                "num_conv_pos_embedding_groups": fe.pos_conv_groups,
                # HF's SpecAugment default for fine-tuning; > 0 keeps masked_spec_embed.
                "mask_time_prob": 0.05}
    if cfg.modality == "text":
        _check_post_ln(cfg, input_norm=False)
        if fe.layer_norm_eps != enc.norm_eps:
            raise _refuse(f"model.frontend.layer_norm_eps={fe.layer_norm_eps} != "
                          f"model.encoder.norm_eps={enc.norm_eps}",
                          "HF Data2VecText has one layer_norm_eps")
        return {**common, "vocab_size": fe.vocab_size, "hidden_dropout_prob": enc.dropout,
                "attention_probs_dropout_prob": enc.attention_dropout,
                "max_position_embeddings": fe.max_positions + fe.pad_index + 1,
                "type_vocab_size": 1, "pad_token_id": fe.pad_index, "bos_token_id": 0,
                "eos_token_id": 2}
    if not enc.layer_norm_first:
        raise _refuse("model.encoder.layer_norm_first=false", "HF Data2VecVision is pre-LN only")
    if fe.positions == "sincos":
        raise _refuse("model.frontend.positions=sincos", "HF Data2VecVision has learned "
                      "absolute positions or none")
    if not fe.cls_token:
        raise _refuse("model.frontend.cls_token=false", "HF Data2VecVision always has a CLS token")
    if enc.qkv_bias != "qv":
        raise _refuse(f"model.encoder.qkv_bias={enc.qkv_bias}",
                      "HF Data2VecVision has query and value biases and no key bias ('qv')")
    return {**common, "hidden_dropout_prob": enc.dropout,
            "attention_probs_dropout_prob": enc.attention_dropout,
            "image_size": fe.image_size, "patch_size": fe.patch_size,
            "num_channels": fe.in_channels, "use_mask_token": fe.mask_token,
            "use_absolute_position_embeddings": fe.positions == "learned",
            "use_relative_position_bias": enc.relative_position_bias == "per_block",
            "use_shared_relative_position_bias": enc.relative_position_bias == "shared",
            "layer_scale_init_value": enc.layer_scale_init, "drop_path_rate": enc.drop_path,
            "use_mean_pooling": not enc.final_norm}


def _require(hf: dict[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise ConfigError(f"cannot import HF config: {key}={value!r} has no equivalent here "
                          f"(supported: {', '.join(map(repr, allowed))})")


def _square(value: Any, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"cannot import HF config: {key}={value!r} is not square")
        return int(value[0])
    return int(value)


def config_from_hf(hf: dict[str, Any], notes: list[str] | None = None) -> Config:
    """Our Config for an HF data2vec config.json dict (objective/optim from the Base preset)."""
    notes = [] if notes is None else notes
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"cannot import HF config: model_type={model_type!r} is not one of "
                          f"{sorted(MODEL_TYPES)}")
    modality = MODEL_TYPES[model_type]
    _require(hf, "hidden_act", ("gelu",), "gelu")
    data = to_dict(load_config(modality, "base"))
    enc, fe = data["model"]["encoder"], data["model"]["frontend"]
    enc.update(depth=hf["num_hidden_layers"], dim=hf["hidden_size"],
               num_heads=hf["num_attention_heads"], ffn_dim=hf["intermediate_size"],
               norm_eps=float(hf["layer_norm_eps"]), relative_position_bias="none",
               layer_scale_init=0.0, drop_path=0.0)
    data["model"]["objective"]["top_k"] = min(data["model"]["objective"]["top_k"], enc["depth"])
    if modality == "speech":
        _speech_from_hf(hf, enc, fe, notes)
    elif modality == "text":
        _text_from_hf(hf, enc, fe, notes)
    else:
        _image_from_hf(hf, enc, fe, notes)
    data["preset"] = f"imported from HF {model_type}"
    return config_from_dict(data)


def _speech_from_hf(hf: dict[str, Any], enc: dict, fe: dict, notes: list[str]) -> None:
    _require(hf, "feat_extract_activation", ("gelu",), "gelu")
    _require(hf, "add_adapter", (False,), False)
    _require(hf, "do_stable_layer_norm", (False,), False)
    _require(hf, "feat_extract_norm", ("layer",), "layer")
    if float(hf["layer_norm_eps"]) != HF_AUDIO_CONV_EPS:
        raise ConfigError(f"cannot import HF config: layer_norm_eps={hf['layer_norm_eps']}: our "
                          "speech front-end has one epsilon for the conv and feature-projection "
                          f"LayerNorms, HF fixes the conv one at {HF_AUDIO_CONV_EPS}")
    dims, kernels, strides = hf["conv_dim"], hf["conv_kernel"], hf["conv_stride"]
    if not len(dims) == len(kernels) == len(strides):
        raise ConfigError("cannot import HF config: conv_dim, conv_kernel and conv_stride "
                          "differ in length")
    kernel, depth = int(hf["conv_pos_kernel_size"]), int(hf["num_conv_pos_embeddings"])
    if kernel < 3:
        raise ConfigError(f"cannot import HF config: conv_pos_kernel_size={kernel} < 3")
    fe.update(conv_spec="[" + ", ".join(f"({c},{k},{s})" for c, k, s in
                                        zip(dims, kernels, strides, strict=True)) + "]",
              extractor_mode="layer_norm", conv_bias=bool(hf.get("conv_bias", False)),
              pos_conv_depth=depth, pos_conv_width=kernel * depth,
              pos_conv_groups=int(hf["num_conv_pos_embedding_groups"]),
              layer_norm_eps=float(hf["layer_norm_eps"]), pos_conv_padding="input")
    enc.update(layer_norm_first=False, input_norm=True, final_norm=False, qkv_bias="all",
               dropout=float(hf.get("hidden_dropout", 0.1)),
               attention_dropout=float(hf.get("attention_dropout", 0.1)),
               activation_dropout=float(hf.get("activation_dropout", 0.0)),
               layerdrop=float(hf.get("layerdrop", 0.0)))
    if float(hf.get("feat_proj_dropout", 0.0)) > 0:
        notes.append(f"feat_proj_dropout={hf['feat_proj_dropout']} (training only) not kept: "
                     "our encoder input dropout is model.encoder.dropout")


def _text_from_hf(hf: dict[str, Any], enc: dict, fe: dict, notes: list[str]) -> None:
    _require(hf, "position_embedding_type", ("absolute",), "absolute")
    _require(hf, "is_decoder", (False,), False)
    _require(hf, "type_vocab_size", (1,), 1)
    pad = int(hf["pad_token_id"])
    max_positions = int(hf["max_position_embeddings"]) - pad - 1
    if max_positions < 1:
        raise ConfigError(f"cannot import HF config: max_position_embeddings="
                          f"{hf['max_position_embeddings']} leaves no position after "
                          f"pad_token_id={pad} + 1")
    fe.update(vocab_size=int(hf["vocab_size"]), max_positions=max_positions, pad_index=pad,
              layer_norm_eps=float(hf["layer_norm_eps"]))
    enc.update(layer_norm_first=False, input_norm=False, final_norm=False, qkv_bias="all",
               dropout=float(hf.get("hidden_dropout_prob", 0.1)),
               attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)))


def _image_from_hf(hf: dict[str, Any], enc: dict, fe: dict, notes: list[str]) -> None:
    per_layer = bool(hf.get("use_relative_position_bias", False))
    shared = bool(hf.get("use_shared_relative_position_bias", False))
    if per_layer and shared:
        raise ConfigError("cannot import HF config: use_relative_position_bias and "
                          "use_shared_relative_position_bias are both true; our encoder has one "
                          "or the other (model.encoder.relative_position_bias)")
    fe.update(image_size=_square(hf.get("image_size", 224), "image_size"),
              patch_size=_square(hf.get("patch_size", 16), "patch_size"),
              in_channels=int(hf.get("num_channels", 3)), cls_token=True, mask_token=True,
              positions="learned" if hf.get("use_absolute_position_embeddings") else "none")
    enc.update(layer_norm_first=True, input_norm=False, qkv_bias="qv",
               final_norm=not hf.get("use_mean_pooling", True),
               relative_position_bias="per_block" if per_layer else
               ("shared" if shared else "none"),
               layer_scale_init=float(hf.get("layer_scale_init_value", 0.1)),
               drop_path=float(hf.get("drop_path_rate", 0.0)),
               dropout=float(hf.get("hidden_dropout_prob", 0.0)),
               attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.0)))
    if not hf.get("use_mask_token", False):
        notes.append("the HF model has no mask_token: ours keeps its initial one (zeros)")


# ------------------------------------------------------------------------------ conversions


def to_hf_state_dict(cfg: Config, model: Data2Vec) -> dict[str, Tensor]:
    """HF base-model tensors from our student (checked: every table entry present)."""
    ours = model.state_dict()
    out: dict[str, Tensor] = {}
    for entry in key_table(cfg):
        if entry.ours not in ours:
            raise CheckpointError(f"our model has no tensor '{entry.ours}'")
        value = ours[entry.ours]
        if entry.ours == "frontend.token_type":
            out[entry.hf[0]] = value.reshape(1, -1).clone()
            continue
        parts = value.chunk(len(entry.hf), dim=0)
        for name, part in zip(entry.hf, parts, strict=True):
            out[name] = part.clone()
    return out


def from_hf_state_dict(cfg: Config, hf_sd: dict[str, Tensor], model: Data2Vec,
                       source: str, notes: list[str]) -> dict[str, Tensor]:
    """Our student tensors (front-end + encoder) from HF base-model tensors, shapes checked;
    leftover HF keys are an error unless they belong to a known head (then listed in notes)."""
    hf_sd = {_strip_base_prefix(k): v for k, v in hf_sd.items()}
    target = model.state_dict()
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    optional = {"frontend.mask_token", "frontend.mask_emb"}  # HF drops them when unused
    for entry in key_table(cfg):
        if not all(h in hf_sd for h in entry.hf):
            if entry.ours in optional:
                notes.append(f"{entry.hf[0]} absent in {source}: our {entry.ours} keeps its init")
                continue
            missing = [h for h in entry.hf if h not in hf_sd]
            raise CheckpointError(f"{source}: missing HF tensor(s) {missing} (for our "
                                  f"'{entry.ours}')")
        value = torch.cat([hf_sd[h].reshape(-1, *hf_sd[h].shape[1:]) for h in entry.hf], dim=0)
        if value.numel() != target[entry.ours].numel():
            raise CheckpointError(f"{source}: {list(entry.hf)} have shape "
                                  f"{tuple(value.shape)}; our '{entry.ours}' is "
                                  f"{tuple(target[entry.ours].shape)}")
        out[entry.ours] = value.reshape(target[entry.ours].shape).to(target[entry.ours].dtype)
        used.update(entry.hf)
    leftovers = sorted(set(hf_sd) - used)
    heads = [k for k in leftovers if _is_head_key(k)]
    unknown = [k for k in leftovers if k not in heads]
    if unknown:
        raise CheckpointError(f"{source}: HF tensors with no place in our model: {unknown}")
    if heads:
        notes.append(f"not imported (HF pooler, task head or index buffer, outside the base "
                     f"model): {heads}")
    return out


def _strip_base_prefix(key: str) -> str:
    for prefix in BASE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _is_head_key(key: str) -> bool:
    heads = ("pooler.", "lm_head.", "classifier.", "projector.", "tdnn.",
             "feature_extractor_xvector", "objective.", "layer_weights", "decode_head.",
             "auxiliary_head.", "fpn", "qa_outputs.")
    return key.startswith(heads) or key.endswith("relative_position_index")


def assemble(cfg: Config, student: dict[str, Tensor], notes: list[str],
             source: str) -> Data2Vec:
    """Our full model from student front-end + encoder tensors: fresh head, teacher = student."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a reproducible head init that leaves the caller's RNG alone
        model = build_model(cfg)
    sd = model.state_dict()
    keep = {k for k in sd if not k.startswith(("teacher.", "head."))}
    expected = {k: sd[k] for k in keep if k in student or not _optional(k)}
    check_keys({k: v for k, v in student.items()}, expected, source)
    sd.update(student)
    model.load_state_dict(sd)
    model.reset_teacher()
    notes.append("regression head freshly initialised and EMA teacher = copy of the student "
                 "(neither exists in a HF base model)")
    return model.eval()


def _optional(key: str) -> bool:
    return key in ("frontend.mask_token", "frontend.mask_emb")


# ----------------------------------------------------------------------------- the commands


def _transformers():
    """The transformers module, imported lazily (an optional extra)."""
    try:
        import transformers
    except ModuleNotFoundError:
        raise ConfigError("HuggingFace interop needs transformers: pip install "
                          "'data2vec[hf]'") from None
    return transformers


def _hf_model_class(modality: str):
    transformers = _transformers()
    return getattr(transformers, HF_CLASSES[modality]), getattr(
        transformers, HF_CLASSES[modality].replace("Model", "Config"))


def build_hf_model(cfg: Config, model: Data2Vec):
    """A transformers base model carrying our student's weights (eval mode)."""
    cls, config_cls = _hf_model_class(cfg.modality)
    config = config_cls(**hf_config_dict(cfg))
    kwargs = {"add_pooling_layer": False} if cfg.modality == "text" else {}
    hf = cls(config, **kwargs)
    sd = to_hf_state_dict(cfg, model)
    own = hf.state_dict()
    check_keys(sd, own, f"HF {cls.__name__}")
    hf.load_state_dict(sd)
    return hf.eval()


# Fine-tuned checkpoints (``data2vec finetune``): our task -> the HF task class and its prefix.
TASK_CLASSES = {"asr": "Data2VecAudioForCTC",
                "audio-cls": "Data2VecAudioForSequenceClassification",
                "text-cls": "Data2VecTextForSequenceClassification",
                "image-cls": "Data2VecVisionForImageClassification"}
BASE_PREFIX = {"speech": "data2vec_audio.", "text": "data2vec_text.", "image": "data2vec_vision."}


def _task_config(cfg: Config, task: str, ft: dict[str, Any], labels: dict[str, Any],
                 num_outputs: int) -> dict[str, Any]:
    """Extra HF config entries of the task head; ConfigError where HF has no equivalent."""
    enc = cfg.model.encoder
    if task == "asr":  # HF uses pad_token_id as the CTC blank; ours is id 0
        return {"vocab_size": num_outputs, "pad_token_id": 0, "final_dropout": ft.get("dropout",
                                                                                     0.0)}
    classes = list(labels.get("classes", []))
    extra: dict[str, Any] = {"num_labels": num_outputs}
    if classes:
        extra["id2label"] = {i: str(c) for i, c in enumerate(classes)}
        extra["label2id"] = {str(c): i for i, c in enumerate(classes)}
    if task == "text-cls":
        extra["problem_type"] = "regression" if num_outputs == 1 and not classes else \
            "single_label_classification"
        extra["classifier_dropout"] = ft.get("dropout", 0.0)
    elif task == "audio-cls":
        extra.update(classifier_proj_size=enc.dim, use_weighted_layer_sum=False,
                     problem_type="multi_label_classification")
    elif task == "image-cls" and ft.get("pooling", "mean") != "mean":
        raise _refuse(f"pooling={ft.get('pooling')} with the image-cls head",
                      "HF Data2VecVisionForImageClassification mean-pools the patch tokens")
    elif task == "image-cls" and enc.final_norm:
        raise _refuse("an image-cls head fine-tuned after the encoder's final LayerNorm "
                      "(a run from before mean pooling skipped it, as BEiT does)",
                      "HF Data2VecVisionForImageClassification mean-pools the last block's "
                      "output without a final LayerNorm; LayerNorm(mean(LayerNorm(x))) has no "
                      "exact equivalent there: fine-tune again to export")
    return extra


def _task_tensors(task: str, model: Any) -> dict[str, Tensor]:
    """HF head tensors from our FineTuneModel head (see data2vec.finetune.models.make_head)."""
    head = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
    if task == "asr":  # Dropout -> Linear(D, V)
        return {"lm_head.weight": head["1.weight"], "lm_head.bias": head["1.bias"]}
    if task == "text-cls":  # Dropout -> dense -> tanh -> Dropout -> out_proj (RoBERTa head)
        return {"classifier.dense.weight": head["1.weight"],
                "classifier.dense.bias": head["1.bias"],
                "classifier.out_proj.weight": head["4.weight"],
                "classifier.out_proj.bias": head["4.bias"]}
    if task == "audio-cls":  # HF: projector, mean pool, classifier; identity projector = ours
        dim = head["1.weight"].shape[1]
        return {"projector.weight": torch.eye(dim), "projector.bias": torch.zeros(dim),
                "classifier.weight": head["1.weight"], "classifier.bias": head["1.bias"]}
    return {"data2vec_vision.pooler.layernorm.weight": head["0.weight"],  # image-cls: fc_norm
            "data2vec_vision.pooler.layernorm.bias": head["0.bias"],
            "classifier.weight": head["1.weight"], "classifier.bias": head["1.bias"]}


def build_hf_task_model(cfg: Config, model: Any, ft: dict[str, Any], labels: dict[str, Any]):
    """The HF task model (…ForCTC / …ForSequenceClassification / …ForImageClassification)
    carrying a fine-tuned model's encoder and head (eval mode)."""
    task = ft["task"]
    if task == "image-cls" and not getattr(model, "use_final_norm", True):
        # The encoder's final norm is unused by this head (BEiT mean pooling): HF's
        # use_mean_pooling model has none, and the pooler LayerNorm is our fc_norm.
        cfg = replace(cfg, model=replace(cfg.model, encoder=replace(cfg.model.encoder,
                                                                    final_norm=False)))
    _, config_cls = _hf_model_class(cfg.modality)
    cls = getattr(_transformers(), TASK_CLASSES[task])
    num_outputs = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1] \
        .out_features
    config = config_cls(**hf_config_dict(cfg), **_task_config(cfg, task, ft, labels,
                                                              num_outputs))
    hf = cls(config)
    prefix = BASE_PREFIX[cfg.modality]
    sd = {prefix + k: v for k, v in to_hf_state_dict(cfg, model).items()}
    sd.update(_task_tensors(task, model))
    check_keys(sd, hf.state_dict(), f"HF {cls.__name__}")
    hf.load_state_dict(sd)
    return hf.eval()


def export_hf(path: str | Path, out_dir: str | Path, modality: str | None = None,
              remote_code: bool = False) -> Path:
    """Write the model at `path` (anything :func:`data2vec.load` reads) as a HF directory.

    A pre-trained model becomes the base model, a fine-tuned one (``data2vec finetune`` or an
    imported task model) the matching task model; beside the weights go the files HF's Auto*
    classes and pipelines read (:mod:`.hf_processors`: tokenizer, feature extractor, CTC
    processor with ``vocab.json`` (blank = id 0), image processor). Files honour the umask.
    data2vec 2.0 models get their own model code in the directory (:mod:`.hf_v2`); so does a
    data2vec 1.0 model with `remote_code` (e.g. a post-LN image encoder, which HF's
    Data2VecVision cannot express). `modality`: which modality of a joint multi-modal run.
    """
    from data2vec.loading import load

    loaded = load(path, modality=modality)
    out_dir = Path(out_dir)
    if loaded.version == 2 or remote_code:  # no transformers class (that fits): ship our code
        from data2vec.interop.hf_v2 import export_loaded_v2

        export_loaded_v2(loaded, out_dir)
    else:
        try:
            if loaded.task is not None:
                hf = build_hf_task_model(loaded.cfg, loaded.network, to_dict(loaded.finetune),
                                         raw_labels(loaded.labels))
            else:
                hf = build_hf_model(loaded.cfg, loaded.network)
        except ConfigError as refused:
            raise ConfigError(f"{refused} (--remote-code exports it with our model code "
                              "instead)") from None
        out_dir.mkdir(parents=True, exist_ok=True)
        # What save_pretrained writes for these untied models, without its progress bar.
        hf.config.architectures = [type(hf).__name__]
        hf.config.save_pretrained(out_dir)
        weights = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
        save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    write_preprocessing(out_dir, loaded)  # tokenizer / feature extractor / processor files
    honour_umask(out_dir / "model.safetensors")  # safetensors writes 0600
    return out_dir


def raw_labels(labels: dict[str, Any]) -> dict[str, Any]:
    """A loaded model's labels as checkpoints store them (CTC symbols or class names)."""
    if "vocab" in labels:
        return {"vocab": list(labels["vocab"].symbols)}
    return {"classes": list(labels.get("classes") or [])}


def resolve_hf_dir(name: str | Path) -> Path:
    """A local directory, or a hub id found in the local HF cache (never downloads)."""
    path = Path(name)
    if path.is_dir():
        return path
    if path.exists() or str(name).count("/") != 1:
        raise CheckpointError(f"{name}: not a HuggingFace model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, or huggingface_hub missing
        raise CheckpointError(f"{name}: not a local directory and not in the local HF cache "
                              f"(import works offline: download it first) [{type(e).__name__}]"
                              ) from None


def read_hf_weights(directory: Path) -> dict[str, Tensor]:
    """model.safetensors (sharded or not), else pytorch_model.bin through the safe unpickler."""
    single = directory / "model.safetensors"
    shards = sorted(directory.glob("model-*-of-*.safetensors"))
    files = [single] if single.is_file() else shards
    if files:
        sd: dict[str, Tensor] = {}
        for f in files:
            try:
                sd.update(load_file(f))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot read {f}: {e}") from None
        return sd
    legacy = directory / "pytorch_model.bin"
    if legacy.is_file():
        return dict(load_checkpoint_file(legacy))
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin")


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        data = json.loads(read_text(path, CheckpointError, "JSON config"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object (a HuggingFace config), got "
                              f"{type(data).__name__}")
    return data


@contextlib.contextmanager
def _config_errors(directory: Path) -> Iterator[None]:
    """A key missing from config.json, or a value of the wrong type or form, becomes one line
    naming the file and the key (HF configs are read as plain dicts)."""
    path = directory / "config.json"
    try:
        yield
    except KeyError as e:
        raise ConfigError(f"{path}: missing key {e.args[0]!r}, which a HuggingFace data2vec "
                          "config has") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: a value has the wrong type or form ({e})") from None
    except ConfigError as e:
        message = str(e)
        raise ConfigError(message if str(path) in message else f"{path}: {message}") from None


def model_from_hf_dir(directory: Path) -> tuple[Config, Data2Vec, ImportReport]:
    """Our model built from a local HF data2vec directory."""
    hf_cfg = _read_config(directory)
    report = ImportReport(source=f"HF {directory}")
    with _config_errors(directory):
        cfg = config_from_hf(hf_cfg, report.notes)
    probe = build_model(cfg)
    student = from_hf_state_dict(cfg, read_hf_weights(directory), probe, str(directory),
                                 report.notes)
    return cfg, assemble(cfg, student, report.notes, str(directory)), report


def task_model_from_hf_dir(directory: Path, source: str | None = None):
    """(config, network, FinetuneConfig or None, labels, report) of a local HF data2vec
    directory: a base model gives our ``Data2Vec``, a task model (see :mod:`.hf_tasks`) a
    ``FineTuneModel`` with its settings and labels."""
    hf_cfg = _read_config(directory)
    with _config_errors(directory):
        task = detect_task(hf_cfg)
    if task is None:
        cfg, model, report = model_from_hf_dir(directory)
        report.source = f"HF {source or directory}"
        return cfg, model, None, {}, report
    report = ImportReport(source=f"HF {source or directory}")
    with _config_errors(directory):
        cfg = config_from_hf(hf_cfg, report.notes)
    weights = read_hf_weights(directory)
    head = split_head(task, weights)
    student = from_hf_state_dict(cfg, weights, build_model(cfg), str(directory), report.notes)
    with _config_errors(directory):
        ours, labels = head_from_hf(task, head, hf_cfg, directory, report.notes)
    model, ft = build_task_network(task, cfg, student, ours, labels, hf_cfg, directory,
                                   report.source)
    return cfg, model, ft, labels, report


def import_hf(name: str | Path, out: str | Path) -> tuple[Path, ImportReport]:
    """Import a HF data2vec directory (or cached hub id) as the run directory `out`: a
    pre-trained run for a base model, a fine-tuned one for a task model (see :mod:`.hf_tasks`);
    returns the checkpoint written."""
    directory = resolve_hf_dir(name)
    cfg, model, ft, labels, report = task_model_from_hf_dir(directory, str(name))
    if ft is None:
        return write_run(out, cfg, model, report, tokenizer_from=directory), report
    return write_task_run(Path(out), model, cfg, ft, labels, directory, report), report


__all__ = ["Entry", "build_hf_model", "build_hf_task_model", "config_from_hf", "export_hf",
           "from_hf_state_dict", "hf_config_dict", "import_hf", "key_table", "model_from_hf_dir",
           "raw_labels", "read_hf_weights", "resolve_hf_dir", "task_model_from_hf_dir",
           "to_hf_state_dict"]
