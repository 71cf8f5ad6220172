"""The EMA teacher: τ schedule and the in-place update, usable from any training loop."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(step: int, start: float, end: float, anneal_steps: int) -> float:
    """τ at update `step`: linear from `start` to `end` over `anneal_steps`, then `end`."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return start + (end - start) * step / anneal_steps


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher ← decay·teacher + (1 − decay)·student, parameter by parameter.

    Parameters the student does not train (fixed sin-cos tables) and buffers are copied.
    A decay ≥ 1 freezes the teacher.
    """
    if decay >= 1.0:
        return
    student_params = dict(student.named_parameters())
    for name, t in teacher.named_parameters():
        s = student_params[name]
        if s.requires_grad:
            t.lerp_(s.detach().to(t.dtype), 1.0 - decay)
        else:
            t.copy_(s)
    student_buffers = dict(student.named_buffers())
    for name, b in teacher.named_buffers():
        b.copy_(student_buffers[name])


class EMATeacher(nn.Module):
    """A frozen copy of (part of) the student, updated by EMA, always in eval mode.

    Its parameters never require grad, so an optimizer built from the student's trainable
    parameters never sees them; they are in the state dict, so checkpoints carry the teacher.
    """

    def __init__(self, student_part: nn.Module, start: float, end: float,
                 anneal_steps: int) -> None:
        super().__init__()
        self.model = copy.deepcopy(student_part).requires_grad_(False)
        self.model.train(False)
        self.start, self.end, self.anneal_steps = start, end, anneal_steps

    def train(self, mode: bool = True) -> EMATeacher:
        """The teacher stays in eval mode whatever the student does (no dropout, no layer-drop)."""
        return super().train(False)

    def decay(self, step: int) -> float:
        """τ at optimizer update `step`."""
        return ema_decay(step, self.start, self.end, self.anneal_steps)

    def update(self, student_part: nn.Module, step: int) -> float:
        """One EMA step after optimizer update `step`; returns the τ used."""
        tau = self.decay(step)
        ema_update(self.model, student_part, tau)
        return tau

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.model(*args, **kwargs)
