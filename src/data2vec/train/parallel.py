"""Speed and scale options, applied to a built model from outside the model code.

In this order (torchtitan's): activation checkpointing of the student's blocks, ``torch.compile``
of every transformer block, then data parallelism — DDP (replicated weights) or FSDP2
(``fully_shard``: every block of the student and of the teacher, then the rest). None of them
changes what is computed: ``tests/test_speed_options.py`` holds each one equal to the plain
single-process step.

Example::

    model = parallelize(build_model(cfg), cfg, info)   # before the optimizer is built
"""

from __future__ import annotations

import logging
import types
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from data2vec.config import Config
from data2vec.nn.transformer import Block, TransformerEncoder
from data2vec.train.distributed import DistInfo, wrap_ddp

log = logging.getLogger("data2vec")


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # non-reentrant checkpointing restores the RNG state for the recomputation, so dropout
    # draws the same masks and the gradients equal those of the plain forward
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def checkpoint_activations(blocks: list[nn.Module]) -> None:
    """Keep only each block's input for the backward pass and recompute the rest: activation
    memory of a block drops to its input, for about one more forward of compute."""
    for block in blocks:
        block.forward = types.MethodType(_checkpointed_forward, block)


def compile_blocks(blocks: list[nn.Module], backend: str = "inductor") -> None:
    """``torch.compile`` each block (the repeated unit: one graph per distinct shape and mode,
    reused by every block)."""
    for block in blocks:
        block.compile(backend=backend)


def student_blocks(model: nn.Module) -> list[Block]:
    """The transformer blocks the student trains (everything outside ``teacher``)."""
    return [m for name, m in model.named_modules()
            if isinstance(m, Block) and not name.startswith("teacher.")]


def teacher_blocks(model: nn.Module) -> list[Block]:
    """The EMA teacher's transformer blocks."""
    return [m for name, m in model.named_modules()
            if isinstance(m, Block) and name.startswith("teacher.")]


def shard_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: shard every block of every transformer (student and teacher alike, so the EMA
    update pairs shard with shard), then the remaining parameters at the root. The teacher then
    runs under ``torch.no_grad`` (all-gathered weights must be ordinary tensors)."""
    from torch.distributed.fsdp import fully_shard

    # A block returns its feed-forward output as a view (nn.Linear on (B, T, D) reshapes its 2-D
    # result), and FSDP2 warns once per call that an in-place op on such a view would skip its
    # all-gather. Nothing edits a block's outputs in place (build_targets clones before adding;
    # tests/test_speed_options.py holds the sharded run's losses and weights equal to one
    # process's), so the warning only floods the log of every rank.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*Block\) returned a "
                            r"view tensor", category=UserWarning)
    for encoder in [m for m in model.modules() if isinstance(m, TransformerEncoder)]:
        for block in encoder.blocks:
            fully_shard(block)
    fully_shard(model)
    for part in [model, *getattr(model, "views", {}).values()]:  # a joint model's parts too
        if hasattr(part, "teacher_inference_mode"):
            part.teacher_inference_mode = False
    return model


def parallelize(model: nn.Module, cfg: Config, info: DistInfo) -> nn.Module:
    """Apply ``run.activation_checkpointing``, ``run.compile`` and the data-parallel strategy
    (``run.data_parallel``; nothing to do in one process) to `model`, already on its device;
    build the optimizer afterwards (FSDP2 replaces the parameters)."""
    run = cfg.run
    if run.activation_checkpointing:
        checkpoint_activations(student_blocks(model))
    if run.compile:
        compile_blocks(student_blocks(model) + teacher_blocks(model))
    if info.world_size == 1:
        return model
    if run.data_parallel == "fsdp":
        log.info("FSDP2: parameters, gradients and optimizer state sharded over %d ranks",
                 info.world_size)
        return shard_fsdp(model)
    # layer-drop skips blocks; a joint run's other modalities sit out every update
    joint = hasattr(model, "views")
    return wrap_ddp(model, info, find_unused=cfg.model.encoder.layerdrop > 0 or joint)


def use_teacher_cast_copy(model: nn.Module, cfg: Config) -> bool:
    """Keep the teacher's bf16 weight copy (see :class:`~data2vec.objective.ema.EMATeacher`) in
    bf16 runs that accumulate gradients: the teacher then runs ``optim.grad_accum`` times per
    EMA update, and the copy casts its weights once instead of at every micro-batch. With one
    micro-batch the copy casts exactly what autocast would (same bytes, once per update), so it
    can save nothing there and stays off. Never under
    FSDP2 (sharded weights are gathered block by block) or compile, nor in a joint model: its
    parts run the shared teacher through their own views, which a copy kept here would bypass
    (it would be refreshed at every update and never read)."""
    teacher = getattr(model, "teacher", None)
    joint = hasattr(model, "views")
    enable = (cfg.run.precision == "bf16" and cfg.optim.grad_accum > 1 and not cfg.run.compile
              and teacher is not None and not joint
              and not any(hasattr(p, "to_local") for p in model.parameters()))
    if teacher is not None:
        teacher.keep_cast_copy(torch.bfloat16 if enable else None)
    return enable
