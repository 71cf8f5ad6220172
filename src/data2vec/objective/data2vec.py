"""The data2vec 1.0 objective: EMA teacher targets regressed by the student at masked positions.

Knows nothing about waveforms, pixels or tokens: a :class:`~data2vec.modalities.base.FrontEnd`
turns the batch into transformer input.

Example (a user's own loop)::

    model = build_model(load_preset("speech", "tiny").model, "speech")
    out = model(batch)            # batch.mask: (B, frames) True = masked
    out.loss.backward(); opt.step(); model.ema_step(step)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data2vec.batch import Batch
from data2vec.modalities.base import FrontEnd
from data2vec.nn.transformer import EncoderOutput, TargetSource, TransformerEncoder
from data2vec.objective.ema import EMATeacher
from data2vec.objective.targets import LayerNorm, build_targets


@dataclass
class ObjectiveConfig:
    """Targets, loss and teacher of data2vec (both versions)."""

    top_k: int = 8
    """Average the target-layer outputs of the top K blocks."""
    layer_norm: LayerNorm = "instance"
    """Per-layer target norm: 'instance' (over time per channel), 'layer' (no params), 'none'."""
    final_norm: LayerNorm = "none"
    """Norm of the averaged target."""
    target_source: TargetSource = "ffn"
    """'ffn' = feed-forward output before dropout/residual/LN; 'block' = end of block."""
    loss_beta: float = 0.0
    """Smooth-L1 β; 0 = L2."""
    loss_scale: float | None = None
    """Per-position loss scale; None = 1/sqrt(D)."""
    head_layers: int = 1
    """Regression head: 1 = Linear(D, D); 2 = Linear(D, 2D) -> GELU -> Linear(2D, D) (text)."""
    ema_start: float = 0.999
    ema_end: float = 0.9999
    ema_anneal_steps: int = 30_000
    """τ rises linearly from ema_start to ema_end over this many optimizer updates."""
    ema_scope: Literal["encoder", "all", "context"] = "encoder"
    """What the teacher EMA-tracks: the transformer only (front-end shared with the student,
    v1 speech/text, v2 text) or the front-end too (v1 and v2 images); 'context' (v2 speech
    only): the front-end minus its local feature modules, fed the student's local features."""
    init_std: float = 0.02
    """Std of the BERT-style normal init of linear and embedding weights."""


def regression_loss(pred: Tensor, target: Tensor, beta: float, scale: float) -> Tensor:
    """Per-position loss (N,): Smooth-L1(β) or L2 (β = 0), summed over channels, times `scale`."""
    pred, target = pred.float(), target.float()
    if beta == 0:
        elementwise = F.mse_loss(pred, target, reduction="none")
    else:
        elementwise = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    return elementwise.sum(-1) * scale


def valid_count(valid: int | Tensor) -> int | Tensor:
    """A count of valid positions, at least 1, without a host sync when it is a tensor."""
    return valid.clamp_min(1) if isinstance(valid, Tensor) else max(valid, 1)


def feature_std(x: Tensor) -> Tensor:
    """Std of each channel over positions, averaged over channels (fairseq's ``target_var``)."""
    x = x.float().reshape(-1, x.shape[-1])
    if x.shape[0] < 2:
        return x.new_zeros(())
    return torch.sqrt(x.var(0) + 1e-6).mean()


def make_head(dim: int, layers: int) -> nn.Module:
    """The student's regression head."""
    if layers == 1:
        return nn.Linear(dim, dim)
    if layers == 2:
        return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
    raise ValueError(f"head_layers must be 1 or 2, got {layers}")


@dataclass
class Data2VecOutput:
    """loss = loss_sum / sample_size; the loop may instead divide loss_sum by a global count."""

    loss: Tensor
    loss_sum: Tensor
    sample_size: Tensor
    stats: dict[str, Tensor]


def init_bert_(module: nn.Module, std: float) -> None:
    """N(0, std) linear/embedding weights, zero biases, unit LayerNorm (BERT / fairseq init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                m.weight.data[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class StudentTeacher(nn.Module):
    """What every data2vec model shares: a student part mirrored by an EMA teacher.

    Subclasses set ``self.teacher`` and define ``_tracked`` (the student part the teacher mirrors).
    """

    teacher: EMATeacher
    teacher_inference_mode: bool = True
    """Run the teacher under ``torch.inference_mode`` (no version counters or view tracking);
    the training package turns it off where a wrapper needs ordinary tensors (FSDP2 all-gathers
    the sharded teacher's weights)."""

    def teacher_mode(self) -> contextlib.AbstractContextManager:
        """The autograd mode of every teacher forward."""
        return torch.inference_mode() if self.teacher_inference_mode else torch.no_grad()

    def _tracked(self) -> nn.Module:
        raise TypeError(f"{type(self).__name__} must define _tracked()")

    def reset_teacher(self) -> None:
        """Make the teacher an exact copy of the student (after loading student weights)."""
        student = self._tracked().state_dict()
        own = self.teacher.model.state_dict()
        self.teacher.model.load_state_dict({k: student[k] for k in own})

    @torch.no_grad()
    def ema_step(self, step: int) -> float:
        """EMA update after optimizer update `step` (call once per update, not per micro-batch)."""
        return self.teacher.update(self._tracked(), step)

    def student_parameters(self) -> list[nn.Parameter]:
        """What the optimizer should see: every trainable parameter outside the teacher."""
        return [p for n, p in self.named_parameters()
                if p.requires_grad and not n.startswith("teacher.")]


class Data2Vec(StudentTeacher):
    """data2vec 1.0: the student encodes the masked input, the EMA teacher the clean one."""

    version = 1

    def __init__(self, frontend: FrontEnd, encoder: TransformerEncoder,
                 cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.frontend = frontend
        self.encoder = encoder
        self.head = make_head(encoder.cfg.dim, cfg.head_layers)
        self.init_weights()
        self.teacher = EMATeacher(self._tracked(), cfg.ema_start, cfg.ema_end,
                                  cfg.ema_anneal_steps)

    def init_weights(self) -> None:
        """Generic init of the whole student, then the front-end's own."""
        init_bert_(self, self.cfg.init_std)
        self.frontend.init_weights()

    def _tracked(self) -> nn.Module:
        """The student part the teacher mirrors."""
        if self.cfg.ema_scope == "all":
            return nn.ModuleDict({"frontend": self.frontend, "encoder": self.encoder})
        return self.encoder

    def encode(self, source: Tensor, padding_mask: Tensor | None = None, mask: Tensor | None = None,
               collect_layers: int = 0) -> tuple[EncoderOutput, Tensor | None]:
        """Student features for downstream use: (EncoderOutput, padding mask), extra tokens kept."""
        x, padding_mask = self.frontend(source, padding_mask, mask)
        return self.encoder(x, padding_mask, collect_layers=collect_layers), padding_mask

    def forward(self, batch: Batch) -> Data2VecOutput:
        """Loss of one batch; ``batch.mask`` (B, T) True = masked must be set."""
        if batch.mask is None:
            raise ValueError("data2vec needs batch.mask (True = masked)")
        student_x, teacher_x, padding_mask = self._inputs(batch)
        prediction = self.encoder(student_x, padding_mask).x
        targets = self._targets(batch, teacher_x, padding_mask)
        return self._loss(prediction, targets, batch.mask, padding_mask)

    def _inputs(self, batch: Batch) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Student input (masked), teacher input (clean; None when the teacher has its own
        front-end) and the padding mask over transformer positions."""
        local, local_padding = self.frontend.local_features(batch.source, batch.padding_mask)
        if batch.student_source is not None:  # text: masking replaced token ids
            student_local, _ = self.frontend.local_features(batch.student_source,
                                                            batch.padding_mask)
        else:
            student_local = local
        student_x, padding_mask = self.frontend.contextualize(student_local, local_padding,
                                                              batch.mask)
        teacher_x = None
        if self.cfg.ema_scope == "encoder":
            with self.teacher_mode():
                teacher_x, _ = self.frontend.contextualize(local.detach(), local_padding, None)
        return student_x, teacher_x, padding_mask

    def _targets(self, batch: Batch, teacher_x: Tensor | None,
                 padding_mask: Tensor | None) -> Tensor:
        """(B, T, D) targets over the masked positions' grid (extra tokens removed)."""
        teacher = self.teacher.forward_model
        encoder = teacher["encoder"] if self.cfg.ema_scope == "all" else teacher
        with self.teacher_mode():
            if teacher_x is None:
                teacher_x, _ = teacher["frontend"](batch.source, batch.padding_mask)
            out = encoder(teacher_x, padding_mask, collect_layers=self.cfg.top_k,
                          target_source=self.cfg.target_source)
        n = self.frontend.num_extra_tokens
        layers = [y[:, n:] for y in out.layer_results]
        pad = padding_mask[:, n:] if padding_mask is not None else None
        # outside the teacher's mode: the targets are ordinary tensors the loss may save
        return build_targets(layers, self.cfg.top_k, self.cfg.layer_norm, self.cfg.final_norm, pad)

    def _loss(self, prediction: Tensor, targets: Tensor, mask: Tensor,
              padding_mask: Tensor | None) -> Data2VecOutput:
        n = self.frontend.num_extra_tokens
        prediction = prediction[:, n:]
        loss_mask = mask if padding_mask is None else mask & ~padding_mask[:, n:]
        pred = self.head(prediction[loss_mask])  # (N, D)
        target = targets[loss_mask]
        scale = self.cfg.loss_scale if self.cfg.loss_scale is not None else \
            1.0 / math.sqrt(pred.shape[-1])
        loss_sum = regression_loss(pred, target, self.cfg.loss_beta, scale).sum()
        sample_size = loss_mask.sum()
        valid = loss_mask.numel() if padding_mask is None else (~padding_mask[:, n:]).sum()
        stats = {
            "target_std": feature_std(target.detach()),
            "pred_std": feature_std(pred.detach()),
            "masked_fraction": sample_size.float() / valid_count(valid),
        }
        loss = loss_sum / sample_size.clamp_min(1)
        return Data2VecOutput(loss, loss_sum, sample_size, stats)
