"""data2vec 2.0: the student encodes only the visible steps, a conv decoder predicts the targets.

One training step (``forward``), with M = ``model.v2.clone_batch`` masked copies per example:

1. local features of the B examples (conv waveform encoder, patch embedding, token lookup);
2. teacher, once per example (B rows, no clones): targets = average of the normalised FFN outputs
   of its top-K blocks, then ``repeat_interleave(M)``;
3. student: local features repeated M times, masked steps zeroed, the front-end's positions added
   over the full length (speech: the conv positional encoder sees the zeroed frames), the visible
   steps gathered (``batch.mask`` has the same count in every row) with the extra tokens (CLS),
   ALiBi (speech) built from the visible steps' original positions, then the encoder;
4. decoder: the encoder output scattered back to full length, masked slots filled with
   N(0, ``mask_noise_std``) noise (no learned token, no positions), a conv decoder;
5. loss at masked positions only (plus the image CLS loss).

What the teacher EMA-tracks follows ``model.objective.ema_scope``: 'all' (images: front-end and
encoder, fed the raw input), 'context' (speech: positional conv, ALiBi scales, input norm and
blocks, fed the student's local features), 'encoder' (text: blocks only, fed the student's
front-end output).

Example::

    model = build_model(load_config("image", "tiny", version=2))
    out = model(batch)            # batch.mask: (B * clone_batch, N) True = masked
    out.loss.backward(); opt.step(); model.ema_step(step)
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data2vec.batch import Batch
from data2vec.errors import DataError
from data2vec.modalities.base import FrontEnd
from data2vec.nn.decoder import Decoder1d, Decoder2d, DecoderConfig
from data2vec.nn.transformer import EncoderOutput, TransformerEncoder
from data2vec.objective.data2vec import (
    Data2VecOutput,
    StudentTeacher,
    feature_std,
    init_bert_,
    regression_loss,
    valid_count,
)
from data2vec.objective.ema import EMATeacher
from data2vec.objective.targets import build_targets

if TYPE_CHECKING:  # data2vec.config imports the objective package
    from data2vec.config import ModelConfig


def alibi_slopes(num_heads: int) -> Tensor:
    """(H,) ALiBi slopes: 2^(-8(h+1)/H) for a power of two H; otherwise those of the nearest
    lower power of two followed by every other slope of the next one (Press et al.)."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(power_of_two(num_heads))
    lower = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(power_of_two(lower) + extra)


class AlibiBias(nn.Module):
    """ALiBi bias −scale_h·m_h·|i − j| with fixed slopes m_h and a learned per-head scale
    (init 1, clamped at 0), shared by all blocks."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.alibi_scale = nn.Parameter(torch.ones(num_heads))
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)

    def forward(self, positions: Tensor, num_extra: int = 0) -> Tensor:
        """positions (R, T') original step indices -> additive bias (R, H, n + T', n + T');
        the n extra tokens get no bias."""
        dist = (positions.unsqueeze(2) - positions.unsqueeze(1)).abs().float()  # (R, T', T')
        slope = self.slopes * self.alibi_scale.clamp_min(0)  # (H,)
        bias = -slope[None, :, None, None] * dist.unsqueeze(1)  # (R, H, T', T')
        return F.pad(bias, (num_extra, 0, num_extra, 0)) if num_extra else bias


def visible_ids(mask: Tensor) -> Tensor:
    """(R, T) True = masked -> (R, T_keep) indices of the visible steps, ascending; every row
    must keep the same number (the v2 data loader guarantees it)."""
    keep = (~mask).sum(1)
    if keep.numel() and not bool((keep == keep[0]).all()):
        raise DataError(f"data2vec 2.0 needs the same masked count in every row of batch.mask; "
                        f"visible counts range {int(keep.min())}..{int(keep.max())}")
    return (~mask).nonzero()[:, 1].view(mask.shape[0], -1)


def gather_steps(x: Tensor, ids: Tensor) -> Tensor:
    """x (R, T, ...) at ids (R, T') -> (R, T', ...)."""
    index = ids.view(*ids.shape, *([1] * (x.ndim - 2))).expand(*ids.shape, *x.shape[2:])
    return x.gather(1, index)


class Data2VecV2(StudentTeacher):
    """data2vec 2.0 model: student (front-end, encoder, decoder), EMA teacher; same API as v1."""

    version = 2

    def __init__(self, frontend: FrontEnd, encoder: TransformerEncoder, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.objective
        self.v2 = cfg.v2
        self.frontend = frontend
        self.encoder = encoder
        self.alibi = AlibiBias(encoder.cfg.num_heads) if cfg.v2.alibi else None
        v2 = cfg.v2
        dec = DecoderConfig(v2.decoder_dim, v2.decoder_layers, v2.decoder_kernel,
                            v2.decoder_groups, v2.decoder_residual, v2.decoder_projection_layers)
        grid = getattr(frontend, "grid", None)
        self.decoder = (Decoder2d(dec, encoder.cfg.dim, grid) if grid is not None
                        else Decoder1d(dec, encoder.cfg.dim))
        self.decoder_input_dropout = nn.Dropout(v2.decoder_input_dropout)
        self.noise_generator: torch.Generator | None = None
        """Draws the decoder's mask noise; None = torch's global generator (seeded by the run)."""
        self.init_weights()
        self._freeze_mask_embeddings()
        self.teacher = EMATeacher(self._teacher_copy(), self.cfg.ema_start, self.cfg.ema_end,
                                  self.cfg.ema_anneal_steps)

    # ------------------------------------------------------------------ construction, EMA

    def init_weights(self) -> None:
        """BERT init of the student, the front-end's own, PyTorch default for the decoder."""
        init_bert_(self, self.cfg.init_std)
        self.frontend.init_weights()
        self.decoder.reset_parameters()

    def _freeze_mask_embeddings(self) -> None:
        # v2 drops masked steps: a v1 mask embedding would get no gradient (and trip DDP).
        for name in ("mask_emb", "mask_token"):
            param = getattr(self.frontend, name, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(False)

    def _tracked(self) -> nn.ModuleDict:
        """The student parts the teacher mirrors (see the module docstring)."""
        parts: dict[str, nn.Module] = {"encoder": self.encoder}
        if self.alibi is not None:
            parts["alibi"] = self.alibi
        if self.cfg.ema_scope != "encoder":
            parts["frontend"] = self.frontend
        return nn.ModuleDict(parts)

    def _teacher_copy(self) -> nn.ModuleDict:
        part = copy.deepcopy(self._tracked())
        if self.cfg.ema_scope == "context":  # fed the student's local features: no own copy
            for name in self.frontend.local_modules:
                setattr(part["frontend"], name, None)
        return part

    # ------------------------------------------------------------------------- encoding

    def encode(self, source: Tensor, padding_mask: Tensor | None = None, mask: Tensor | None = None,
               collect_layers: int = 0) -> tuple[EncoderOutput, Tensor | None]:
        """Student features for downstream use: (EncoderOutput, padding mask), extra tokens kept.

        With ``mask`` (R, T), only the visible steps are encoded (R must be B·k for some k)."""
        local, pad = self.frontend.local_features(source, padding_mask)
        if mask is not None:
            return self.encode_visible(local, pad, mask, collect_layers)
        x, pad = self.frontend.contextualize(local, pad, None)
        bias = self._full_alibi(local.shape[1], x.device)
        return self.encoder(x, pad, bias, collect_layers=collect_layers), pad

    def _full_alibi(self, length: int, device: torch.device) -> Tensor | None:
        if self.alibi is None:
            return None
        steps = torch.arange(length, device=device).unsqueeze(0)  # (1, T)
        return self.alibi(steps, self.frontend.num_extra_tokens)  # (1, H, n + T, n + T)

    def encode_visible(self, local: Tensor, padding_mask: Tensor | None, mask: Tensor,
                       collect_layers: int = 0) -> tuple[EncoderOutput, Tensor | None]:
        """The student on local features (B, T, D) and a mask (B·M, T) True = masked: the
        encoder output over [extra tokens + visible steps] (B·M, n + T_keep, D), its padding."""
        rows, length = mask.shape
        if rows % local.shape[0] or length != local.shape[1]:
            raise DataError(f"batch.mask has shape {tuple(mask.shape)}; expected "
                            f"(B * clone_batch, {local.shape[1]}) with B = {local.shape[0]}")
        clones = rows // local.shape[0]
        x = local.repeat_interleave(clones, 0).masked_fill(mask.unsqueeze(-1), 0.0)  # (R, T, D)
        pad = padding_mask.repeat_interleave(clones, 0) if padding_mask is not None else None
        # Positions over the full length (speech: the pos conv sees zeros at masked frames).
        x, pad = self.frontend.contextualize(x, pad, None)  # (R, n + T, D)
        n = self.frontend.num_extra_tokens
        ids = visible_ids(mask)  # (R, T_keep)
        x = torch.cat([x[:, :n], gather_steps(x[:, n:], ids)], dim=1)  # (R, n + T_keep, D)
        if pad is not None:
            pad = torch.cat([pad[:, :n], gather_steps(pad[:, n:], ids)], dim=1)
        bias = self.alibi(ids, n) if self.alibi is not None else None
        return self.encoder(x, pad, bias, collect_layers=collect_layers), pad

    # -------------------------------------------------------------------------- training

    def forward(self, batch: Batch) -> Data2VecOutput:
        """Loss of one batch; ``batch.mask`` (B·M, T) True = masked, equal counts per row."""
        if batch.mask is None:
            raise ValueError("data2vec 2.0 needs batch.mask (B * clone_batch rows, True = masked)")
        local, pad = self.frontend.local_features(batch.source, batch.padding_mask)  # (B, T, D)
        targets = self._targets(batch, local, pad)  # (B, T, D)
        out, _ = self.encode_visible(local, pad, batch.mask)
        prediction = self.decode(out.x, batch.mask)  # (B·M, T, D)
        clones = batch.mask.shape[0] // local.shape[0]
        targets = targets.repeat_interleave(clones, 0)  # (B·M, T, D): repeated, not recomputed
        row_pad = pad.repeat_interleave(clones, 0) if pad is not None else None
        result = self._loss(prediction, targets, batch.mask, row_pad)
        if self.v2.cls_loss > 0 and self.frontend.num_extra_tokens:
            cls = self.cls_loss(out.x[:, 0], targets, row_pad) * result.sample_size
            loss_sum = result.loss_sum + cls
            result = Data2VecOutput(loss_sum / result.sample_size.clamp_min(1), loss_sum,
                                    result.sample_size, result.stats)
        return result

    def decode(self, x: Tensor, mask: Tensor) -> Tensor:
        """Encoder output (R, n + T_keep, D) -> predictions (R, T, D): visible steps scattered
        back to their places, masked ones N(0, mask_noise_std) noise, then the conv decoder."""
        visible = self.decoder_input_dropout(x[:, self.frontend.num_extra_tokens:])
        rows, length = mask.shape
        noise = torch.randn(rows, length, visible.shape[-1], generator=self.noise_generator,
                            device=visible.device, dtype=visible.dtype)  # (R, T, D)
        ids = visible_ids(mask)
        index = ids.unsqueeze(-1).expand(-1, -1, visible.shape[-1])
        full = (noise * self.v2.mask_noise_std).scatter(1, index, visible)  # (R, T, D)
        return self.decoder(full)

    def _targets(self, batch: Batch, local: Tensor, pad: Tensor | None) -> Tensor:
        """(B, T, D) targets: one teacher pass per example, extra tokens removed."""
        teacher = self.teacher.forward_model
        with self.teacher_mode():
            if self.cfg.ema_scope == "all":
                x, tpad = teacher["frontend"](batch.source, batch.padding_mask)
            elif self.cfg.ema_scope == "context":
                x, tpad = teacher["frontend"].contextualize(local.detach(), pad, None)
            else:
                x, tpad = self.frontend.contextualize(local.detach(), pad, None)
            bias = None
            if "alibi" in teacher:
                steps = torch.arange(local.shape[1], device=x.device).unsqueeze(0)
                bias = teacher["alibi"](steps, self.frontend.num_extra_tokens)
            out = teacher["encoder"](x, tpad, bias, collect_layers=self.cfg.top_k,
                                     target_source=self.cfg.target_source)
        n = self.frontend.num_extra_tokens
        layers = [y[:, n:] for y in out.layer_results]
        # outside the teacher's mode: the targets are ordinary tensors the loss may save
        return build_targets(layers, self.cfg.top_k, self.cfg.layer_norm, self.cfg.final_norm,
                             pad)

    def _scale(self, dim: int) -> float:
        return self.cfg.loss_scale if self.cfg.loss_scale is not None else 1.0 / math.sqrt(dim)

    def cls_loss(self, cls_pred: Tensor, targets: Tensor, padding_mask: Tensor | None) -> Tensor:
        """v2 images: weight · Σ_rows loss(student CLS output, mean-over-patches target)."""
        if padding_mask is None:
            cls_target = targets.mean(1)  # (R, D)
        else:
            keep = (~padding_mask).unsqueeze(-1).to(targets.dtype)
            cls_target = (targets * keep).sum(1) / keep.sum(1).clamp_min(1)
        per_row = regression_loss(cls_pred, cls_target, self.cfg.loss_beta,
                                  self._scale(cls_pred.shape[-1]))
        return self.v2.cls_loss * per_row.sum()

    def _loss(self, prediction: Tensor, targets: Tensor, mask: Tensor,
              padding_mask: Tensor | None) -> Data2VecOutput:
        loss_mask = mask if padding_mask is None else mask & ~padding_mask
        pred, target = prediction[loss_mask], targets[loss_mask]  # (N, D)
        loss_sum = regression_loss(pred, target, self.cfg.loss_beta,
                                   self._scale(pred.shape[-1])).sum()
        sample_size = loss_mask.sum()
        valid = loss_mask.numel() if padding_mask is None else (~padding_mask).sum()
        stats = {
            "target_std": feature_std(target.detach()),
            "pred_std": feature_std(pred.detach()),
            "masked_fraction": sample_size.float() / valid_count(valid),
        }
        return Data2VecOutput(loss_sum / sample_size.clamp_min(1), loss_sum, sample_size, stats)


__all__ = ["AlibiBias", "Data2VecV2", "alibi_slopes", "gather_steps", "visible_ids"]
