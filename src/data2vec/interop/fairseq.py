"""Import released data2vec checkpoints: fairseq 1.0 audio / text, BEiT-format vision, and 2.0.

The file is read with :func:`~data2vec.interop.safe_unpickle.load_checkpoint_file`, which never
executes code from it (OmegaConf / argparse objects become inert stand-ins). Supported layouts:

- fairseq ``data2vec_audio`` pre-training (student keys at the top, EMA teacher under ``_ema``)
  and CTC fine-tuned checkpoints (student under ``w2v_encoder.w2v_model.``; the CTC projection
  ``w2v_encoder.proj`` is reported, not imported);
- fairseq ``data2vec_text`` (``encoder.sentence_encoder.*``, ``encoder.regression_head.*``, EMA
  teacher under ``encoder._ema``);
- data2vec_vision (BEiT fork) ``checkpoint-*.pth``: ``model`` (and ``model_ema`` when saved):
  ``cls_token``, ``mask_token``, ``patch_embed.proj``, shared ``rel_pos_bias`` or per-block
  ``attn.relative_position_bias_table``, ``attn.qkv`` + ``q_bias``/``v_bias``, ``gamma_1/2``,
  ``norm``, ``lm_head``;
- fairseq ``data2vec_multi`` (data2vec 2.0, any one modality): see :mod:`.fairseq_v2`.

Every source tensor is either mapped, or listed in the report with the reason it is not needed
(e.g. the teacher's copy of the shared positional conv), or the import fails naming it. The
model config comes from the checkpoint's saved cfg/args plus the tensor shapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data2vec.build import build_model
from data2vec.config import Config, config_from_dict, load_config, to_dict
from data2vec.errors import CheckpointError, ConfigError
from data2vec.interop.common import (
    ImportReport,
    check_keys,
    fail_on_leftovers,
    take,
    take_conv_feature_encoder,
    take_linear,
    write_checkpoint,
)
from data2vec.interop.fairseq_v2 import import_v2
from data2vec.interop.safe_unpickle import load_checkpoint_file, plain
from data2vec.modalities.speech import parse_conv_spec
from data2vec.nn.attention import RelativePositionBias
from data2vec.objective.data2vec import StudentTeacher

CTC_PREFIX = "w2v_encoder.w2v_model."
TEXT_PREFIX = "encoder.sentence_encoder."
BEIT_EPS = 1e-6
FAIRSEQ_EPS = 1e-5

# --------------------------------------------------------------------------- block mapping


def _fairseq_block(sd: dict[str, Tensor], src: str, dst: str, source: str) -> dict[str, Tensor]:
    """fairseq TransformerSentenceEncoderLayer / TransformerEncoderLayer -> our Block.

    ``self_attn_layer_norm`` is the LayerNorm of the attention sub-layer and ``final_layer_norm``
    the one of the FFN sub-layer in both pre- and post-LN layers, as our norm1 / norm2.
    """
    out: dict[str, Tensor] = {}
    for kind in ("weight", "bias"):
        out[f"{dst}.attn.qkv.{kind}"] = torch.cat(
            [take(sd, f"{src}.self_attn.{p}_proj.{kind}", source) for p in ("q", "k", "v")])
    take_linear(sd, f"{src}.self_attn.out_proj", out, f"{dst}.attn.proj", source)
    take_linear(sd, f"{src}.self_attn_layer_norm", out, f"{dst}.norm1", source)
    take_linear(sd, f"{src}.fc1", out, f"{dst}.mlp.fc1", source)
    take_linear(sd, f"{src}.fc2", out, f"{dst}.mlp.fc2", source)
    take_linear(sd, f"{src}.final_layer_norm", out, f"{dst}.norm2", source)
    return out


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    """Number of distinct N in keys matching `pattern` (a regex with one (\\d+) group)."""
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    if found and found != set(range(len(found))):
        raise CheckpointError(f"layer indices {sorted(found)} are not 0..{len(found) - 1}")
    return len(found)


# ----------------------------------------------------------------------------- reading


def read_fairseq(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(state dict, config dict, the rest of the top level) of a fairseq/BEiT checkpoint."""
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    for key in ("model", "module", "state_dict"):
        if key in ckpt and isinstance(ckpt[key], dict):
            sd = dict(ckpt[key])
            break
    else:
        raise CheckpointError(f"{path}: no 'model' state dict (top-level keys {sorted(ckpt)})")
    cfg = plain(ckpt.get("cfg")) or {}
    args = plain(ckpt.get("args"))
    if not cfg and isinstance(args, dict):  # pre-hydra fairseq, and the BEiT fork
        cfg = {"model": args, "args": args}
    return sd, cfg if isinstance(cfg, dict) else {}, ckpt


def _model_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    model = cfg.get("model") or {}
    if isinstance(model, dict) and isinstance(model.get("w2v_args"), dict):
        return model["w2v_args"].get("model") or model  # CTC: the pre-training model cfg
    return model if isinstance(model, dict) else {}


def _lookup(cfg: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    """First present dotted name in `cfg` (fairseq moved fields between versions)."""
    for name in names:
        node: Any = cfg
        for part in name.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            if node is not None:
                return node
    return default


def _require(value: Any, allowed: tuple[Any, ...], key: str, source: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{source}: cfg {key}={value!r} has no equivalent here "
                          f"(supported: {', '.join(map(repr, allowed))})")


def _objective(data: dict[str, Any], mcfg: dict[str, Any]) -> None:
    """Objective settings from a fairseq v1 model cfg (fields absent keep the preset's)."""
    obj = data["model"]["objective"]
    depth = data["model"]["encoder"]["depth"]
    obj["top_k"] = min(int(_lookup(mcfg, "average_top_k_layers", default=obj["top_k"])), depth)
    if _lookup(mcfg, "instance_norm_target_layer"):
        obj["layer_norm"] = "instance"
    elif _lookup(mcfg, "layer_norm_target_layer"):
        obj["layer_norm"] = "layer"
    if _lookup(mcfg, "layer_norm_targets"):
        obj["final_norm"] = "layer"
    elif _lookup(mcfg, "instance_norm_targets"):
        obj["final_norm"] = "instance"
    for ours, theirs in (("loss_beta", "loss_beta"), ("ema_start", "ema_decay"),
                         ("ema_end", "ema_end_decay"), ("ema_anneal_steps", "ema_anneal_end_step")):
        value = _lookup(mcfg, theirs)
        if value is not None:
            obj[ours] = type(obj[ours])(value)
    if "loss_scale" in mcfg:
        obj["loss_scale"] = None if mcfg["loss_scale"] is None else float(mcfg["loss_scale"])


# -------------------------------------------------------------------------------- audio


def _audio_config(sd: dict[str, Tensor], mcfg: dict[str, Any], source: str) -> Config:
    data = to_dict(load_config("speech", "base"))
    enc, fe = data["model"]["encoder"], data["model"]["frontend"]
    _require(_lookup(mcfg, "activation_fn", default="gelu"), ("gelu",), "activation_fn", source)
    mode = _lookup(mcfg, "extractor_mode", default="layer_norm")
    _require(mode, ("layer_norm", "default"), "extractor_mode", source)
    spec = _lookup(mcfg, "conv_feature_layers", default=fe["conv_spec"])
    layers = parse_conv_spec(spec)
    for i, (dim, kernel, _) in enumerate(layers):
        w = sd.get(f"feature_extractor.conv_layers.{i}.0.weight")
        if w is None or tuple(w.shape[::2]) != (dim, kernel):
            raise CheckpointError(f"{source}: conv_feature_layers {spec!r} does not match "
                                  f"feature_extractor.conv_layers.{i}.0.weight "
                                  f"{None if w is None else tuple(w.shape)}")
    depth = _count(sd, r"encoder\.layers\.(\d+)\.")
    dim = sd["post_extract_proj.weight"].shape[0]
    pos_depth = _count(sd, r"encoder\.pos_conv\.(\d+)\.0\.weight")
    if pos_depth == 0:
        raise CheckpointError(f"{source}: no encoder.pos_conv.N.0.weight: a single weight-normed "
                              "positional conv (wav2vec 2.0, pos_conv_depth=1) is not supported")
    pos_w = sd["encoder.pos_conv.0.0.weight"]  # (D, D / groups, k)
    heads = _lookup(mcfg, "encoder_attention_heads")
    if heads is None:
        raise ConfigError(f"{source}: cfg has no encoder_attention_heads")
    layer_norm_first = bool(_lookup(mcfg, "layer_norm_first", default=False))
    fe.update(conv_spec=spec, extractor_mode="layer_norm" if mode == "layer_norm" else "group_norm",
              conv_bias="feature_extractor.conv_layers.0.0.bias" in sd,
              pos_conv_depth=pos_depth, pos_conv_width=pos_w.shape[-1] * pos_depth,
              pos_conv_groups=dim // pos_w.shape[1], layer_norm_eps=FAIRSEQ_EPS,
              pos_conv_padding="input")
    if pos_w.shape[-1] < 3:
        raise CheckpointError(f"{source}: positional conv kernel {pos_w.shape[-1]} < 3")
    enc.update(depth=depth, dim=dim, num_heads=int(heads),
               ffn_dim=sd["encoder.layers.0.fc1.weight"].shape[0], norm_eps=FAIRSEQ_EPS,
               layer_norm_first=layer_norm_first, input_norm=not layer_norm_first,
               final_norm=layer_norm_first, qkv_bias="all", relative_position_bias="none",
               layer_scale_init=0.0, drop_path=0.0,
               dropout=float(_lookup(mcfg, "dropout", default=enc["dropout"])),
               attention_dropout=float(_lookup(mcfg, "attention_dropout",
                                               default=enc["attention_dropout"])),
               activation_dropout=float(_lookup(mcfg, "activation_dropout",
                                                default=enc["activation_dropout"])),
               layerdrop=float(_lookup(mcfg, "encoder_layerdrop", default=enc["layerdrop"])))
    masking = data["model"]["masking"]
    masking["mask_prob"] = float(_lookup(mcfg, "mask_prob", default=masking["mask_prob"]))
    masking["mask_length"] = int(_lookup(mcfg, "mask_length", default=masking["mask_length"]))
    _objective(data, mcfg)
    data["model"]["objective"]["head_layers"] = 1
    data["preset"] = f"imported from fairseq {Path(source).name}"
    return config_from_dict(data)


def _audio_encoder(sd: dict[str, Tensor], cfg: Config, src: str, dst: str,
                   source: str) -> dict[str, Tensor]:
    """Blocks and the encoder LayerNorm (input norm for post-LN, final norm for pre-LN)."""
    out: dict[str, Tensor] = {}
    for i in range(cfg.model.encoder.depth):
        out.update(_fairseq_block(sd, f"{src}layers.{i}", f"{dst}blocks.{i}", source))
    norm = "final_norm" if cfg.model.encoder.layer_norm_first else "input_norm"
    take_linear(sd, f"{src}layer_norm", out, f"{dst}{norm}", source)
    return out


def _audio_student(sd: dict[str, Tensor], cfg: Config, source: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {"frontend.mask_emb": take(sd, "mask_emb", source)}
    fe = cfg.model.frontend
    take_conv_feature_encoder(sd, "feature_extractor", out, fe, source)
    take_linear(sd, "layer_norm", out, "frontend.feature_norm", source)
    take_linear(sd, "post_extract_proj", out, "frontend.feature_proj", source)
    for i in range(fe.pos_conv_depth):
        take_linear(sd, f"encoder.pos_conv.{i}.0", out, f"frontend.pos_conv.layers.{i}.conv",
                    source)
    out.update(_audio_encoder(sd, cfg, "encoder.", "encoder.", source))
    return out


def _audio_teacher(ema: dict[str, Tensor], cfg: Config, report: ImportReport,
                   source: str) -> dict[str, Tensor]:
    out = _audio_encoder(ema, cfg, "", "teacher.model.", f"{source} _ema")
    shared = sorted(k for k in ema if k.startswith("pos_conv."))
    for k in shared:
        ema.pop(k)
    if shared:
        report.notes.append(f"_ema pos_conv.* ({len(shared)} tensors) not imported: our teacher "
                            "shares the student's positional conv (fairseq copies it every step)")
    fail_on_leftovers(ema, f"{source} _ema")
    return out


def _import_audio(sd: dict[str, Tensor], cfg_dict: dict[str, Any], source: str,
                  report: ImportReport) -> tuple[Config, dict[str, Tensor]]:
    if any(k.startswith(CTC_PREFIX) for k in sd):
        heads = {k: sd.pop(k) for k in list(sd) if k.startswith("w2v_encoder.proj.")}
        if heads:
            report.notes.append(f"not imported (CTC head, outside the pre-trained model): "
                                f"{sorted(heads)} {tuple(heads['w2v_encoder.proj.weight'].shape)}")
        inner = {k[len(CTC_PREFIX):]: sd.pop(k) for k in list(sd) if k.startswith(CTC_PREFIX)}
        fail_on_leftovers(sd, source)
        sd = inner
    ema = sd.pop("_ema", None)
    for k in [k for k in sd if k.startswith("_ema.")]:  # a flattened teacher
        ema = ema or {}
        ema[k[len("_ema."):]] = sd.pop(k)
    cfg = _audio_config(sd, _model_cfg(cfg_dict), source)
    out = _audio_student(sd, cfg, source)
    for name in ("final_proj", "final_proj.0"):
        if f"{name}.weight" in sd:
            take_linear(sd, name, out, "head", source)
    fail_on_leftovers(sd, source)
    if ema is not None:
        out.update(_audio_teacher(dict(ema), cfg, report, source))
    return cfg, out


# --------------------------------------------------------------------------------- text


def _text_config(sd: dict[str, Tensor], mcfg: dict[str, Any], source: str) -> Config:
    data = to_dict(load_config("text", "base"))
    enc, fe = data["model"]["encoder"], data["model"]["frontend"]
    p = TEXT_PREFIX
    _require(_lookup(mcfg, "activation_fn", "transformer.activation_fn", default="gelu"),
             ("gelu",), "activation_fn", source)
    _require(bool(_lookup(mcfg, "transformer.encoder.normalize_before",
                          "encoder_normalize_before", default=False)), (False,),
             "encoder.normalize_before", source)
    _require(bool(_lookup(mcfg, "transformer.no_scale_embedding", "no_scale_embedding",
                          default=True)), (True,), "no_scale_embedding", source)
    if f"{p}layernorm_embedding.weight" not in sd:
        raise CheckpointError(f"{source}: no {p}layernorm_embedding (layernorm_embedding=false "
                              "is not supported)")
    heads = _lookup(mcfg, "transformer.encoder.attention_heads", "encoder_attention_heads",
                    "encoder.attention_heads")
    if heads is None:
        raise ConfigError(f"{source}: cfg has no transformer.encoder.attention_heads")
    tokens, positions = sd[f"{p}embed_tokens.weight"], sd[f"{p}embed_positions.weight"]
    pad = 1  # fairseq Dictionary: <s> 0, <pad> 1, </s> 2, <unk> 3
    fe.update(vocab_size=tokens.shape[0], max_positions=positions.shape[0] - pad - 1,
              pad_index=pad, layer_norm_eps=FAIRSEQ_EPS)
    enc.update(depth=_count(sd, re.escape(p) + r"layers\.(\d+)\."), dim=tokens.shape[1],
               num_heads=int(heads), ffn_dim=sd[f"{p}layers.0.fc1.weight"].shape[0],
               norm_eps=FAIRSEQ_EPS, layer_norm_first=False, input_norm=False, final_norm=False,
               qkv_bias="all", relative_position_bias="none", layer_scale_init=0.0,
               dropout=float(_lookup(mcfg, "transformer.dropout", "dropout",
                                     default=enc["dropout"])),
               attention_dropout=float(_lookup(mcfg, "transformer.attention_dropout",
                                               "attention_dropout",
                                               default=enc["attention_dropout"])))
    _objective(data, mcfg)
    # fairseq's head_layers=2 regression head is Sequential(Linear, GELU, Linear): keys 0 and 2
    two = "encoder.regression_head.2.weight" in sd
    data["model"]["objective"]["head_layers"] = 2 if two else 1
    data["preset"] = f"imported from fairseq {Path(source).name}"
    return config_from_dict(data)


def _text_blocks(sd: dict[str, Tensor], cfg: Config, src: str, dst: str,
                 source: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for i in range(cfg.model.encoder.depth):
        out.update(_fairseq_block(sd, f"{src}layers.{i}", f"{dst}blocks.{i}", source))
    sd.pop(f"{src}version", None)  # fairseq's state-dict version marker, no weights
    return out


def _import_text(sd: dict[str, Tensor], cfg_dict: dict[str, Any], source: str,
                 report: ImportReport) -> tuple[Config, dict[str, Tensor]]:
    ema = sd.pop("encoder._ema", None)
    cfg = _text_config(sd, _model_cfg(cfg_dict), source)
    p = TEXT_PREFIX
    out: dict[str, Tensor] = {
        "frontend.embed_tokens.weight": take(sd, f"{p}embed_tokens.weight", source),
        "frontend.embed_positions.weight": take(sd, f"{p}embed_positions.weight", source),
    }
    take_linear(sd, f"{p}layernorm_embedding", out, "frontend.layer_norm", source)
    out.update(_text_blocks(sd, cfg, p, "encoder.", source))
    if cfg.model.objective.head_layers == 2:
        take_linear(sd, "encoder.regression_head.0", out, "head.0", source)
        take_linear(sd, "encoder.regression_head.2", out, "head.2", source)
    elif "encoder.regression_head.0.weight" in sd:
        take_linear(sd, "encoder.regression_head.0", out, "head", source)
    fail_on_leftovers(sd, source)
    if ema is not None:
        ema = dict(ema)
        out.update(_text_blocks(ema, cfg, "", "teacher.model.", f"{source} encoder._ema"))
        shared = sorted(k for k in ema if k.startswith(
            ("embed_tokens.", "embed_positions.", "layernorm_embedding.")))
        for k in shared:
            ema.pop(k)
        report.notes.append(f"encoder._ema {shared} not imported: our teacher shares the "
                            "student's embeddings (fairseq copies them every step)")
        fail_on_leftovers(ema, f"{source} encoder._ema")
    return cfg, out


# ------------------------------------------------------------------------------- vision


def _window_from_table(rows: int) -> int:
    side = (math.isqrt(rows - 3) + 1) // 2
    if (2 * side - 1) ** 2 + 3 != rows:
        raise CheckpointError(f"relative position table of {rows} rows is not a square grid")
    return side


def _beit_config(sd: dict[str, Tensor], args: dict[str, Any], source: str,
                 report: ImportReport) -> Config:
    data = to_dict(load_config("image", "base"))
    enc, fe = data["model"]["encoder"], data["model"]["frontend"]
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"]  # (D, C, p, p)
    shared = "rel_pos_bias.relative_position_bias_table" in sd
    per_block = "blocks.0.attn.relative_position_bias_table" in sd
    table = sd.get("rel_pos_bias.relative_position_bias_table",
                   sd.get("blocks.0.attn.relative_position_bias_table"))
    if table is not None:
        heads, side = table.shape[1], _window_from_table(table.shape[0])
    elif "pos_embed" in sd:
        heads, side = dim // 64, math.isqrt(sd["pos_embed"].shape[1] - 1)
        report.notes.append(f"no relative position bias: heads = dim / 64 = {heads} (BEiT)")
    else:
        raise CheckpointError(f"{source}: neither a relative position bias nor pos_embed; cannot "
                              "tell the image size")
    fe.update(image_size=side * patch.shape[-1], patch_size=patch.shape[-1],
              in_channels=patch.shape[1], positions="learned" if "pos_embed" in sd else "none",
              cls_token=True, mask_token=True)
    enc.update(depth=_count(sd, r"blocks\.(\d+)\."), dim=dim, num_heads=heads,
               ffn_dim=sd["blocks.0.mlp.fc1.weight"].shape[0], norm_eps=BEIT_EPS,
               layer_norm_first=True, input_norm=False, final_norm="norm.weight" in sd,
               qkv_bias="qv" if "blocks.0.attn.q_bias" in sd else
               ("all" if "blocks.0.attn.qkv.bias" in sd else "none"),
               relative_position_bias="shared" if shared else
               ("per_block" if per_block else "none"),
               layer_scale_init=float(args.get("layer_scale_init_value") or 0.1)
               if "blocks.0.gamma_1" in sd else 0.0,
               drop_path=float(args.get("drop_path", enc["drop_path"]) or 0.0))
    obj = data["model"]["objective"]
    obj["top_k"] = min(int(args.get("average_top_k_layers") or obj["top_k"]), enc["depth"])
    data["preset"] = f"imported from BEiT-format {Path(source).name}"
    return config_from_dict(data)


def _beit_tensors(sd: dict[str, Tensor], cfg: Config, dst: str, source: str,
                  window: tuple[int, int]) -> dict[str, Tensor]:
    """BEiT model keys -> ours under `dst` ('' for the student, 'teacher.model.' for the EMA)."""
    enc = cfg.model.encoder
    fe_p, enc_p = ("frontend.", "encoder.") if not dst else (f"{dst}frontend.", f"{dst}encoder.")
    out = {f"{fe_p}cls_token": take(sd, "cls_token", source),
           f"{fe_p}mask_token": take(sd, "mask_token", source)}
    if cfg.model.frontend.positions == "learned":
        out[f"{fe_p}pos_embed"] = take(sd, "pos_embed", source)
    take_linear(sd, "patch_embed.proj", out, f"{fe_p}patch_embed", source)
    index = RelativePositionBias._index(*window)
    if enc.relative_position_bias == "shared":
        out[f"{enc_p}rel_pos_bias.relative_position_bias_table"] = take(
            sd, "rel_pos_bias.relative_position_bias_table", source)
        _check_index(sd, "rel_pos_bias.relative_position_index", index, source)
    for i in range(enc.depth):
        s, d = f"blocks.{i}", f"{enc_p}blocks.{i}"
        take_linear(sd, f"{s}.attn.qkv", out, f"{d}.attn.qkv", source, bias=enc.qkv_bias == "all")
        if enc.qkv_bias == "qv":
            out[f"{d}.attn.q_bias"] = take(sd, f"{s}.attn.q_bias", source)
            out[f"{d}.attn.v_bias"] = take(sd, f"{s}.attn.v_bias", source)
        if enc.relative_position_bias == "per_block":
            out[f"{d}.rel_pos_bias.relative_position_bias_table"] = take(
                sd, f"{s}.attn.relative_position_bias_table", source)
            _check_index(sd, f"{s}.attn.relative_position_index", index, source)
        take_linear(sd, f"{s}.attn.proj", out, f"{d}.attn.proj", source)
        take_linear(sd, f"{s}.norm1", out, f"{d}.norm1", source)
        take_linear(sd, f"{s}.norm2", out, f"{d}.norm2", source)
        take_linear(sd, f"{s}.mlp.fc1", out, f"{d}.mlp.fc1", source)
        take_linear(sd, f"{s}.mlp.fc2", out, f"{d}.mlp.fc2", source)
        if enc.layer_scale_init > 0:
            out[f"{d}.ls1.gamma"] = take(sd, f"{s}.gamma_1", source)
            out[f"{d}.ls2.gamma"] = take(sd, f"{s}.gamma_2", source)
    if enc.final_norm:
        take_linear(sd, "norm", out, f"{enc_p}final_norm", source)
    return out


def _check_index(sd: dict[str, Tensor], key: str, expected: Tensor, source: str) -> None:
    """The stored relative_position_index buffer (optional) must equal the one we compute."""
    stored = sd.pop(key, None)
    if stored is not None and not torch.equal(stored.long(), expected):
        raise CheckpointError(f"{source}: {key} differs from BEiT's index for this grid")


def _import_beit(sd: dict[str, Tensor], ckpt: dict[str, Any], cfg_dict: dict[str, Any],
                 source: str, report: ImportReport) -> tuple[Config, dict[str, Tensor]]:
    args = cfg_dict.get("args") or {}
    cfg = _beit_config(sd, args if isinstance(args, dict) else {}, source, report)
    grid = cfg.model.frontend.image_size // cfg.model.frontend.patch_size
    out = _beit_tensors(sd, cfg, "", source, (grid, grid))
    if "lm_head.weight" in sd:
        take_linear(sd, "lm_head", out, "head", source)
    heads = sorted(k for k in sd if k.startswith(("fc_norm.", "head.")))
    if heads:
        report.notes.append(f"not imported (classification head, outside the pre-trained "
                            f"model): {heads}")
        for k in heads:
            sd.pop(k)
    fail_on_leftovers(sd, source)
    ema = ckpt.get("model_ema")
    if isinstance(ema, dict):
        ema = dict(ema)
        out.update(_beit_tensors(ema, cfg, "teacher.model.", f"{source} model_ema", (grid, grid)))
        for k in [k for k in ema if k.startswith(("lm_head.", "fc_norm.", "head."))]:
            report.notes.append(f"model_ema {k} not imported (the teacher has no head)")
            ema.pop(k)
        fail_on_leftovers(ema, f"{source} model_ema")
    return cfg, out


# ------------------------------------------------------------------------------ assembly


def detect_format(sd: Mapping[str, Any]) -> str:
    """'audio', 'text', 'beit' (data2vec 1.0) or 'v2' (data2vec_multi) from the key names."""
    keys = set(sd)
    if any("modality_encoders." in k for k in keys):
        return "v2"
    if "feature_extractor.conv_layers.0.0.weight" in keys or \
            f"{CTC_PREFIX}feature_extractor.conv_layers.0.0.weight" in keys:
        return "audio"
    if f"{TEXT_PREFIX}embed_tokens.weight" in keys:
        return "text"
    if "cls_token" in keys and "patch_embed.proj.weight" in keys:
        return "beit"
    raise CheckpointError(f"unrecognised checkpoint layout (first keys: {sorted(keys)[:6]})")


def model_from_fairseq(path: str | Path) -> tuple[Config, StudentTeacher, ImportReport]:
    """Our model (student, head or decoder, EMA teacher) from a released checkpoint file."""
    source = str(path)
    sd, cfg_dict, ckpt = read_fairseq(path)
    report = ImportReport(source=f"fairseq {source}")
    try:
        kind = detect_format(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if kind == "audio":
        cfg, tensors = _import_audio(sd, cfg_dict, source, report)
    elif kind == "text":
        cfg, tensors = _import_text(sd, cfg_dict, source, report)
    elif kind == "v2":
        cfg, tensors = import_v2(sd, cfg_dict, source, report)
    else:
        cfg, tensors = _import_beit(sd, ckpt, cfg_dict, source, report)
    return cfg, _assemble(cfg, tensors, report, source), report


def _assemble(cfg: Config, tensors: dict[str, Tensor], report: ImportReport,
              source: str) -> StudentTeacher:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # reproducible init of anything the file lacks (a head)
        model = build_model(cfg)
    sd = model.state_dict()
    # Parts a file may lack (fine-tuned files drop them): kept as initialised, and reported.
    optional = ("teacher.", "head", "decoder.")
    present = {p for p in optional if any(k.startswith(p) for k in tensors)}
    expected = {k: v for k, v in sd.items()
                if not any(k.startswith(p) and p not in present for p in optional)
                and k != "frontend.token_type"}
    check_keys(tensors, expected, source)
    sd.update({k: v.to(sd[k].dtype) for k, v in tensors.items()})
    model.load_state_dict(sd)
    if "teacher." not in present:
        model.reset_teacher()
        report.notes.append("no EMA teacher in the file: teacher = copy of the student")
    if cfg.version == 1 and "head" not in present:
        report.notes.append("no regression head in the file: freshly initialised")
    if cfg.version == 2 and "decoder." not in present:
        report.notes.append("no decoder in the file: freshly initialised")
    return model.eval()


def import_fairseq(path: str | Path, out: str | Path) -> tuple[Path, ImportReport]:
    """Import a released data2vec 1.0 or 2.0 checkpoint into our checkpoint directory `out`."""
    cfg, model, report = model_from_fairseq(path)
    return write_checkpoint(out, cfg, model, report), report


__all__ = ["detect_format", "import_fairseq", "model_from_fairseq", "read_fairseq"]
