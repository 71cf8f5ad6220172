"""HuggingFace task models -> our fine-tuned checkpoints (the inverse of the task export).

``Data2VecAudioForCTC``, ``Data2VecAudioForSequenceClassification``,
``Data2VecTextForSequenceClassification`` and ``Data2VecVisionForImageClassification``
directories import as a fine-tuning run (the run layout of every import: ``OUT/config.yaml``,
``OUT/checkpoints/step-0000000`` with the task settings and labels, ``OUT/tokenizer`` for text)
that :func:`data2vec.load`, ``data2vec evaluate`` and ``data2vec export`` read, with the head
in :class:`~data2vec.finetune.models.FineTuneModel`'s layout:

- CTC: ``lm_head`` -> ``head.1``; the letters come from the directory's ``vocab.json``; HF's
  blank is ``pad_token_id``, ours is id 0, so the rows are reordered when they differ;
- audio classification: HF projects, mean-pools, then classifies; both are affine, so the
  projector is folded into our single classifier (``W = W_c·W_p``, ``b = W_c·b_p + b_c``);
- text classification: RoBERTa's head ``classifier.dense`` / ``classifier.out_proj`` -> ``head.1``
  / ``head.4``; one label = regression (STS-B);
- image classification: the pooler LayerNorm over the mean patch token -> ``head.0`` (fc_norm),
  ``classifier`` -> ``head.1``.

Other architectures (masked LM, x-vector, frame classification, segmentation, …) import as base
models; their head tensors are listed in the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from data2vec.config import Config, to_dict
from data2vec.errors import CheckpointError, ConfigError
from data2vec.files import read_text
from data2vec.interop.common import ImportReport, check_keys

ARCHITECTURES = {"Data2VecAudioForCTC": "asr",
                 "Data2VecAudioForSequenceClassification": "audio-cls",
                 "Data2VecTextForSequenceClassification": "text-cls",
                 "Data2VecVisionForImageClassification": "image-cls"}
HEAD_KEYS = {"asr": ("lm_head.",), "audio-cls": ("projector.", "classifier."),
             "text-cls": ("classifier.",),
             "image-cls": ("classifier.", "data2vec_vision.pooler.layernorm.")}


def detect_task(hf_cfg: dict[str, Any]) -> str | None:
    """Our fine-tuning task for an HF config's ``architectures``; None = import the base model."""
    for name in hf_cfg.get("architectures") or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    return None


def split_head(task: str, hf_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove and return the task head's tensors (base-model tensors stay in `hf_sd`)."""
    head = {k: hf_sd.pop(k) for k in list(hf_sd) if k.startswith(HEAD_KEYS[task])}
    if not head:
        raise CheckpointError(f"no {task} head tensors ({', '.join(HEAD_KEYS[task])}*) in the "
                              "HF weights although config.json names the task architecture")
    return head


def _take(head: dict[str, Tensor], key: str, source: str) -> Tensor:
    if key not in head:
        raise CheckpointError(f"{source}: missing HF head tensor '{key}'")
    return head.pop(key)


def _classes(hf_cfg: dict[str, Any], num_labels: int) -> list[str]:
    names = {int(k): str(v) for k, v in (hf_cfg.get("id2label") or {}).items()}
    return [names.get(i, f"LABEL_{i}") for i in range(num_labels)]


def _ctc_head(head: dict[str, Tensor], hf_cfg: dict[str, Any], directory: Path,
              notes: list[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from data2vec.finetune.ctc import BLANK

    weight, bias = _take(head, "lm_head.weight", str(directory)), _take(head, "lm_head.bias",
                                                                        str(directory))
    path = directory / "vocab.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: a Data2VecAudioForCTC directory needs vocab.json "
                              "(the CTC letters) to be imported")
    try:
        vocab = json.loads(read_text(path, CheckpointError, "JSON vocabulary"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(vocab, dict) or not vocab:
        raise CheckpointError(f"{path}: expected a JSON object mapping letters to ids")
    if isinstance(vocab, dict) and len(vocab) == 1 and isinstance(next(iter(vocab.values())),
                                                                   dict):
        vocab = next(iter(vocab.values()))  # multilingual layout {"lang": {symbol: id}}
    ids = sorted(vocab.values())
    if ids != list(range(weight.shape[0])):
        raise CheckpointError(f"{path}: ids {ids[:3]}…{ids[-1:]} are not 0..{weight.shape[0] - 1}"
                              f" (the rows of lm_head.weight)")
    symbols = {i: s for s, i in vocab.items()}
    blank = int(hf_cfg.get("pad_token_id", 0))
    order = [blank] + [i for i in range(weight.shape[0]) if i != blank]  # our blank is id 0
    notes.append(f"CTC blank = HF {symbols[blank]!r} (id {blank}) -> our id 0")
    return ({"head.1.weight": weight[order], "head.1.bias": bias[order]},
            {"vocab": [BLANK] + [symbols[i] for i in order[1:]]})


def _audio_cls_head(head: dict[str, Tensor], hf_cfg: dict[str, Any], source: str,
                    notes: list[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if hf_cfg.get("use_weighted_layer_sum"):
        raise ConfigError(f"{source}: use_weighted_layer_sum=true (a learned mix of all hidden "
                          "states) has no equivalent in our audio-cls head")
    w_p, b_p = _take(head, "projector.weight", source), _take(head, "projector.bias", source)
    w_c, b_c = _take(head, "classifier.weight", source), _take(head, "classifier.bias", source)
    # Mean pooling commutes with the affine projector: fold it into one classifier (in fp64).
    weight = (w_c.double() @ w_p.double()).float()
    bias = (w_c.double() @ b_p.double() + b_c.double()).float()
    notes.append(f"HF projector ({w_p.shape[0]} dims) folded into the classifier")
    return ({"head.1.weight": weight, "head.1.bias": bias},
            {"classes": _classes(hf_cfg, w_c.shape[0])})


def _text_cls_head(head: dict[str, Tensor], hf_cfg: dict[str, Any],
                   source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    out = {"head.1.weight": _take(head, "classifier.dense.weight", source),
           "head.1.bias": _take(head, "classifier.dense.bias", source),
           "head.4.weight": _take(head, "classifier.out_proj.weight", source),
           "head.4.bias": _take(head, "classifier.out_proj.bias", source)}
    num_labels = out["head.4.weight"].shape[0]
    regression = hf_cfg.get("problem_type") == "regression" or num_labels == 1
    return out, {"classes": [] if regression else _classes(hf_cfg, num_labels)}


def _image_cls_head(head: dict[str, Tensor], hf_cfg: dict[str, Any],
                    source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if not hf_cfg.get("use_mean_pooling", True):
        raise ConfigError(f"{source}: use_mean_pooling=false (CLS token after a final LayerNorm, "
                          "no pooler LayerNorm) has no equivalent in our image-cls head")
    out = {"head.0.weight": _take(head, "data2vec_vision.pooler.layernorm.weight", source),
           "head.0.bias": _take(head, "data2vec_vision.pooler.layernorm.bias", source),
           "head.1.weight": _take(head, "classifier.weight", source),
           "head.1.bias": _take(head, "classifier.bias", source)}
    return out, {"classes": _classes(hf_cfg, out["head.1.weight"].shape[0])}


def head_from_hf(task: str, head: dict[str, Tensor], hf_cfg: dict[str, Any], directory: Path,
                 notes: list[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(our ``head.*`` tensors, labels) from the HF head tensors; every one is used."""
    source = str(directory)
    if task == "asr":
        ours, labels = _ctc_head(head, hf_cfg, directory, notes)
    elif task == "audio-cls":
        ours, labels = _audio_cls_head(head, hf_cfg, source, notes)
    elif task == "text-cls":
        ours, labels = _text_cls_head(head, hf_cfg, source)
    else:
        ours, labels = _image_cls_head(head, hf_cfg, source)
    if head:
        raise CheckpointError(f"{source}: HF head tensors with no place in our {task} head: "
                              f"{sorted(head)}")
    return ours, labels


def _dropout(task: str, hf_cfg: dict[str, Any]) -> float:
    if task == "asr":
        return float(hf_cfg.get("final_dropout", 0.0))
    if task == "text-cls":
        value = hf_cfg.get("classifier_dropout")
        return float(hf_cfg.get("hidden_dropout_prob", 0.1) if value is None else value)
    return 0.0


def build_task_network(task: str, cfg: Config, student: dict[str, Tensor],
                       head: dict[str, Tensor], labels: dict[str, Any], hf_cfg: dict[str, Any],
                       directory: Path, source: str):
    """(FineTuneModel in eval mode, FinetuneConfig) carrying the HF model's encoder and head."""
    from data2vec.build import build_task_model
    from data2vec.finetune.loop import FinetuneConfig
    from data2vec.loading import num_outputs

    ft = FinetuneConfig(task=task, init=source, version=cfg.version,
                        dropout=_dropout(task, hf_cfg), pooling="mean")
    model = build_task_model(cfg, task, num_outputs(task, labels), ft.pooling, ft.dropout)
    sd = model.state_dict()
    tensors = {**student, **head}
    expected = {k: v for k, v in sd.items()
                if k in tensors or k not in ("frontend.mask_token", "frontend.mask_emb")}
    check_keys(tensors, expected, str(directory))
    sd.update({k: v.to(sd[k].dtype) for k, v in tensors.items()})
    model.load_state_dict(sd)
    return model.eval(), ft


def write_task_run(out: Path, model, cfg: Config, ft, labels: dict[str, Any], directory: Path,
                   report: ImportReport) -> Path:
    """Our fine-tuned run directory `out` (the run layout of every import, see
    :func:`data2vec.interop.common.write_run`, plus the task settings and labels)."""
    from data2vec.interop.common import write_run

    report.notes.append(f"imported as a fine-tuned {ft.task} run: 'data2vec evaluate {out}' and "
                        f"'data2vec export --to hf {out} DIR' read it")
    return write_run(Path(out), cfg, model, report, finetune=to_dict(ft), labels=labels,
                     final_norm=model.use_final_norm, tokenizer_from=directory)


__all__ = ["ARCHITECTURES", "build_task_network", "detect_task", "head_from_hf", "split_head",
           "write_task_run"]
