"""Task heads on our encoder (front-end + transformer), freezing, fine-tuning masks, layer decay.

One wrapper, :class:`FineTuneModel`, holds ``frontend``, ``encoder`` and a ``head``; the task
decides how the encoder output reaches the head:

- ``asr``: every frame -> Linear(D, letters) (CTC); time masking with the front-end's mask
  embedding and channel masking of the features during training (wav2vec 2.0 fine-tuning).
- ``image-cls``: mean over patch tokens (v1; CLS excluded) or the CLS token (v2) -> LayerNorm ->
  Linear (MAE / data2vec 2.0 ``fc_norm`` + ``head``).
- ``text-cls``: the ``<s>`` token -> dense -> tanh -> dropout -> out_proj (RoBERTa head); one
  output = regression (STS-B).
- ``audio-cls``: mean over real frames -> Linear, one logit per class (multi-label, BCE).

Example::

    model = FineTuneModel(pretrained.frontend, pretrained.encoder, "image-cls", num_outputs=10)
    logits = model(batch.source, batch.padding_mask)          # (B, 10)
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import Tensor, nn

from data2vec.modalities.base import FrontEnd
from data2vec.nn.transformer import TransformerEncoder

Task = Literal["asr", "image-cls", "text-cls", "audio-cls"]
TASKS: tuple[str, ...] = ("asr", "image-cls", "text-cls", "audio-cls")
Pooling = Literal["mean", "cls"]


def channel_mask(batch: int, channels: int, mask_prob: float, mask_length: int,
                 generator: torch.Generator) -> Tensor:
    """(B, C) True = masked channel: per row int(p·C/len + U[0, 1)) spans of `mask_length`
    channels at uniform starts (wav2vec 2.0 ``mask_channel_*``, spans may overlap)."""
    length = min(mask_length, channels)
    noise = torch.rand(batch, generator=generator, dtype=torch.float64)
    num = (mask_prob * channels / length + noise).floor().long()  # (B,)
    starts = torch.randint(channels - length + 1, (batch, int(num.max()) if batch else 0),
                           generator=generator)  # (B, max spans)
    steps = torch.arange(channels)
    mask = torch.zeros(batch, channels, dtype=torch.bool)
    for j in range(starts.shape[1]):
        active = (j < num).unsqueeze(1)  # (B, 1): row b draws num[b] spans
        inside = (steps >= starts[:, j:j + 1]) & (steps < starts[:, j:j + 1] + length)
        mask |= inside & active
    return mask


def make_head(task: Task, dim: int, num_outputs: int, dropout: float,
              norm_eps: float = 1e-6) -> nn.Module:
    """The task's head on D-dim features (`norm_eps`: the image fc_norm's, the encoder's)."""
    if task == "image-cls":
        head = nn.Sequential(nn.LayerNorm(dim, eps=norm_eps), nn.Linear(dim, num_outputs))
        nn.init.trunc_normal_(head[1].weight, std=0.02)  # MAE: trunc-normal, zero bias
        nn.init.zeros_(head[1].bias)
        return head
    if task == "text-cls":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, dim), nn.Tanh(),
                             nn.Dropout(dropout), nn.Linear(dim, num_outputs))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_outputs))


class FineTuneModel(nn.Module):
    """Front-end + transformer + task head; see the module docstring for the per-task pooling.

    ``freeze_frontend_features``: the speech conv feature encoder gets no gradient (fairseq
    ``feature_grad_mult 0``). ``frozen_encoder``: the whole front-end and transformer run without
    gradient (linear probing; the first ``freeze_encoder_steps`` of speech fine-tuning).
    """

    def __init__(self, frontend: FrontEnd, encoder: TransformerEncoder, task: Task,
                 num_outputs: int, pooling: Pooling = "mean", dropout: float = 0.0,
                 alibi: nn.Module | None = None, final_norm: bool | None = None) -> None:
        super().__init__()
        self.frontend, self.encoder, self.task, self.pooling = frontend, encoder, task, pooling
        self.alibi = alibi
        if final_norm is None:  # BEiT / data2vec 1.0: mean pooling replaces the final norm
            final_norm = not (task == "image-cls" and pooling == "mean")
        self.use_final_norm = final_norm
        """Whether the encoder's final LayerNorm (pre-LN image models) runs before the head.
        Image classification with mean pooling skips it, as BEiT's fine-tuning (``norm`` =
        Identity, ``fc_norm`` on the mean) and HF's Data2VecVisionForImageClassification do;
        runs fine-tuned before this rule (state without ``final_norm``) keep it."""
        """data2vec 2.0 speech: the pre-trained ALiBi bias (learned per-head scales), which the
        encoder was trained with and keeps using (and fine-tuning) here, as fairseq does."""
        # fc_norm shares the encoder's epsilon (1e-6 in every image preset), as HF's pooler does
        self.head = make_head(task, frontend.dim, num_outputs, dropout, encoder.cfg.norm_eps)
        self.frozen_encoder = False

    def freeze_feature_encoder(self) -> None:
        """No gradient for the speech conv feature encoder (the rest of the front-end trains)."""
        for p in getattr(self.frontend, "feature_encoder", nn.Module()).parameters():
            p.requires_grad_(False)

    def features(self, source: Tensor, padding_mask: Tensor | None = None,
                 mask: Tensor | None = None,
                 channels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Encoder output (B, T', D) and its padding mask; `mask` (B, T) True = masked frames,
        `channels` (B, D) True = channel zeroed in the front-end features."""
        grad = contextlib.nullcontext() if not self.frozen_encoder else torch.no_grad()
        with grad:
            local, padding = self.frontend.local_features(source, padding_mask)  # (B, T, D)
            if channels is not None:
                local = local.masked_fill(channels.unsqueeze(1), 0.0)
            x, padding = self.frontend.contextualize(local, padding, mask)
            bias = self._alibi_bias(local.shape[1], x.device)
            if self.use_final_norm:
                return self.encoder(x, padding, bias).x, padding
            out = self.encoder(x, padding, bias, collect_layers=1, target_source="block")
            return out.layer_results[-1], padding  # the last block, before the final norm

    def _alibi_bias(self, length: int, device: torch.device) -> Tensor | None:
        if self.alibi is None:
            return None
        steps = torch.arange(length, device=device).unsqueeze(0)  # (1, T)
        return self.alibi(steps, self.frontend.num_extra_tokens)  # (1, H, n + T, n + T)

    def pool(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        """(B, T', D) -> (B, D): the task's summary of a sequence."""
        extra = self.frontend.num_extra_tokens
        if self.task == "text-cls" or (self.pooling == "cls" and extra > 0):
            return x[:, 0]  # <s> / CLS
        x = x[:, extra:]
        if padding_mask is None:
            return x.mean(1)
        keep = (~padding_mask[:, extra:]).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)

    def forward(self, source: Tensor, padding_mask: Tensor | None = None,
                mask: Tensor | None = None,
                channels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """asr: per-frame logits (B, T, V) and the frame padding mask; else (B, C) and None."""
        x, padding = self.features(source, padding_mask, mask, channels)
        if self.task == "asr":
            return self.head(x), padding
        return self.head(self.pool(x, padding)), None


class StandardizedLinear(nn.Module):
    """A Linear layer on batch-standardised inputs: BatchNorm without affine parameters before the
    classifier, MAE's linear-probe recipe (frozen features share a large common offset, so a
    plain head trained by SGD barely moves in a few hundred updates). Running statistics are the
    average over every training batch (``momentum=None``). In eval mode the layer *is* a plain
    Linear, ``W' = W / s``, ``b' = b − W' μ``, and that is how it is saved: a checkpoint holds
    ``weight`` and ``bias`` under this layer's name, so it loads into the plain head.
    """

    def __init__(self, linear: nn.Linear, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(linear.in_features, eps=eps, affine=False, momentum=None)
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., D) -> (..., C); statistics over every leading position."""
        flat = self.norm(x.reshape(-1, x.shape[-1]))  # (N, D)
        return self.linear(flat.reshape(x.shape))

    def folded(self) -> tuple[Tensor, Tensor]:
        """(weight, bias) of the plain Linear this layer equals in eval mode."""
        scale = torch.rsqrt(self.norm.running_var + self.norm.eps)  # (D,)
        weight = self.linear.weight * scale  # (C, D)
        return weight, self.linear.bias - weight @ self.norm.running_mean

    def _save_to_state_dict(self, destination, prefix: str, keep_vars: bool) -> None:
        weight, bias = self.folded()
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        destination[prefix + "bias"] = bias if keep_vars else bias.detach()


def layer_decay_scales(model: FineTuneModel, decay: float) -> dict[str, float]:
    """Per-parameter lr multipliers (BEiT layer-wise decay over depth n):

    front-end (embeddings) and the encoder's input norm -> decay^(n+1); block i -> decay^(n−i);
    everything after the blocks (final norm, shared relative position bias, head) -> 1.
    decay = 1 gives every parameter 1.
    """
    depth = len(model.encoder.blocks)
    scales = {}
    for name, _ in model.named_parameters():
        if name.startswith("frontend.") or name.startswith("encoder.input_norm."):
            layer = 0
        elif name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        else:
            layer = depth + 1
        scales[name] = decay ** (depth + 1 - layer)
    return scales


__all__ = ["TASKS", "FineTuneModel", "Pooling", "StandardizedLinear", "Task", "channel_mask",
           "layer_decay_scales", "make_head"]
