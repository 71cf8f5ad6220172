"""AdamW with the usual no-decay rule and the learning-rate schedules (cosine, tri-stage)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from data2vec.config import OptimConfig

# Parameters whose name contains one of these never get weight decay (ALiBi scales, tokens).
NO_DECAY_NAMES = ("alibi_scale", "cls_token", "mask_emb", "mask_token", "pos_embed",
                  "relative_position_bias_table")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights, every 1-D parameter and the named tokens/scales skip weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_NAMES)


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 lr_scale: dict[str, float] | None = None) -> list[dict]:
    """Split parameters into decay / no-decay groups (and by per-parameter lr scale if given)."""
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        decay = not no_weight_decay(name, p)
        scale = (lr_scale or {}).get(name, 1.0)
        group = groups.setdefault((decay, scale), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": scale})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    lr_scale: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW over the student's trainable parameters (the EMA teacher is excluded)."""
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("teacher.")]
    groups = param_groups(named, cfg.weight_decay, lr_scale)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def warmup_steps(cfg: OptimConfig, max_steps: int) -> int:
    """Warm-up length in updates: explicit, or a fraction of the run."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(round(cfg.warmup_fraction * max_steps))


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer update `step` (0-based)."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "tri_stage":
        return _tri_stage(step, cfg, max_steps)
    warm = warmup_steps(cfg, max_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, max_steps - warm))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _tri_stage(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warm-up from init_lr_scale·lr, hold, exponential decay to final_lr_scale·lr."""
    warm, hold, decay = (int(f * max_steps) for f in cfg.tri_stage)
    init, final = cfg.lr * cfg.init_lr_scale, cfg.lr * cfg.final_lr_scale
    if step < warm:
        return init + (cfg.lr - init) * step / max(1, warm)
    if step < warm + hold:
        return cfg.lr
    into = step - warm - hold
    if into < decay:
        return cfg.lr * math.exp(math.log(cfg.final_lr_scale) * into / max(1, decay))
    return final


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply `lr` to every group, times the group's own scale (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
