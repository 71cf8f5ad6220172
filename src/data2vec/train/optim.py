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


FUSED_DEVICES = ("cpu", "cuda")


def can_fuse(params: Iterable[torch.Tensor]) -> bool:
    """torch's fused AdamW applies: floating-point parameters on the CPU or a CUDA GPU."""
    params = list(params)
    return bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point()
                                for p in params)


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
          fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters) where torch has it, else foreach.

    On CPU torch's default is the per-tensor loop, with one temporary per tensor per op for the
    allocator to pay for; the fused kernel makes one pass (1.01x on the image Base v1 fp32
    update, ``benchmarks/results/speed.json``'s ablation rows: within noise there). The three
    give the same update up to rounding (``tests/test_speed_options.py``). ``fused=None``:
    fused when possible."""
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = can_fuse(params)
    kind = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kind)


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    lr_scale: dict[str, float] | None = None,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the student's trainable parameters (the EMA teacher is excluded)."""
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("teacher.")]
    groups = param_groups(named, cfg.weight_decay, lr_scale)
    return adamw(groups, cfg.lr, tuple(cfg.betas), cfg.eps, fused)


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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def scale_and_clip_grads_(params: Iterable[nn.Parameter], divide_by: torch.Tensor,
                          max_norm: float) -> torch.Tensor:
    """Divide every gradient by `divide_by`, then clip the global norm to `max_norm` (inf = no
    clipping), in one foreach norm and one foreach multiply; returns the norm after the
    division and before clipping (what ``clip_grad_norm_`` reports), as a tensor (no host sync).

    Sharded gradients (FSDP2 DTensors) are normed over their local shards and the squares summed
    over ranks; replicated ones (DDP, one process) need no communication.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=divide_by.device)
    sharded = any(hasattr(g, "to_local") for g in grads)
    local = [_local(g) for g in grads]
    squares = torch.stack(torch._foreach_norm(local)).float().square().sum()
    if sharded:
        from data2vec.train.distributed import all_reduce_sum

        squares = all_reduce_sum(squares)
    norm = squares.sqrt() / divide_by
    # torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6), at most 1
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0) if math.isfinite(max_norm) else 1.0
    torch._foreach_mul_(local, scale / divide_by)
    return norm
