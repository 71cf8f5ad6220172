"""Import released data2vec 2.0 (fairseq ``data2vec_multi``) checkpoints: speech, images, text.

A ``data2vec_multi`` state dict has one modality encoder under ``modality_encoders.{AUDIO,IMAGE,
TEXT}.`` (local encoder, positions, ``context_encoder`` = input LayerNorm + prenet blocks,
``decoder``), the main ``blocks.N.`` and the EMA teacher under ``_ema``. What the teacher holds
follows the released cfg: speech (``ema_local_encoder: false``) the positional conv, ALiBi scales,
context encoder and blocks; images (``ema_local_encoder: true``) the whole encoder; text
(``ema_encoder_only: true``) the blocks only, keyed ``N.norm1.weight``. Fine-tuned models keep
the student under ``w2v_encoder.w2v_model.`` (speech) or ``encoder.`` / ``model.`` and have no
decoder or teacher.

Key names and shapes: the oracle kit's ``*.keys.txt`` (fairseq's own ``Trainer.save_checkpoint``
at commit 3d262bb2) and ``../shared/design/original-implementation.md`` §4. Every tensor is mapped,
checked against what we compute (the frozen image sin-cos table) or listed in the report with the
reason it is not needed; anything else is an error naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data2vec.config import Config, config_from_dict, load_config, to_dict
from data2vec.errors import CheckpointError, ConfigError
from data2vec.interop.common import (
    ImportReport,
    fail_on_leftovers,
    take,
    take_conv_feature_encoder,
    take_linear,
)
from data2vec.modalities.image import sincos_2d
from data2vec.modalities.speech import parse_conv_spec

MODALITY = {"AUDIO": "speech", "IMAGE": "image", "TEXT": "text"}
WRAPPERS = ("w2v_encoder.w2v_model.", "encoder.", "model.")
"""Prefixes fine-tuning puts in front of the pre-trained data2vec_multi model."""


def _block(sd: dict[str, Tensor], src: str, dst: str, source: str) -> dict[str, Tensor]:
    """A data2vec_multi AltBlock has our Block's layout and names (fused qkv, norm1/2, mlp)."""
    out: dict[str, Tensor] = {}
    for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
        take_linear(sd, f"{src}.{name}", out, f"{dst}.{name}", source)
    return out


def _count(sd: dict[str, Any], prefix: str) -> int:
    """Number of consecutive indices N with keys `prefix`N.* present."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in sd):
        n += 1
    return n


def find_modality(sd: dict[str, Any], source: str) -> str:
    """'AUDIO', 'IMAGE' or 'TEXT': the one modality encoder in a data2vec_multi state dict."""
    found = sorted({k.split(".")[1] for k in sd if k.startswith("modality_encoders.")})
    if len(found) != 1 or found[0] not in MODALITY:
        raise CheckpointError(f"{source}: expected one modality encoder of "
                              f"{sorted(MODALITY)}, found {found} (multi-modality checkpoints "
                              "are not supported)")
    return found[0]


def unwrap(sd: dict[str, Tensor], report: ImportReport) -> dict[str, Tensor]:
    """The pre-trained model's keys of a fine-tuned checkpoint; task heads are reported."""
    if "blocks.0.attn.qkv.weight" in sd:
        return sd
    for prefix in WRAPPERS:
        if f"{prefix}blocks.0.attn.qkv.weight" in sd:
            inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            rest = sorted(k for k in sd if not k.startswith(prefix))
            if rest:
                report.notes.append(f"not imported (fine-tuning head, outside the pre-trained "
                                    f"model): {rest}")
            return inner
    raise CheckpointError("data2vec_multi checkpoint without blocks.0.attn.qkv.weight under any "
                          f"of the prefixes '', {', '.join(map(repr, WRAPPERS))}")


# ------------------------------------------------------------------------------ config


def _refuse(value: Any, allowed: tuple[Any, ...], key: str, source: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{source}: cfg model.{key}={value!r} has no equivalent here "
                          f"(supported: {', '.join(map(repr, allowed))})")


def _check_supported(model: dict[str, Any], mod: dict[str, Any], name: str, source: str) -> None:
    """Options that change the forward pass and that we do not implement are refused by name."""
    dec = mod.get("decoder") or {}
    checks = [
        (model.get("norm_affine", True), (True,), "norm_affine"),
        (model.get("recon_loss", 0.0), (0.0, 0), "recon_loss"),
        (model.get("d2v_loss", 1.0), (1.0, 1), "d2v_loss"),
        (model.get("shared_decoder"), (None,), "shared_decoder"),
        (model.get("decoder_group", False), (False,), "decoder_group"),
        (model.get("batch_norm_target_layer", False), (False,), "batch_norm_target_layer"),
        (mod.get("learned_alibi", False), (False,), f"modalities.{name}.learned_alibi"),
        (mod.get("learned_alibi_scale_per_layer", False), (False,),
         f"modalities.{name}.learned_alibi_scale_per_layer"),
        (dec.get("add_positions_masked", False), (False,),
         f"modalities.{name}.decoder.add_positions_masked"),
        (dec.get("add_positions_all", False), (False,),
         f"modalities.{name}.decoder.add_positions_all"),
        (mod.get("transformer_decoder", False), (False,),
         f"modalities.{name}.transformer_decoder"),
        (mod.get("num_extra_tokens", 0), (0, 1), f"modalities.{name}.num_extra_tokens"),
    ]
    if mod.get("use_alibi_encoder"):
        checks.append((mod.get("learned_alibi_scale_per_head", False), (True,),
                       f"modalities.{name}.learned_alibi_scale_per_head"))
    if dec.get("projection_layers", 1) == 2:
        checks.append((float(dec.get("projection_ratio", 2.0)), (2.0,),
                       f"modalities.{name}.decoder.projection_ratio"))
    for value, allowed, key in checks:
        _refuse(value, allowed, key, source)


def _objective(data: dict[str, Any], model: dict[str, Any], main_depth: int) -> None:
    obj = data["model"]["objective"]
    obj["top_k"] = min(int(model.get("average_top_k_layers", obj["top_k"])), main_depth)
    obj["layer_norm"] = ("instance" if model.get("instance_norm_target_layer") else
                         "layer" if model.get("layer_norm_target_layer") else "none")
    obj["final_norm"] = ("layer" if model.get("layer_norm_targets") else
                         "instance" if model.get("instance_norm_targets") else "none")
    obj["target_source"] = "block" if model.get("end_of_block_targets") else "ffn"
    obj["loss_beta"] = float(model.get("loss_beta", obj["loss_beta"]))
    scale = model.get("loss_scale", obj["loss_scale"])
    obj["loss_scale"] = None if scale is None else float(scale)
    for ours, theirs in (("ema_start", "ema_decay"), ("ema_end", "ema_end_decay"),
                         ("ema_anneal_steps", "ema_anneal_end_step")):
        if model.get(theirs) is not None:
            obj[ours] = type(obj[ours])(model[theirs])


def _scope(model: dict[str, Any], mod: dict[str, Any]) -> str:
    if model.get("ema_encoder_only"):
        return "encoder"
    return "all" if mod.get("ema_local_encoder") else "context"


def v2_config(sd: dict[str, Tensor], cfg_dict: dict[str, Any], modality: str,
              source: str) -> Config:
    """Our Config for a data2vec_multi checkpoint: its cfg, checked against the tensor shapes."""
    model = cfg_dict.get("model") or {}
    if isinstance(model.get("w2v_args"), dict):  # fine-tuned: the pre-training cfg inside
        model = model["w2v_args"].get("model") or model
    name = modality.lower()
    mod = (model.get("modalities") or {}).get(name)
    if not isinstance(mod, dict) or not model.get("num_heads"):
        raise ConfigError(f"{source}: cfg has no model.modalities.{name} / model.num_heads; "
                          "cannot rebuild a data2vec_multi model without its saved cfg")
    _check_supported(model, mod, name, source)
    ours = MODALITY[modality]
    data = to_dict(load_config(ours, "base", version=2))
    p = f"modality_encoders.{modality}."
    prenet = _count(sd, f"{p}context_encoder.blocks.")
    main = _count(sd, "blocks.")
    layer_norm_first = bool(model.get("layer_norm_first", False))
    has_context_norm = f"{p}context_encoder.norm.weight" in sd
    if layer_norm_first and (prenet or has_context_norm):
        raise ConfigError(f"{source}: cfg model.layer_norm_first=true with a context encoder "
                          "(prenet blocks / its LayerNorm) has no equivalent here")
    dim = sd["blocks.0.attn.proj.weight"].shape[0]
    data["model"]["encoder"].update(
        depth=prenet + main, dim=dim, num_heads=int(model["num_heads"]),
        ffn_dim=sd["blocks.0.mlp.fc1.weight"].shape[0], norm_eps=float(model.get("norm_eps", 1e-5)),
        layer_norm_first=layer_norm_first, input_norm=has_context_norm,
        final_norm="norm.weight" in sd, qkv_bias="all", relative_position_bias="none",
        layer_scale_init=0.0, dropout=float(model.get("encoder_dropout", 0.0)),
        attention_dropout=float(model.get("attention_dropout", 0.0)),
        activation_dropout=float(model.get("activation_dropout", 0.0)),
        layerdrop=float(model.get("layerdrop", 0.0)),
        drop_path=float(model.get("end_drop_path_rate", 0.0)))
    _objective(data, model, main)
    data["model"]["objective"]["ema_scope"] = _scope(model, mod)
    dec = mod.get("decoder") or {}
    decoder_layers = _count(sd, f"{p}decoder.blocks.")
    first = sd.get(f"{p}decoder.blocks.0.0.weight")
    data["model"]["v2"].update(
        clone_batch=int(model.get("clone_batch", 1)),
        mask_noise_std=float(mod.get("mask_noise_std", 0.01)),
        decoder_dim=int(dec.get("decoder_dim", 384)),
        decoder_layers=decoder_layers or int(dec.get("decoder_layers", 4)),
        decoder_kernel=int(first.shape[-1]) if first is not None else
        int(dec.get("decoder_kernel", 7)),
        decoder_groups=int(dec.get("decoder_groups", 16)),
        decoder_residual=bool(dec.get("decoder_residual", True)),
        decoder_projection_layers=int(dec.get("projection_layers", 1)),
        decoder_input_dropout=float(dec.get("input_dropout", 0.0)),
        prenet_depth=prenet, cls_loss=float(model.get("cls_loss", 0.0)),
        alibi=bool(mod.get("use_alibi_encoder", False)),
        mask_prob=float(mod.get("mask_prob", 0.5)), mask_length=int(mod.get("mask_length", 1)),
        mask_prob_adjust=float(mod.get("mask_prob_adjust", 0.0)),
        inverse_mask=bool(mod.get("inverse_mask", False)))
    _frontend(data, sd, mod, modality, source)
    data["preset"] = f"imported from fairseq {Path(source).name}"
    return config_from_dict(data)


def _frontend(data: dict[str, Any], sd: dict[str, Tensor], mod: dict[str, Any], modality: str,
              source: str) -> None:
    fe = data["model"]["frontend"]
    p = f"modality_encoders.{modality}."
    if modality == "AUDIO":
        spec = mod.get("feature_encoder_spec", fe["conv_spec"])
        for i, (dim, kernel, _) in enumerate(parse_conv_spec(spec)):
            w = sd.get(f"{p}local_encoder.conv_layers.{i}.0.weight")
            if w is None or tuple(w.shape[::2]) != (dim, kernel):
                raise CheckpointError(f"{source}: feature_encoder_spec {spec!r} does not match "
                                      f"{p}local_encoder.conv_layers.{i}.0.weight "
                                      f"{None if w is None else tuple(w.shape)}")
        mode = mod.get("extractor_mode", "layer_norm")
        _refuse(mode, ("layer_norm", "default"), "modalities.audio.extractor_mode", source)
        _refuse(bool(mod.get("conv_pos_pre_ln", False)), (False,),
                "modalities.audio.conv_pos_pre_ln", source)
        # Sequential(transpose, conv layer 1..depth, transpose): conv layers sit at 1..depth
        depth = sum(1 for k in sd if k.startswith(f"{p}relative_positional_encoder.")
                    and k.endswith(".0.weight"))
        if depth == 0:
            raise CheckpointError(f"{source}: no {p}relative_positional_encoder.N.0.weight")
        pos_w = sd[f"{p}relative_positional_encoder.1.0.weight"]  # (D, D / groups, k)
        width = int(mod.get("conv_pos_width", pos_w.shape[-1] * depth))
        if max(3, width // depth) != pos_w.shape[-1]:
            raise CheckpointError(f"{source}: conv_pos_width {width} / depth {depth} does not "
                                  f"give the stored kernel {pos_w.shape[-1]}")
        fe.update(conv_spec=spec,
                  extractor_mode="layer_norm" if mode == "layer_norm" else "group_norm",
                  conv_bias=f"{p}local_encoder.conv_layers.0.0.bias" in sd,
                  pos_conv_depth=depth, pos_conv_width=width,
                  pos_conv_groups=pos_w.shape[0] // pos_w.shape[1], layer_norm_eps=1e-5,
                  pos_conv_padding="none")
    elif modality == "IMAGE":
        patch = sd[f"{p}local_encoder.proj.weight"]  # (D, C, p, p)
        if not mod.get("fixed_positions", True):
            raise ConfigError(f"{source}: cfg model.modalities.image.fixed_positions=false "
                              "(learned positions over the patches only) is not supported")
        fe.update(image_size=int(mod.get("input_size", 224)), patch_size=patch.shape[-1],
                  in_channels=patch.shape[1], positions="sincos",
                  cls_token=int(mod.get("num_extra_tokens", 1)) == 1, mask_token=False)
    else:
        tokens = sd[f"{p}local_encoder.embed_tokens.weight"]
        positions = sd.get(f"{p}local_encoder.embed_positions.weight")
        if positions is None or not mod.get("layernorm_embedding", True):
            raise ConfigError(f"{source}: text models without learned positions or "
                              "layernorm_embedding are not supported")
        _refuse(bool(mod.get("no_scale_embedding", True)), (True,),
                "modalities.text.no_scale_embedding", source)
        pad = 1  # fairseq Dictionary: <s> 0, <pad> 1, </s> 2, <unk> 3
        fe.update(vocab_size=tokens.shape[0], max_positions=positions.shape[0] - pad - 1,
                  pad_index=pad, layer_norm_eps=1e-5)


# ----------------------------------------------------------------------------- tensors


def _encoder(sd: dict[str, Tensor], p: str, blocks: str, dst: str, cfg: Config,
             source: str) -> dict[str, Tensor]:
    """Context encoder (input norm + prenet blocks) and main blocks -> our encoder at `dst`."""
    out: dict[str, Tensor] = {}
    prenet = cfg.model.v2.prenet_depth
    if cfg.model.encoder.input_norm:
        take_linear(sd, f"{p}context_encoder.norm", out, f"{dst}input_norm", source)
    for i in range(prenet):
        out.update(_block(sd, f"{p}context_encoder.blocks.{i}", f"{dst}blocks.{i}", source))
    for i in range(cfg.model.encoder.depth - prenet):
        out.update(_block(sd, f"{blocks}{i}", f"{dst}blocks.{prenet + i}", source))
    if cfg.model.encoder.final_norm:
        take_linear(sd, f"{blocks}norm" if blocks else "norm", out, f"{dst}final_norm", source)
    return out


def _speech_local(sd: dict[str, Tensor], p: str, cfg: Config, source: str) -> dict[str, Tensor]:
    fe = cfg.model.frontend
    out: dict[str, Tensor] = {}
    take_conv_feature_encoder(sd, f"{p}local_encoder", out, fe, source)
    take_linear(sd, f"{p}project_features.1", out, "frontend.feature_norm", source)
    take_linear(sd, f"{p}project_features.2", out, "frontend.feature_proj", source)
    return out


def _speech_context(sd: dict[str, Tensor], p: str, dst: str, cfg: Config,
                    source: str) -> dict[str, Tensor]:
    """Positional conv and ALiBi scales: the student's and the 'context' teacher's parts."""
    out: dict[str, Tensor] = {}
    for i in range(cfg.model.frontend.pos_conv_depth):
        take_linear(sd, f"{p}relative_positional_encoder.{i + 1}.0", out,
                f"{dst}frontend.pos_conv.layers.{i}.conv", source)
    if cfg.model.v2.alibi:
        scale = take(sd, f"{p}alibi_scale", source)  # (1, 1, H, 1, 1): one scale per head
        out[f"{dst}alibi.alibi_scale"] = scale.reshape(-1)
    return out


def _image_local(sd: dict[str, Tensor], p: str, dst: str, cfg: Config,
                 source: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    take_linear(sd, f"{p}local_encoder.proj", out, f"{dst}frontend.patch_embed", source)
    if cfg.model.frontend.cls_token:
        out[f"{dst}frontend.cls_token"] = take(sd, f"{p}extra_tokens", source)
    table = take(sd, f"{p}fixed_positional_encoder.positions", source)  # (1, N, D)
    fe = cfg.model.frontend
    grid = fe.image_size // fe.patch_size
    ours = sincos_2d((grid, grid), cfg.model.encoder.dim)
    if table.shape[1:] != ours.shape or (table[0] - ours).abs().max() > 1e-5:
        raise CheckpointError(f"{source}: {p}fixed_positional_encoder.positions "
                              f"{tuple(table.shape)} is not the 2-D sin-cos table we compute")
    return out


def _text_local(sd: dict[str, Tensor], p: str, source: str) -> dict[str, Tensor]:
    out = {"frontend.embed_tokens.weight": take(sd, f"{p}local_encoder.embed_tokens.weight",
                                                source),
           "frontend.embed_positions.weight": take(
               sd, f"{p}local_encoder.embed_positions.weight", source)}
    take_linear(sd, f"{p}local_encoder.layernorm_embedding", out, "frontend.layer_norm", source)
    return out


def _decoder(sd: dict[str, Tensor], p: str, cfg: Config, source: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for i in range(cfg.model.v2.decoder_layers):
        take_linear(sd, f"{p}decoder.blocks.{i}.0", out, f"decoder.layers.{i}.conv", source)
    if cfg.model.v2.decoder_projection_layers == 2:
        take_linear(sd, f"{p}decoder.proj.0", out, "decoder.proj.0", source)
        take_linear(sd, f"{p}decoder.proj.2", out, "decoder.proj.2", source)
    else:
        take_linear(sd, f"{p}decoder.proj", out, "decoder.proj", source)
    return out


def _student(sd: dict[str, Tensor], modality: str, cfg: Config, source: str,
             report: ImportReport) -> dict[str, Tensor]:
    p = f"modality_encoders.{modality}."
    if modality == "AUDIO":
        out = _speech_local(sd, p, cfg, source) | _speech_context(sd, p, "", cfg, source)
        # v2 zeroes masked frames instead of a learned embedding (fine-tuning masks the same way)
        out["frontend.mask_emb"] = torch.zeros(cfg.model.encoder.dim)
        report.notes.append("frontend.mask_emb set to zeros: data2vec 2.0 zeroes masked frames")
    elif modality == "IMAGE":
        out = _image_local(sd, p, "", cfg, source)
    else:
        out = _text_local(sd, p, source)
    out.update(_encoder(sd, p, "blocks.", "encoder.", cfg, source))
    if f"{p}decoder.proj.weight" in sd or f"{p}decoder.proj.0.weight" in sd:
        out.update(_decoder(sd, p, cfg, source))
    return out


def _teacher(ema: dict[str, Tensor], modality: str, cfg: Config, source: str) -> dict[str, Tensor]:
    """The `_ema` entry -> teacher.model.* for the cfg's ema_scope."""
    dst = "teacher.model."
    p = f"modality_encoders.{modality}."
    scope = cfg.model.objective.ema_scope
    if scope == "encoder":  # the blocks only, keyed from 0 (text)
        return _encoder(ema, "", "", f"{dst}encoder.", cfg, source)
    out = _encoder(ema, p, "blocks.", f"{dst}encoder.", cfg, source)
    if modality == "AUDIO":
        out.update(_speech_context(ema, p, dst, cfg, source))
    elif modality == "IMAGE":
        out.update(_image_local(ema, p, dst, cfg, source))
    return out


def import_v2(sd: dict[str, Tensor], cfg_dict: dict[str, Any], source: str,
              report: ImportReport) -> tuple[Config, dict[str, Tensor]]:
    """(config, our state-dict tensors) from a data2vec_multi state dict; consumes `sd`."""
    ema = sd.pop("_ema", None)
    sd = unwrap(sd, report)
    modality = find_modality(sd, source)
    cfg = v2_config(sd, cfg_dict, modality, source)
    out = _student(sd, modality, cfg, source, report)
    fail_on_leftovers(sd, source)
    if isinstance(ema, dict):
        ema = dict(ema)
        out.update(_teacher(ema, modality, cfg, f"{source} _ema"))
        fail_on_leftovers(ema, f"{source} _ema")
        if cfg.model.objective.ema_scope == "context":
            out["teacher.model.frontend.mask_emb"] = torch.zeros(cfg.model.encoder.dim)
    return cfg, out


__all__ = ["find_modality", "import_v2", "unwrap", "v2_config"]
