"""data2vec 2.0 -> HuggingFace ``transformers``, with the model code shipped in the directory.

transformers has no data2vec 2.0 classes (no ALiBi, no sin-cos image positions with data2vec's
blocks, ...), so a v2 export carries its own: :mod:`data2vec.interop.hf_v2_remote` is copied
verbatim into the directory, and ``config.json`` names its classes in ``auto_map``::

    OUT/config.json                 Data2Vec2Config fields, architectures, auto_map
    OUT/configuration_data2vec2.py  the config class   (imports transformers only)
    OUT/modeling_data2vec2.py       the model classes  (imports torch + transformers only)
    OUT/model.safetensors           our student tensors, under our own names
    OUT/vocab.json                  CTC letters (speech recognition only; blank = id 0)

``AutoModel.from_pretrained(OUT, trust_remote_code=True)`` then gives
``Data2Vec2{Audio,Vision,Text}Model``, and a fine-tuned run the task model through its Auto class
(``AutoModelForCTC``, ``…ForAudioClassification``, ``…ForSequenceClassification``,
``…ForImageClassification``), without this package installed.

The remote modules use our module names, so the weight map is the identity on the student's
front-end, encoder and ALiBi scales (task models: under ``data2vec2.``, the head as ``head.*``).
It is still checked key by key both ways: every HF tensor comes from ours, and every tensor of ours
is exported or named in :data:`NOT_EXPORTED` with the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from data2vec.config import Config
from data2vec.errors import CheckpointError, ConfigError
from data2vec.modalities.speech import parse_conv_spec

REMOTE_DIR = Path(__file__).parent / "hf_v2_remote"
REMOTE_FILES = ("configuration_data2vec2.py", "modeling_data2vec2.py")
CONFIG_CLASS = "configuration_data2vec2.Data2Vec2Config"

BASE_CLASSES = {"speech": "Data2Vec2AudioModel", "image": "Data2Vec2VisionModel",
                "text": "Data2Vec2TextModel"}
# Fine-tuned task -> (transformers Auto class, our remote class).
TASK_CLASSES = {"asr": ("AutoModelForCTC", "Data2Vec2ForCTC"),
                "audio-cls": ("AutoModelForAudioClassification",
                              "Data2Vec2ForAudioClassification"),
                "text-cls": ("AutoModelForSequenceClassification",
                             "Data2Vec2ForSequenceClassification"),
                "image-cls": ("AutoModelForImageClassification",
                              "Data2Vec2ForImageClassification")}
BASE_PREFIX = "data2vec2."
"""Where a task model keeps its base model (the remote classes' ``base_model_prefix``)."""

NOT_EXPORTED = {
    "teacher.": "the EMA teacher (a pre-training target maker)",
    "decoder.": "the pre-training decoder (predicts teacher targets at masked steps)",
    "frontend.mask_emb": "the speech mask embedding (data2vec 2.0 drops masked steps)",
    "frontend.mask_token": "the image mask token (data2vec 2.0 drops masked patches)",
}
"""Tensors of ours the HF model has no use for: it computes the student encoder on unmasked
input. Prefixes end in '.'."""


def _refuse(option: str, why: str) -> ConfigError:
    return ConfigError(f"cannot export to HuggingFace: {option} — {why}")


def remote_config(cfg: Config) -> dict[str, Any]:
    """``Data2Vec2Config`` keyword arguments equal to `cfg`'s encoder and front-end; options the
    remote code does not implement raise ConfigError naming them."""
    enc, fe = cfg.model.encoder, cfg.model.frontend
    if enc.relative_position_bias != "none":
        raise _refuse(f"model.encoder.relative_position_bias={enc.relative_position_bias}",
                      "the data2vec 2.0 export has no BEiT relative position bias (no data2vec "
                      "2.0 model uses one)")
    config: dict[str, Any] = {
        "modality": cfg.modality, "hidden_size": enc.dim, "num_hidden_layers": enc.depth,
        "num_attention_heads": enc.num_heads, "intermediate_size": enc.ffn_dim,
        "layer_norm_eps": enc.norm_eps, "layer_norm_first": enc.layer_norm_first,
        "input_norm": enc.input_norm, "final_norm": enc.final_norm, "qkv_bias": enc.qkv_bias,
        "layer_scale_init": enc.layer_scale_init, "hidden_dropout": enc.dropout,
        "attention_dropout": enc.attention_dropout,
        "activation_dropout": enc.activation_dropout, "layerdrop": enc.layerdrop,
        "drop_path": enc.drop_path, "alibi": cfg.model.v2.alibi}
    if cfg.modality == "speech":
        config.update(conv_layers=[list(layer) for layer in parse_conv_spec(fe.conv_spec)],
                      extractor_mode=fe.extractor_mode, conv_bias=fe.conv_bias,
                      feature_layer_norm_eps=fe.layer_norm_eps, pos_conv_depth=fe.pos_conv_depth,
                      pos_conv_kernel=fe.pos_conv_kernel, pos_conv_groups=fe.pos_conv_groups,
                      pos_conv_padding=fe.pos_conv_padding)
    elif cfg.modality == "image":
        config.update(image_size=fe.image_size, patch_size=fe.patch_size,
                      num_channels=fe.in_channels, positions=fe.positions,
                      cls_token=fe.cls_token)
    else:
        config.update(vocab_size=fe.vocab_size, max_positions=fe.max_positions,
                      pad_token_id=fe.pad_index, embedding_layer_norm_eps=fe.layer_norm_eps)
    return config


def task_config(cfg: Config, task: str, ft: dict[str, Any], labels: dict[str, Any],
                num_outputs: int) -> dict[str, Any]:
    """The head's entries of ``Data2Vec2Config`` for a fine-tuned `task`."""
    dropout = float(ft.get("dropout", 0.0))
    # fine-tuning's own drop-path rate (-1 = the pre-training one), for training on in HF
    drop_path = {"drop_path": float(ft["drop_path"])} if ft.get("drop_path", -1) >= 0 else {}
    if task == "asr":  # the CTC blank is our id 0; HF models read it from pad_token_id
        return {"vocab_size": num_outputs, "pad_token_id": 0, "classifier_dropout": dropout,
                **drop_path}
    classes = [str(c) for c in labels.get("classes", [])]
    extra: dict[str, Any] = {"num_labels": num_outputs, "classifier_dropout": dropout,
                             **drop_path}
    if classes:
        extra["id2label"] = dict(enumerate(classes))
        extra["label2id"] = {c: i for i, c in enumerate(classes)}
    if task == "audio-cls":  # one sigmoid per class, as our fine-tuning trains it
        extra["problem_type"] = "multi_label_classification"
    elif task == "text-cls" and num_outputs == 1 and not classes:
        extra["problem_type"] = "regression"
    elif num_outputs > 1:  # (transformers refuses single-label classification with one label)
        extra["problem_type"] = "single_label_classification"
    if task == "image-cls":
        extra.update(pooling=ft.get("pooling", "mean"),
                     classifier_norm_eps=cfg.model.encoder.norm_eps)
    return extra


def _excluded(key: str) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in NOT_EXPORTED)


def exported_tensors(state: dict[str, Tensor], hf_state: dict[str, Tensor],
                     prefix: str = "") -> dict[str, Tensor]:
    """Our tensors under their HF names (`prefix` + our name; ``head.*`` kept as is), checked
    against the HF model's: all of its tensors present with their shapes, nothing of ours left
    out unless :data:`NOT_EXPORTED` says why."""
    from data2vec.train.checkpoint import check_keys

    out = {(k if k.startswith("head.") else prefix + k): v.detach().clone()
           for k, v in state.items() if not _excluded(k)}
    check_keys(out, hf_state, "data2vec 2.0 HF export")
    return out


def _remote_module():
    try:
        from data2vec.interop.hf_v2_remote import modeling_data2vec2
    except ModuleNotFoundError:
        raise ConfigError("HuggingFace interop needs transformers: pip install "
                          "'data2vec[hf]'") from None
    return modeling_data2vec2


def build_remote_model(config: dict[str, Any], class_name: str, state: dict[str, Tensor],
                       prefix: str = "") -> nn.Module:
    """The remote class `class_name` built from `config` and carrying `state` (eval mode)."""
    module = _remote_module()
    hf = getattr(module, class_name)(module.Data2Vec2Config(**config))
    weights = exported_tensors(state, hf.state_dict(), prefix)
    hf.load_state_dict(weights)
    return hf.eval()


def build_hf_v2_model(cfg: Config, model: nn.Module) -> nn.Module:
    """``Data2Vec2{Audio,Vision,Text}Model`` with the student of a Data2VecV2 `model` (or of a
    data2vec 1.0 ``Data2Vec``, whose regression head, like the v2 decoder, only serves
    pre-training and is left out)."""
    student = {k: v for k, v in model.state_dict().items()
               if not (cfg.version == 1 and k.startswith("head."))}
    return build_remote_model(remote_config(cfg), BASE_CLASSES[cfg.modality], student)


def build_hf_v2_task_model(cfg: Config, model: nn.Module, ft: dict[str, Any],
                           labels: dict[str, Any]) -> nn.Module:
    """The remote task model carrying a fine-tuned FineTuneModel's encoder and head."""
    task = ft["task"]
    num_outputs = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1].out_features
    config = remote_config(cfg) | task_config(cfg, task, ft, labels, num_outputs)
    return build_remote_model(config, TASK_CLASSES[task][1], model.state_dict(), BASE_PREFIX)


def write_remote_dir(hf: nn.Module, auto_class: str, out_dir: Path) -> Path:
    """config.json (with ``auto_map``), the two remote-code files and model.safetensors."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    name = type(hf).__name__
    auto_map = {"AutoConfig": CONFIG_CLASS,
                "AutoModel": f"modeling_data2vec2.{BASE_CLASSES[hf.config.modality]}"}
    auto_map[auto_class] = f"modeling_data2vec2.{name}"
    hf.config.architectures = [name]
    hf.config.auto_map = auto_map
    hf.config.save_pretrained(out_dir)
    for file in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / file, out_dir / file)
    weights = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def export_v2_model(cfg: Config, model: nn.Module, out_dir: Path,
                    ft: dict[str, Any] | None = None,
                    labels: dict[str, Any] | None = None) -> Path:
    """Write a data2vec 2.0 model as a remote-code HF directory: a Data2VecV2 `model` as the
    base model, a fine-tuned FineTuneModel (with its task settings `ft` and `labels`) as the task
    model, plus ``vocab.json`` for speech recognition."""
    if ft is None:
        hf, auto_class = build_hf_v2_model(cfg, model), "AutoModel"
    else:
        hf = build_hf_v2_task_model(cfg, model, ft, labels or {})
        auto_class = TASK_CLASSES[ft["task"]][0]
    write_remote_dir(hf, auto_class, Path(out_dir))
    vocab = (labels or {}).get("vocab")
    if ft is not None and vocab is not None:
        (Path(out_dir) / "vocab.json").write_text(
            json.dumps({s: i for i, s in enumerate(vocab)}, indent=1) + "\n")
    return Path(out_dir)


def export_loaded_v2(loaded: Any, out_dir: Path) -> Path:
    """:func:`export_v2_model` of a model read by :func:`data2vec.load`."""
    from data2vec.configlib import to_dict
    from data2vec.interop.hf import raw_labels

    if loaded.task is None:
        return export_v2_model(loaded.cfg, loaded.network, out_dir)
    return export_v2_model(loaded.cfg, loaded.network, out_dir, to_dict(loaded.finetune),
                           raw_labels(loaded.labels))


def export_hf_v2(ckpt: Path, state: dict[str, Any], out_dir: Path) -> Path:
    """:func:`export_v2_model` of the checkpoint `ckpt` (read through :func:`data2vec.load`;
    `state` is kept for callers that already read it)."""
    from data2vec.loading import load_checkpoint

    if "config" not in state:
        raise CheckpointError(f"{ckpt}: state.pt has no 'config' entry")
    return export_loaded_v2(load_checkpoint(ckpt), out_dir)


__all__ = ["BASE_CLASSES", "NOT_EXPORTED", "TASK_CLASSES", "build_hf_v2_model",
           "build_hf_v2_task_model", "export_hf_v2", "export_loaded_v2", "export_v2_model",
           "exported_tensors",
           "remote_config", "task_config"]
