"""The EMA teacher: τ schedule and the in-place update, usable from any training loop."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def ema_decay(step: int, start: float, end: float, anneal_steps: int) -> float:
    """τ at update `step`: linear from `start` to `end` over `anneal_steps`, then `end`."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return start + (end - start) * step / anneal_steps


def _local(t: Tensor) -> Tensor:
    """The tensor itself, or a sharded (DTensor) parameter's local shard: the EMA is elementwise,
    so teacher and student sharded alike update shard by shard, with no communication."""
    return t.to_local() if hasattr(t, "to_local") else t


def _pairs(teacher: nn.Module, student: nn.Module) -> tuple[list[Tensor], list[Tensor],
                                                            list[Tensor], list[Tensor]]:
    """(teacher, student) tensors to average and (teacher, student) tensors to copy: parameters
    the student trains are averaged; fixed ones (sin-cos tables) and buffers are copied."""
    student_params = dict(student.named_parameters())
    student_buffers = dict(student.named_buffers())
    avg_t, avg_s, copy_t, copy_s = [], [], [], []
    for name, t in teacher.named_parameters():
        s = student_params[name]
        if s.requires_grad:
            avg_t.append(_local(t.detach()))
            avg_s.append(_local(s.detach()))
        else:
            copy_t.append(_local(t.detach()))
            copy_s.append(_local(s.detach()))
    for name, b in teacher.named_buffers():
        copy_t.append(_local(b))
        copy_s.append(_local(student_buffers[name]))
    return avg_t, avg_s, copy_t, copy_s


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher ← decay·teacher + (1 − decay)·student, for every parameter the student trains.

    Parameters the student does not train (fixed sin-cos tables) and buffers are copied.
    A decay ≥ 1 freezes the teacher. One ``torch._foreach_lerp_`` over all tensors instead of
    a Python loop of per-tensor ops (fewer dispatches; on a GPU, fewer kernel launches); the
    per-tensor form is the reference the tests hold it to.
    """
    if decay >= 1.0:
        return
    avg_t, avg_s, copy_t, copy_s = _pairs(teacher, student)
    if all(t.dtype == s.dtype and t.device == s.device for t, s in zip(avg_t, avg_s,
                                                                        strict=True)):
        torch._foreach_lerp_(avg_t, avg_s, 1.0 - decay)
    else:  # a student in another dtype than its teacher: cast tensor by tensor
        for t, s in zip(avg_t, avg_s, strict=True):
            t.lerp_(s.to(t.dtype), 1.0 - decay)
    if copy_t:
        torch._foreach_copy_(copy_t, copy_s)


def _low_precision_names(model: nn.Module) -> set[str]:
    """Names of the parameters autocast would cast to a low precision at every use: the weights
    and biases of linear and convolution layers (norms stay in fp32 under autocast)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    return {f"{prefix}.{n}" if prefix else n
            for prefix, m in model.named_modules() if isinstance(m, kinds)
            for n, _ in m.named_parameters(recurse=False)}


class EMATeacher(nn.Module):
    """A frozen copy of (part of) the student, updated by EMA, always in eval mode.

    Its parameters never require grad, so an optimizer built from the student's trainable
    parameters never sees them; they are in the state dict, so checkpoints carry the teacher.

    With :meth:`keep_cast_copy` (bf16 training), a second copy whose linear and conv weights are
    already in bf16 serves the forward under autocast, so the fp32 EMA weights are not cast again
    at every use; the EMA itself stays in fp32 and the copy is refreshed from it (after every
    update, and whenever the fp32 weights changed in place, e.g. a checkpoint was loaded).
    """

    def __init__(self, student_part: nn.Module, start: float, end: float,
                 anneal_steps: int) -> None:
        super().__init__()
        self.model = copy.deepcopy(student_part).requires_grad_(False)
        self.model.train(False)
        self.start, self.end, self.anneal_steps = start, end, anneal_steps
        # not submodules: never in the state dict, never moved by .to() (rebuilt when stale)
        self.__dict__["_cast"] = None
        self._cast_dtype: torch.dtype | None = None
        self._cast_versions: tuple[int, ...] = ()

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
        if self._cast_dtype is not None and tau < 1.0:
            self._refresh_cast()
        return tau

    # ----------------------------------------------------------- low-precision forward copy
    def keep_cast_copy(self, dtype: torch.dtype | None) -> None:
        """Serve forwards under ``torch.autocast(dtype=dtype)`` from a copy whose linear / conv
        weights are stored in `dtype`; None turns it off."""
        self._cast_dtype = dtype
        self.__dict__["_cast"] = None
        self._cast_versions = ()

    def _versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.model.parameters())

    def _refresh_cast(self) -> None:
        cast = self.__dict__["_cast"]
        if cast is None or cast[1][0][0].device != cast[1][0][1].device:  # new, or moved
            low = _low_precision_names(self.model)
            module = copy.deepcopy(self.model)
            for name, p in module.named_parameters():
                if name in low:
                    p.data = p.data.to(self._cast_dtype)
            masters = dict(self.model.named_parameters())
            pairs = [(masters[n], p) for n, p in module.named_parameters()]
            buffers = list(zip(self.model.buffers(), module.buffers(), strict=True))
            self.__dict__["_cast"] = cast = (module, pairs, buffers)
        _, pairs, buffers = cast
        with torch.no_grad():  # copy_ casts: one fused pass over all weights
            torch._foreach_copy_([c for _, c in pairs + buffers], [m for m, _ in pairs + buffers])
        self._cast_versions = self._versions()

    @property
    def forward_model(self) -> nn.Module:
        """The module to run the teacher's forward with: the low-precision copy under a matching
        autocast, else the fp32 EMA weights themselves."""
        dtype = self._cast_dtype
        if dtype is None:
            return self.model
        device = next(self.model.parameters()).device.type
        if not (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == dtype):
            return self.model
        if self.__dict__["_cast"] is None or self._cast_versions != self._versions():
            self._refresh_cast()
        return self.__dict__["_cast"][0]

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.forward_model(*args, **kwargs)
