"""``data2vec finetune`` / ``evaluate``: settings, initialisation, the training loop, evaluation.

A fine-tuning run starts from a pre-training run / checkpoint (its student weights, or its EMA
teacher with ``from_teacher``, and its config for the architecture) or from scratch (a preset),
trains a task head plus the encoder, validates every ``eval_every`` updates and writes a run
directory like pre-training's (:mod:`data2vec.finetune.runs`): ``config.yaml``, ``metrics.jsonl``,
TensorBoard, ``train.log``, ``checkpoints/step-N`` (last) and ``checkpoints/best`` in the
pre-training format (``model.safetensors`` + ``state.pt`` with ``config``, ``finetune`` and the
label set), which :func:`data2vec.load` and :func:`evaluate` read.

Example::

    ft = FinetuneConfig(task="image-cls", init="runs/image-v1-tiny", max_steps=200)
    finetune(ft, Path("runs/image-cls"))          # {'accuracy': ..., 'top5': ...} on valid
    evaluate(Path("runs/image-cls"), split="test").metrics
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data2vec.batch import Batch
from data2vec.config import (
    Config,
    OptimConfig,
    at_least,
    check_ranges,
    fraction,
    load_config,
    positive,
    rule,
    to_dict,
)
from data2vec.configlib import from_dict
from data2vec.data.collate import derive_seed
from data2vec.errors import CheckpointError, ConfigError
from data2vec.finetune import ctc, data, metrics
from data2vec.finetune.models import (
    TASKS,
    FineTuneModel,
    StandardizedLinear,
    channel_mask,
    layer_decay_scales,
)
from data2vec.train import checkpoint as ckpt
from data2vec.train.loop import TrainingError
from data2vec.train.optim import lr_at, param_groups, set_lr

log = logging.getLogger("data2vec")

MODALITY = {"asr": "speech", "audio-cls": "speech", "image-cls": "image", "text-cls": "text"}


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs besides the architecture (which comes from `init`)."""

    task: Literal["asr", "image-cls", "text-cls", "audio-cls"] = "image-cls"
    init: str = "scratch"
    """A pre-training run dir or checkpoint dir, or 'scratch' (random weights from `preset`)."""
    preset: str = "tiny"
    version: int = 1
    from_teacher: bool = False
    """Start from the EMA teacher's encoder instead of the student's (fairseq load_ema)."""
    random_init: bool = False
    """Build `init`'s architecture with random weights: the from-scratch baseline of the same
    model (``--compare-scratch``)."""
    data: str = ""
    """Labelled data directory; empty = the modality's demo data."""
    glue: str = ""
    """Text: GLUE task name (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte); empty = demo task."""
    labeled_minutes: float = 0.0
    """Speech: keep a random subset of this many minutes of labelled audio; 0 = all."""
    label_fraction: float = 1.0
    """Images / text / audio-cls: keep this fraction of each class's labelled examples."""
    max_labeled: int = 0
    """Keep at most this many labelled examples (after label_fraction); 0 = no limit."""
    max_sample_size: int = 0
    """Speech: drop clips longer than this many samples; 0 = keep all."""
    max_tokens: int = 128
    """Text: tokens per example (pairs are trimmed to fit)."""
    batch_size: int = 8
    max_steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    schedule: Literal["cosine", "tri_stage", "constant"] = "cosine"
    warmup_fraction: float = 0.1
    tri_stage: tuple[float, float, float] = (0.1, 0.4, 0.5)
    final_lr_scale: float = 0.05
    clip_norm: float = 0.0
    layer_decay: float = 1.0
    """Layer-wise lr decay (the CLI uses 0.75 for image-cls; BEiT Base used 0.65); 1 = off."""
    drop_path: float = -1.0
    """Override the encoder's drop-path rate; -1 = keep the pre-training value."""
    dropout: float = 0.0
    """Head dropout (text: 0.1)."""
    label_smoothing: float = 0.0
    mixup: float = 0.0
    """Images: mixup alpha (0 = off)."""
    cutmix: float = 0.0
    """Images: cutmix alpha (0 = off); with both, each batch picks one at random."""
    linear_probe: bool = False
    """Freeze the whole encoder (eval mode: no dropout, no drop-path); only the head trains, its
    classifier on batch-standardised features (MAE's linear probe; saved as a plain Linear)."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Images: random resized crop area range for training (milder than pre-training's)."""
    hflip: bool = False
    """Images: random horizontal flips during training (off: digits are not symmetric)."""
    pooling: Literal["mean", "cls"] = "mean"
    """Images: mean over patches (v1) or the CLS token (v2)."""
    freeze_feature_encoder: bool = True
    """Speech: the conv feature encoder never trains (fairseq feature_grad_mult 0)."""
    freeze_encoder_steps: int = 0
    """Speech: only the head trains for the first N updates."""
    mask_prob: float = 0.65
    """Speech: time-mask span start probability during fine-tuning (0 = off)."""
    mask_length: int = 10
    channel_mask_prob: float = 0.25
    """Speech: channel-mask probability during fine-tuning (0 = off)."""
    channel_mask_length: int = 64
    beam: int = 0
    """ASR evaluation: 0 = greedy; > 0 = prefix beam search of this width."""
    lm: str = ""
    """ASR: ARPA word LM for beam search; 'train' = a bigram written from the training words."""
    lm_weight: float = 0.5
    word_score: float = 0.0
    seed: int = 1
    eval_split: str = "valid"
    """Split scored during and after training (the summary's split)."""
    eval_every: int = 100
    """Validate (greedy decoding) every N updates, and always after the last one; 0 = only after
    the last one. The best score's weights are kept in RUN/checkpoints/best."""
    threads: int = 0
    """torch threads; 0 = the cores not already busy (data2vec.runtime.default_threads)."""
    device: str = "auto"
    """auto | cpu | cuda | mps (auto = CUDA when available, else CPU)."""


_RATE = fraction(upper_open=True)
FINETUNE_RULES = {
    "labeled_minutes": at_least(0), "label_fraction": fraction(lower_open=True),
    "max_labeled": at_least(0), "max_sample_size": at_least(0), "max_tokens": at_least(3),
    "batch_size": at_least(1), "max_steps": at_least(1), "lr": positive(),
    "weight_decay": at_least(0), "betas[0]": _RATE, "betas[1]": _RATE,
    "warmup_fraction": fraction(), "tri_stage[0]": fraction(), "tri_stage[1]": fraction(),
    "tri_stage[2]": fraction(), "final_lr_scale": fraction(lower_open=True),
    "clip_norm": at_least(0), "layer_decay": fraction(lower_open=True),
    "drop_path": rule(lambda v: v == -1 or 0 <= v < 1, "-1 (keep) or in [0, 1)"),
    "dropout": _RATE, "label_smoothing": _RATE, "mixup": at_least(0), "cutmix": at_least(0),
    "crop_scale[0]": fraction(lower_open=True), "crop_scale[1]": fraction(lower_open=True),
    "freeze_encoder_steps": at_least(0), "mask_prob": fraction(), "mask_length": at_least(1),
    "channel_mask_prob": fraction(), "channel_mask_length": at_least(1), "beam": at_least(0),
    "eval_every": at_least(0), "threads": at_least(0),
}
"""Range of every numeric FinetuneConfig field (the option names of ``data2vec finetune``)."""


def validate_finetune(ft: FinetuneConfig) -> None:
    """Every field finite and in range, then the ranges that involve two fields."""
    check_ranges(ft, FINETUNE_RULES, what="fine-tuning option")
    if sum(ft.tri_stage) > 1 + 1e-6:
        raise ConfigError(f"fine-tuning option 'tri_stage': {list(ft.tri_stage)} sums to more "
                          "than 1 (fractions of max_steps)")
    if ft.crop_scale[0] > ft.crop_scale[1]:
        raise ConfigError(f"fine-tuning option 'crop_scale': {list(ft.crop_scale)}, expected "
                          "low <= high")


# ---------------------------------------------------------------------------------- setup


def finetune_config(task: str, overrides: list[str] | None = None, **kwargs: Any) -> FinetuneConfig:
    """A validated FinetuneConfig from keyword values and dotted ``key=value`` overrides."""
    from data2vec.configlib import parse_overrides

    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of {', '.join(TASKS)}")
    values = {"task": task, **{k: v for k, v in kwargs.items() if v is not None}}
    values.update(parse_overrides(overrides or []))
    ft = from_dict(FinetuneConfig, {k: list(v) if isinstance(v, tuple) else v
                                    for k, v in values.items()})
    validate_finetune(ft)
    return ft


def load_backbone(ft: FinetuneConfig, model_overrides: list[str] | None = None):
    """(pre-training Config, Data2Vec model) for `ft.init`: a checkpoint's weights or a preset."""
    from data2vec.build import build_model
    from data2vec.loading import load_checkpoint

    modality = MODALITY[ft.task]
    if ft.init == "scratch":
        cfg = load_config(modality, ft.preset, ft.version, None, model_overrides)
        _sync_text(cfg)
        return cfg, build_model(cfg)
    # a joint multi-modal run gives the task's modality: its front-end + the shared encoder
    loaded = load_checkpoint(ft.init, overrides=model_overrides or (), modality=modality)
    if loaded.modality != modality:
        raise ConfigError(f"--init {ft.init} is a {loaded.modality} model; task {ft.task} "
                          f"needs {modality}")
    if loaded.task is not None:
        raise ConfigError(f"--init {ft.init} is already fine-tuned ({loaded.task}); start from a "
                          "pre-training run or an imported base model")
    model = loaded.network
    if ft.random_init:  # same architecture (and vocabulary), fresh weights from ft.seed
        return loaded.cfg, build_model(loaded.cfg)
    if ft.from_teacher:  # fairseq load_ema: the teacher's copy of what it tracks
        model._tracked().load_state_dict(model.teacher.model.state_dict())
    return loaded.cfg, model


def _sync_text(cfg: Config) -> None:
    """Text: the tokenizer fixes the vocabulary size of a model built from a preset."""
    if cfg.modality == "text":
        from data2vec.train.pretrain import prepare_data

        prepare_data(cfg)


def _tokenizer(cfg: Config):
    from data2vec.data.loader import load_or_train_tokenizer

    return load_or_train_tokenizer(cfg)


def data_root(cfg: Config, ft: FinetuneConfig) -> Path:
    """The labelled data directory: `ft.data`, else the modality's demo data."""
    from data2vec.data.loader import resolve_data_path

    if ft.data:
        return resolve_data_path(replace(cfg, data=replace(cfg.data, path=ft.data)))
    return resolve_data_path(replace(cfg, data=replace(cfg.data, path="")))


def load_split(ft: FinetuneConfig, cfg: Config, split: str, labels: dict[str, Any],
               tokenizer=None) -> data.Labelled:
    """One labelled split; `labels` carries the vocabulary / classes fixed at training time."""
    root = data_root(cfg, ft)
    if ft.task == "asr":
        return data.speech_asr(root, split, labels["vocab"], ft.max_sample_size)
    if ft.task == "audio-cls":
        return data.speech_tags(root, split, labels.get("classes"), ft.max_sample_size)
    if ft.task == "image-cls":
        from data2vec.data.images import NORM_STATS

        fe = cfg.model.frontend
        return data.image_folder(root, split, fe.image_size, fe.in_channels,
                                 NORM_STATS[cfg.data.image_norm], tuple(ft.crop_scale), ft.hflip)
    split_data = data.text_labelled(root, split, ft.glue, tokenizer,
                                    min(ft.max_tokens, cfg.model.frontend.max_positions),
                                    labels.get("classes"))
    return split_data


def low_label_subset(ft: FinetuneConfig, train: data.Labelled, sample_rate: int) -> data.Labelled:
    """The low-resource training subset the settings ask for."""
    if ft.task == "asr" and ft.labeled_minutes > 0:
        train = data.take(train, data.subset_by_duration(train.sizes, ft.labeled_minutes,
                                                         sample_rate, ft.seed))
    elif ft.label_fraction < 1.0:
        if ft.task in ("image-cls", "text-cls") and train.classes:
            keep = data.stratified_subset(train.targets, ft.label_fraction, ft.seed)
        else:
            rng = np.random.default_rng(derive_seed(ft.seed, 9))
            count = max(1, int(round(ft.label_fraction * len(train))))
            keep = sorted(rng.permutation(len(train))[:count].tolist())
        train = data.take(train, keep)
    if ft.max_labeled > 0 and len(train) > ft.max_labeled:
        rng = np.random.default_rng(derive_seed(ft.seed, 10))
        train = data.take(train, sorted(rng.permutation(len(train))[:ft.max_labeled].tolist()))
    return train


def build_finetune_model(ft: FinetuneConfig, cfg: Config, backbone: nn.Module,
                         num_outputs: int) -> FineTuneModel:
    """Wrap the backbone's front-end and encoder with the task head; apply freezing."""
    model = FineTuneModel(backbone.frontend, backbone.encoder, ft.task, num_outputs, ft.pooling,
                          ft.dropout, getattr(backbone, "alibi", None))
    if ft.drop_path >= 0:
        rates = torch.linspace(0, ft.drop_path, len(model.encoder.blocks)).tolist()
        for block, rate in zip(model.encoder.blocks, rates, strict=True):
            block.drop_path = _drop_path(rate)
    if MODALITY[ft.task] == "speech" and ft.freeze_feature_encoder:
        model.freeze_feature_encoder()
    if ft.linear_probe:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
        for norm in model.head.modules():  # a moving norm would make the batch statistics stale
            if isinstance(norm, nn.LayerNorm):
                norm.requires_grad_(False)
        model.frozen_encoder = True
        model.head[-1] = StandardizedLinear(model.head[-1])  # saved as the plain Linear
    return model


def _drop_path(rate: float) -> nn.Module:
    from data2vec.nn.layers import DropPath

    return DropPath(rate) if rate > 0 else nn.Identity()


# ---------------------------------------------------------------------------------- losses


def mix(batch: Batch, num_classes: int, ft: FinetuneConfig,
        gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mixup / CutMix with label smoothing -> (images, soft targets (B, C))."""
    x, y = batch.source, batch.target
    off = ft.label_smoothing / num_classes
    soft = F.one_hot(y, num_classes).float() * (1 - ft.label_smoothing) + off  # (B, C)
    if ft.mixup <= 0 and ft.cutmix <= 0:
        return x, soft
    use_cutmix = ft.cutmix > 0 and (ft.mixup <= 0 or torch.rand((), generator=gen) < 0.5)
    alpha = ft.cutmix if use_cutmix else ft.mixup
    lam = float(np.random.default_rng(int(torch.randint(2**31, (), generator=gen))).beta(
        alpha, alpha))
    flipped = x.flip(0)  # partner of row i is row B-1-i (timm's flip pairing)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = (int(torch.randint(h, (), generator=gen)), int(torch.randint(w, (),
                                                                              generator=gen)))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        x = x.clone()
        x[..., top:bottom, left:right] = flipped[..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (h * w)  # the area actually kept
    else:
        x = lam * x + (1 - lam) * flipped
    return x, lam * soft + (1 - lam) * soft.flip(0)


def task_loss(model: FineTuneModel, batch: Batch, ft: FinetuneConfig, num_outputs: int,
              gen: torch.Generator) -> Tensor:
    """The training loss of one batch (masks and mixing drawn from `gen`)."""
    if ft.task == "asr":
        return ctc_loss(model, batch, ft, gen)
    if ft.task == "image-cls":
        x, soft = mix(batch, num_outputs, ft, gen)
        logits, _ = model(x)
        return torch.sum(-soft * F.log_softmax(logits, -1), -1).mean()
    logits, _ = model(batch.source, batch.padding_mask)
    if ft.task == "audio-cls":
        return F.binary_cross_entropy_with_logits(logits, batch.target)
    if num_outputs == 1:  # regression (STS-B)
        return F.mse_loss(logits.squeeze(-1), batch.target.float())
    return F.cross_entropy(logits, batch.target, label_smoothing=ft.label_smoothing)


def ctc_loss(model: FineTuneModel, batch: Batch, ft: FinetuneConfig,
             gen: torch.Generator) -> Tensor:
    """CTC over letters with time and channel masking of the features (sum over the batch's
    utterances / B, fairseq ``sentence_avg``); infinite losses are zeroed."""
    from data2vec.modalities.speech import frame_padding_mask, span_mask

    mask = channels = None
    frontend = model.frontend
    if ft.mask_prob > 0 or ft.channel_mask_prob > 0:
        num_frames = int(ctc_frames(frontend, batch.source.shape[1]))
        padding = frame_padding_mask(batch.padding_mask, frontend.conv_layers, num_frames)
        device = batch.source.device  # masks are drawn on the CPU generator, used there
        if ft.mask_prob > 0:
            mask = span_mask(padding, (len(batch), num_frames), ft.mask_prob, ft.mask_length, 0,
                             gen).to(device)
        if ft.channel_mask_prob > 0:
            channels = channel_mask(len(batch), frontend.dim, ft.channel_mask_prob,
                                    ft.channel_mask_length, gen).to(device)
    logits, padding = model(batch.source, batch.padding_mask, mask, channels)  # (B, T, V)
    log_probs = F.log_softmax(logits.float(), -1).transpose(0, 1)  # (T, B, V)
    lengths = _frame_lengths(padding, logits)
    return F.ctc_loss(log_probs, batch.target, lengths, batch.target_lengths, blank=0,
                      reduction="sum", zero_infinity=True) / len(batch)


def ctc_frames(frontend: nn.Module, num_samples: int) -> int:
    """Frames the speech front-end makes from `num_samples` samples."""
    from data2vec.modalities.speech import frame_lengths

    return int(frame_lengths(torch.tensor([num_samples]), frontend.conv_layers)[0])


def _frame_lengths(padding: Tensor | None, logits: Tensor) -> Tensor:
    if padding is None:
        return torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
    return (~padding).sum(1)


# ---------------------------------------------------------------------------------- training


def _optimizer(model: FineTuneModel, ft: FinetuneConfig) -> tuple[torch.optim.AdamW, OptimConfig]:
    optim_cfg = OptimConfig(lr=ft.lr, betas=tuple(ft.betas), eps=1e-8,
                            weight_decay=ft.weight_decay, schedule=ft.schedule,
                            warmup_fraction=ft.warmup_fraction, tri_stage=tuple(ft.tri_stage),
                            final_lr_scale=ft.final_lr_scale, clip_norm=ft.clip_norm)
    scales = layer_decay_scales(model, ft.layer_decay) if ft.layer_decay != 1.0 else None
    groups = param_groups(model.named_parameters(), ft.weight_decay, scales)
    return torch.optim.AdamW(groups, lr=ft.lr, betas=tuple(ft.betas), eps=1e-8), optim_cfg


def labels_of(ft: FinetuneConfig, cfg: Config, tokenizer=None) -> dict[str, Any]:
    """The label set fixed at training time: CTC letters or class names."""
    if ft.task == "asr":
        root = data_root(cfg, ft)
        return {"vocab": ctc.Vocabulary.from_ltr(data.read_ltr(root, "train"))}
    train = load_split(ft, cfg, "train", {}, tokenizer)
    return {"classes": train.classes}


def train_step(model: FineTuneModel, optimizer: torch.optim.Optimizer, batch: Batch,
               ft: FinetuneConfig, optim_cfg: OptimConfig, step: int, num_outputs: int,
               gen: torch.Generator) -> dict[str, float]:
    """One update: (encoder frozen for the first freeze_encoder_steps) forward, backward, clip,
    lr, step."""
    model.train()
    model.frozen_encoder = ft.linear_probe or step < ft.freeze_encoder_steps
    if ft.linear_probe:  # frozen features are the eval-mode ones: no drop-path, no dropout
        model.frontend.eval()
        model.encoder.eval()
    loss = task_loss(model, batch, ft, num_outputs, gen)
    if not torch.isfinite(loss):
        raise TrainingError(f"non-finite fine-tuning loss at step {step + 1} (lr {ft.lr})")
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = ft.clip_norm if ft.clip_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    lr = lr_at(step, optim_cfg, ft.max_steps)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # frozen parts keep grad None: AdamW skips them
    return {"loss": float(loss.detach()), "lr": lr, "grad_norm": grad_norm}


def finetune(ft: FinetuneConfig, run_dir: Path, model_overrides: list[str] | None = None,
             progress: bool = True) -> dict[str, float]:
    """Fine-tune `ft` into `run_dir` (layout: :mod:`data2vec.finetune.runs`); returns the
    metrics of the last model on `ft.eval_split`, with train_examples, final_train_loss,
    train_seconds, eval_examples and the best validation score."""
    from data2vec.finetune.runs import FinetuneRun, main_metric
    from data2vec.runtime import set_threads
    from data2vec.train.distributed import pick_device

    validate_finetune(ft)  # also when built in Python, not through finetune_config
    device = pick_device(ft.device)
    set_threads(ft.threads)
    torch.manual_seed(ft.seed)
    cfg, backbone = load_backbone(ft, model_overrides)
    tokenizer = _tokenizer(cfg) if ft.task == "text-cls" else None
    labels = labels_of(ft, cfg, tokenizer)
    train = low_label_subset(ft, load_split(ft, cfg, "train", labels, tokenizer),
                             cfg.data.sample_rate)
    valid = load_split(ft, cfg, ft.eval_split, labels, tokenizer)
    num_outputs = _num_outputs(ft, labels)
    model = build_finetune_model(ft, cfg, backbone, num_outputs).to(device)
    optimizer, optim_cfg = _optimizer(model, ft)
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    stream = data.batches(train, ft.task, ft.batch_size, ft.seed, pad_id)
    gen = torch.Generator().manual_seed(derive_seed(ft.seed, 12))
    run = FinetuneRun(run_dir, ft.max_steps, main_metric(ft.task, ft.glue, labels.get("classes")),
                      progress, f"finetune {ft.task}")
    try:
        run.write_config(to_dict(ft), to_dict(cfg))
        if tokenizer is not None:
            tokenizer.save(Path(run_dir) / "tokenizer")
        log.info("finetune %s from %s: %d training and %d %s examples, %.2f M parameters "
                 "(%.2f M trained), device %s", ft.task, ft.init, len(train), len(valid),
                 ft.eval_split, sum(p.numel() for p in model.parameters()) / 1e6,
                 sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, device)
        greedy = replace(ft, beam=0, lm="")
        for step in range(ft.max_steps):
            batch = next(stream).to(device)
            run.step(step + 1, train_step(model, optimizer, batch, ft, optim_cfg, step,
                                          num_outputs, gen))
            done = step + 1
            if done < ft.max_steps and ft.eval_every > 0 and done % ft.eval_every == 0:
                scored = evaluate_split(model, greedy, cfg, labels, tokenizer, valid)
                if run.validation(done, ft.eval_split, scored.examples, scored.metrics):
                    _save(run_dir, model, cfg, ft, labels, len(train), done, best=True)
        final_ft = resolve_lm(ft, cfg, run_dir)
        scored = evaluate_split(model, final_ft, cfg, labels, tokenizer, valid)
        if run.validation(ft.max_steps, ft.eval_split, scored.examples, scored.metrics):
            _save(run_dir, model, cfg, ft, labels, len(train), ft.max_steps, best=True)
        last = _save(run_dir, model, cfg, ft, labels, len(train), ft.max_steps)
        log.info("checkpoint %s", last)
    except BaseException:
        run.close()
        raise
    result = {**scored.metrics, "train_examples": float(len(train)),
              "final_train_loss": run.final_train_loss,
              "train_seconds": time.perf_counter() - run.started,
              "eval_examples": float(scored.examples)}
    summary = {"task": ft.task, "split": ft.eval_split, "examples": scored.examples,
               "metrics": scored.metrics, "steps": ft.max_steps, "train_examples": len(train),
               "best_metric": run.metric, "best": run.best, "best_step": run.best_step,
               "final_train_loss": result["final_train_loss"],
               "train_seconds": result["train_seconds"], "run": str(run_dir)}
    run.finish(summary)
    from data2vec.finetune.runs import summary_line

    log.info("%s", summary_line(ft.task, summary))
    return result


def _num_outputs(ft: FinetuneConfig, labels: dict[str, Any]) -> int:
    from data2vec.loading import num_outputs

    return num_outputs(ft.task, labels)


def _save(run_dir: Path, model: FineTuneModel, cfg: Config, ft: FinetuneConfig,
          labels: dict[str, Any], num_train: int, step: int, best: bool = False) -> Path:
    """The last checkpoint (``checkpoints/step-N``, what ``latest`` names) or, with `best`,
    ``checkpoints/best``."""
    state = {"step": step, "config": to_dict(cfg), "finetune": to_dict(ft),
             "labels": {"vocab": labels["vocab"].symbols} if "vocab" in labels
             else {"classes": list(labels["classes"])}, "train_examples": num_train,
             "final_norm": model.use_final_norm}
    root = Path(run_dir) / "checkpoints"
    if best:
        return ckpt.write_checkpoint_dir(root / "best", model, state)
    return ckpt.save_checkpoint(root, step, model, state, keep_last=1)


# ---------------------------------------------------------------------------------- evaluation


def load_finetuned(path: Path) -> tuple[FineTuneModel, FinetuneConfig, Config, dict[str, Any],
                                        Any]:
    """(model, settings, pre-training config, labels, tokenizer) of a fine-tuned checkpoint."""
    from data2vec.loading import load_checkpoint

    loaded = load_checkpoint(path)
    if loaded.task is None:
        raise CheckpointError(f"{loaded.source} is not a fine-tuned checkpoint (no 'finetune' "
                              "settings); evaluate needs the output of 'data2vec finetune'")
    if loaded.task == "text-cls" and loaded.tokenizer is None:
        raise CheckpointError(f"{loaded.source}: no tokenizer beside this text model "
                              "(RUN/tokenizer/ with vocab.json + merges.txt)")
    return loaded.network, loaded.finetune, loaded.cfg, loaded.labels, loaded.tokenizer


@torch.no_grad()
def predict(model: FineTuneModel, split_data: data.Labelled, ft: FinetuneConfig,
            pad_id: int) -> tuple[list[Tensor], list[Any]]:
    """Outputs per example in order (CPU logits; asr: log-probs of the real frames), and the
    targets."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for batch in data.batches(split_data, ft.task, ft.batch_size, ft.seed, pad_id, train=False):
        batch = batch.to(device)
        logits, padding = model(batch.source, batch.padding_mask)
        if ft.task == "asr":
            lengths = _frame_lengths(padding, logits)
            outputs.extend((F.log_softmax(logits[b].float(), -1)[:int(lengths[b])].cpu())
                           for b in range(len(batch)))
        else:
            outputs.extend(logits.float().cpu())
    return outputs, split_data.targets


@dataclass
class Evaluation:
    """Metrics of one split, with one record per example (input, target, prediction)."""

    split: str
    examples: int
    metrics: dict[str, float]
    records: list[dict[str, Any]]


def evaluate_split(model: FineTuneModel, ft: FinetuneConfig, cfg: Config,
                   labels: dict[str, Any], tokenizer, split: str | data.Labelled) -> Evaluation:
    """Score `split` (a split name, or a split already loaded) with the task's metrics."""
    name = split if isinstance(split, str) else ft.eval_split
    split_data = load_split(ft, cfg, split, labels, tokenizer) if isinstance(split, str) else split
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    outputs, targets = predict(model, split_data, ft, pad_id)
    names = split_data.info.get("names") or [str(i) for i in range(len(split_data))]
    if ft.task == "asr":
        refs, hyps = decode_asr(outputs, split_data, labels["vocab"], ft)
        records = [{"index": i, "input": names[i], "reference": r, "hypothesis": h}
                   for i, (r, h) in enumerate(zip(refs, hyps, strict=True))]
        metrics_ = {"wer": metrics.word_error_rate(refs, hyps),
                    "cer": metrics.char_error_rate(refs, hyps)}
        return Evaluation(name, len(split_data), metrics_, records)
    logits = torch.stack(outputs).numpy()
    return Evaluation(name, len(split_data), _class_metrics(ft, labels, logits, targets),
                      _class_records(ft, labels, logits, targets, names))


def _class_metrics(ft: FinetuneConfig, labels: dict[str, Any], logits: np.ndarray,
                   targets: list[Any]) -> dict[str, float]:
    if ft.task == "audio-cls":
        truth = torch.stack(targets).numpy()
        return {"mAP": metrics.mean_average_precision(truth, logits),
                "accuracy": float(np.mean((logits > 0) == (truth > 0.5)))}
    if ft.task == "text-cls" and not labels.get("classes"):
        pred, truth = logits[:, 0], np.asarray(targets)
        return {"pearson": metrics.pearson(truth, pred), "spearman": metrics.spearman(truth, pred)}
    truth, pred = np.asarray(targets), logits.argmax(1)
    out = {"accuracy": metrics.accuracy(truth, pred)}
    if ft.task == "image-cls":
        out["top5"] = metrics.top_k_accuracy(truth, logits, 5)
    if ft.glue == "cola":
        out["mcc"] = metrics.matthews_corrcoef(truth, pred)
    if ft.glue in ("mrpc", "qqp"):
        out["f1"] = metrics.f1_binary(truth, pred)
    return out


def _class_records(ft: FinetuneConfig, labels: dict[str, Any], logits: np.ndarray,
                   targets: list[Any], names: list[str]) -> list[dict[str, Any]]:
    classes = list(labels.get("classes") or [])
    records = []
    for i, (row, target) in enumerate(zip(logits, targets, strict=True)):
        record: dict[str, Any] = {"index": i, "input": names[i]}
        if ft.task == "audio-cls":
            record["labels"] = [c for c, t in zip(classes, target.tolist(), strict=True) if t]
            record["predicted"] = [c for c, x in zip(classes, row, strict=True) if x > 0]
        elif not classes:  # regression
            record.update(target=float(target), predicted=float(row[0]))
        else:
            record.update(label=classes[int(target)], predicted=classes[int(row.argmax())])
        record["logits"] = [round(float(x), 5) for x in row]
        records.append(record)
    return records


def score(model: FineTuneModel, ft: FinetuneConfig, cfg: Config, labels: dict[str, Any],
          tokenizer, split: str) -> dict[str, float]:
    """The task's metrics on `split`."""
    return evaluate_split(model, ft, cfg, labels, tokenizer, split).metrics


def decode_asr(log_probs: list[Tensor], split_data: data.Labelled, vocab: ctc.Vocabulary,
               ft: FinetuneConfig) -> tuple[list[str], list[str]]:
    """(reference words, hypotheses) of greedy or beam-search (optionally LM) decoding."""
    refs = [ctc.ltr_to_words(t) for t in split_data.info["ltr"]]
    if ft.beam > 0:
        lm = ctc.NgramLM.from_arpa(Path(ft.lm)) if ft.lm else None
        hyps = [ctc.beam_search(lp, vocab, lm, ft.beam, ft.lm_weight, ft.word_score)
                for lp in log_probs]
    else:
        hyps = [vocab.to_words(ctc.greedy_decode(lp.unsqueeze(0))[0]) for lp in log_probs]
    return refs, hyps


def asr_metrics(log_probs: list[Tensor], split_data: data.Labelled, vocab: ctc.Vocabulary,
                ft: FinetuneConfig) -> dict[str, float]:
    """WER / CER of greedy or beam-search (optionally LM) decoding."""
    refs, hyps = decode_asr(log_probs, split_data, vocab, ft)
    return {"wer": metrics.word_error_rate(refs, hyps), "cer": metrics.char_error_rate(refs, hyps)}


def resolve_lm(ft: FinetuneConfig, cfg: Config, run_dir: Path) -> FinetuneConfig:
    """``lm=train``: write a bigram ARPA of the training transcripts into the run directory
    and point `ft.lm` at it; other settings are returned unchanged."""
    if ft.task != "asr" or ft.lm != "train":
        return ft
    words = [ctc.ltr_to_words(line) for line in data.read_ltr(data_root(cfg, ft), "train")]
    path = ctc.write_arpa(words, Path(run_dir) / "train.2gram.arpa", order=2)
    return replace(ft, lm=str(path))


def evaluate(path: Path, split: str = "test", overrides: list[str] | None = None,
             data_dir: str | None = None, predictions: Path | None = None) -> Evaluation:
    """Score a fine-tuned run / checkpoint on `split`; overrides change decoding settings
    (beam, lm, lm_weight, word_score, batch_size, threads, device); `predictions`: write one
    JSON line per example (input, target, prediction) there."""
    from data2vec.configlib import merge, parse_overrides
    from data2vec.runtime import set_threads
    from data2vec.train.distributed import pick_device

    model, ft, cfg, labels, tokenizer = load_finetuned(path)
    allowed = {"beam", "lm", "lm_weight", "word_score", "batch_size", "threads", "data",
               "device"}
    update = parse_overrides(overrides or [])
    if data_dir:
        update["data"] = data_dir
    bad = sorted(set(update) - allowed)
    if bad:
        raise ConfigError(f"evaluate: cannot change {bad}; allowed: {', '.join(sorted(allowed))}")
    ft = from_dict(FinetuneConfig, merge(to_dict(ft), update))
    ft = resolve_lm(ft, cfg, ckpt.find_checkpoint(Path(path)).parent.parent)
    set_threads(ft.threads)
    model.to(pick_device(ft.device))
    result = evaluate_split(model, ft, cfg, labels, tokenizer, split)
    if predictions is not None:
        predictions = Path(predictions)
        predictions.parent.mkdir(parents=True, exist_ok=True)
        predictions.write_text("".join(json.dumps(r) + "\n" for r in result.records))
    return result


__all__ = ["Evaluation", "FinetuneConfig", "build_finetune_model", "ctc_loss", "decode_asr",
           "evaluate", "evaluate_split", "finetune", "finetune_config", "labels_of",
           "load_backbone", "load_finetuned", "low_label_subset", "mix", "score", "task_loss",
           "train_step"]
