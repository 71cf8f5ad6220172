"""Speech front-end of data2vec 1.0: conv waveform encoder, conv positional encoder, span masking.

Raw 16 kHz waveform (B, S) -> conv feature encoder (B, T, C) at 50 Hz -> LayerNorm(C) ->
Linear(C, D) (``local_features``, shared by student and teacher) -> masked frames replaced by a
learned ``mask_emb`` -> ``x + pos_conv(x)`` (``contextualize``). The transformer then applies its
input LayerNorm (wav2vec 2.0 ``encoder.layer_norm``) before the blocks.

The layout follows HuggingFace ``Data2VecAudioModel`` one to one (feature encoder conv layers with a
LayerNorm each, feature projection = LayerNorm + Linear, ``pos_conv_embed`` of several grouped
convs), so its weights map onto these modules. One deliberate difference: padded frames are zeroed
before *every* positional conv layer, not only the first, so a padded batch gives exactly the
outputs of its utterances run alone; on unpadded input the two agree.

Example::

    cfg = SpeechFrontEndConfig()
    frontend = build_frontend(cfg, dim=768)
    x, frame_padding = frontend(wave, sample_padding)       # (B, T, 768), (B, T)
    mask = span_mask(frame_padding, x.shape[:2], 0.65, 10, 1, torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data2vec.errors import ConfigError, DataError
from data2vec.modalities.base import FrontEnd

ConvLayerSpec = tuple[int, int, int]
"""(channels, kernel, stride) of one conv layer of the feature encoder."""

PAPER_CONV_SPEC = "[(512,10,5)] + [(512,3,2)]*4 + [(512,2,2)]*2"
_MAX_CONV_LAYERS = 64


# ----------------------------------------------------------------------------------- configs

PosConvPadding = Literal["every_layer", "input", "none"]


@dataclass
class SpeechFrontEndConfig:
    """The conv waveform encoder and the conv positional encoder (data2vec 1.0 speech)."""

    conv_spec: str = PAPER_CONV_SPEC
    """Feature encoder layers as (channels, kernel, stride) lists joined by '+', with '*N' repeats;
    the paper's 7 layers give a stride of 320 samples (20 ms frames at 16 kHz)."""
    extractor_mode: Literal["layer_norm", "group_norm"] = "layer_norm"
    """'layer_norm': LayerNorm over channels after every conv (data2vec); 'group_norm': per-channel
    GroupNorm over time after the first conv only (wav2vec 2.0 Base; not padding-invariant)."""
    conv_bias: bool = False
    """Bias in the feature encoder convs."""
    pos_conv_depth: int = 5
    """Number of stacked grouped convs in the positional encoder."""
    pos_conv_width: int = 95
    """Total positional conv width; each layer has kernel max(3, width // depth) (95 // 5 = 19)."""
    pos_conv_groups: int = 16
    """Groups of each positional conv (the model width must be divisible by it)."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm / GroupNorm in the front-end."""
    pos_conv_padding: PosConvPadding = "every_layer"
    """Where padded frames are zeroed for the positional conv: before each of its layers, so a
    padded utterance gives the same output as the utterance alone ('every_layer', ours); once
    before the first layer ('input': fairseq data2vec 1.0, HF); never ('none': fairseq 2.0).
    Imported models take their source's, so padded batches match it too."""

    def __post_init__(self) -> None:
        parse_conv_spec(self.conv_spec)  # fail at load time, naming the spec
        if self.pos_conv_depth < 1:
            raise ConfigError(f"model.frontend.pos_conv_depth={self.pos_conv_depth} must be >= 1")
        if self.pos_conv_width < 1 or self.pos_conv_groups < 1:
            raise ConfigError("model.frontend.pos_conv_width and pos_conv_groups must be >= 1, got "
                              f"{self.pos_conv_width} and {self.pos_conv_groups}")

    @property
    def pos_conv_kernel(self) -> int:
        """Kernel size of each positional conv layer."""
        return max(3, self.pos_conv_width // self.pos_conv_depth)


@dataclass
class SpeechMaskConfig:
    """Span masking of frames (wav2vec 2.0 rule, data2vec 1.0 values)."""

    mask_prob: float = 0.65
    """Probability of a frame being a span START: a row of T real frames gets
    int(mask_prob * T / mask_length + U[0, 1)) spans (about 49 % of frames masked for 0.65 / 10)."""
    mask_length: int = 10
    """Frames per span."""
    min_masks: int = 1
    """At least this many spans per row."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ConfigError(f"model.masking.mask_prob={self.mask_prob} must be in [0, 1]")
        if self.mask_length < 1 or self.min_masks < 0:
            raise ConfigError(f"model.masking.mask_length={self.mask_length} must be >= 1 and "
                              f"min_masks={self.min_masks} >= 0")


# -------------------------------------------------------------------------------- conv spec

_TOKEN = re.compile(r"\s*(?:([0-9]+)|(.))", re.DOTALL)


def _tokens(spec: str) -> list[str]:
    """Integers and single punctuation characters; anything else is rejected by the parser."""
    out = []
    for match in _TOKEN.finditer(spec):
        if match.group(0).strip():
            out.append(match.group(1) or match.group(2))
    return out


def parse_conv_spec(spec: str) -> list[ConvLayerSpec]:
    """Parse ``"[(512,10,5)] + [(512,3,2)]*4"`` into [(channels, kernel, stride), ...] without eval.

    Grammar: ``term ('+' term)*``, ``term = '[' triple (',' triple)* ','? ']' ('*' N)?``,
    ``triple = '(' int ',' int ',' int ')'``; whitespace anywhere; all integers >= 1.
    """
    tokens, pos = _tokens(spec), 0

    def fail(why: str) -> ConfigError:
        return ConfigError(f"model.frontend.conv_spec {spec!r}: {why}; expected e.g. "
                           f"{PAPER_CONV_SPEC!r}")

    def expect(char: str) -> None:
        nonlocal pos
        if pos >= len(tokens) or tokens[pos] != char:
            found = tokens[pos] if pos < len(tokens) else "end of spec"
            raise fail(f"expected {char!r}, found {found!r}")
        pos += 1

    def integer() -> int:
        nonlocal pos
        if pos >= len(tokens) or not tokens[pos].isdigit():
            found = tokens[pos] if pos < len(tokens) else "end of spec"
            raise fail(f"expected a positive integer, found {found!r}")
        value = int(tokens[pos])
        pos += 1
        if value < 1:
            raise fail("every number must be >= 1")
        return value

    def triple() -> ConvLayerSpec:
        expect("(")
        dim = integer()
        expect(",")
        kernel = integer()
        expect(",")
        stride = integer()
        expect(")")
        return dim, kernel, stride

    layers: list[ConvLayerSpec] = []
    while True:
        expect("[")
        group = [triple()]
        while pos < len(tokens) and tokens[pos] == ",":
            pos += 1
            if pos < len(tokens) and tokens[pos] == "]":
                break  # trailing comma
            group.append(triple())
        expect("]")
        if pos < len(tokens) and tokens[pos] == "*":
            pos += 1
            repeat = integer()
            if repeat > _MAX_CONV_LAYERS:
                raise fail(f"repeat count {repeat} is over {_MAX_CONV_LAYERS}")
            group = group * repeat
        layers.extend(group)
        if len(layers) > _MAX_CONV_LAYERS:
            raise fail(f"more than {_MAX_CONV_LAYERS} layers")
        if pos == len(tokens):
            return layers
        expect("+")


# ------------------------------------------------------------------------- lengths, padding


def frame_lengths(sample_lengths: Tensor, conv_layers: list[ConvLayerSpec]) -> Tensor:
    """Frames each conv stack produces from `sample_lengths` samples: floor((L - k) / s) + 1 per
    layer (valid convolution), clamped at 0."""
    lengths = sample_lengths.long()
    for _, kernel, stride in conv_layers:
        lengths = (torch.div(lengths - kernel, stride, rounding_mode="floor") + 1).clamp_min(0)
    return lengths


def frame_padding_mask(sample_padding_mask: Tensor | None, conv_layers: list[ConvLayerSpec],
                       num_frames: int) -> Tensor | None:
    """(B, num_frames) True = padding frame, from a (B, S) True = padding sample mask.

    Padding is at the end of each row (as collators make it); a frame is real when its whole
    receptive field lies inside the real samples.
    """
    if sample_padding_mask is None:
        return None
    real = frame_lengths((~sample_padding_mask).sum(-1), conv_layers)  # (B,)
    steps = torch.arange(num_frames, device=sample_padding_mask.device)
    return steps.unsqueeze(0) >= real.unsqueeze(1)  # (B, T)


def _real_lengths(padding_mask: Tensor | None, shape: tuple[int, int]) -> Tensor:
    """(B,) real lengths; the padding must be a suffix of each row."""
    batch, length = shape
    if padding_mask is None:
        return torch.full((batch,), length, dtype=torch.long)
    if tuple(padding_mask.shape) != (batch, length):
        raise DataError(f"padding_mask has shape {tuple(padding_mask.shape)}, expected {shape}")
    padding_mask = padding_mask.cpu()
    lengths = length - padding_mask.sum(-1)
    suffix = torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)
    if not torch.equal(suffix, padding_mask):
        raise DataError("padding_mask must mark a suffix of each row (right padding)")
    return lengths


# ----------------------------------------------------------------------------------- masking


def span_mask(padding_mask: Tensor | None, shape: tuple[int, int], mask_prob: float,
              mask_length: int, min_masks: int, generator: torch.Generator) -> Tensor:
    """(B, T) True = masked: wav2vec 2.0 span masking with the same count in every row.

    Per row of L real frames: n = max(min_masks, int(mask_prob * L / mask_length + U[0, 1)))
    distinct span starts, drawn uniformly among the positions where a whole span fits inside the
    real frames (a row shorter than one span gets spans of its own length); spans may overlap and
    never touch padding. Then every row is trimmed, at random, to the smallest count in the batch
    (``require_same_masks``), so masked frames can be gathered into a rectangle.
    """
    batch, length = shape
    lengths = _real_lengths(padding_mask, shape)  # (B,)
    span = lengths.clamp(max=mask_length)  # (B,)
    num_starts = (lengths - span + 1).clamp_min(0) * (lengths > 0)  # (B,) candidate positions
    noise = torch.rand(batch, generator=generator, dtype=torch.float64)
    num = (mask_prob * lengths.double() / mask_length + noise).floor().long()
    num = torch.minimum(num.clamp_min(min_masks), num_starts)  # (B,)

    steps = torch.arange(length).unsqueeze(0)  # (1, T)
    starts = _random_subset(steps < num_starts.unsqueeze(1), num, generator)  # (B, T)
    # frame t is masked iff a start lies in [t - span + 1, t]: a difference of prefix counts
    prefix = F.pad(starts.long().cumsum(1), (1, 0))  # (B, T + 1): starts before position j
    lower = (steps - span.unsqueeze(1) + 1).clamp_min(0)  # (B, T)
    mask = (prefix[:, 1:] - prefix.gather(1, lower)) > 0  # (B, T)

    same = mask.sum(1).min() if batch else torch.tensor(0)
    mask = _random_subset(mask, same.expand(batch), generator)  # trim to the batch minimum
    device = padding_mask.device if padding_mask is not None else torch.device("cpu")
    return mask.to(device)


def _random_subset(allowed: Tensor, count: Tensor, generator: torch.Generator) -> Tensor:
    """(B, T) bool: `count[b]` positions of row b drawn uniformly without replacement from
    `allowed[b]` (count <= allowed.sum(1))."""
    keys = torch.rand(allowed.shape, generator=generator).masked_fill(~allowed, 2.0)
    rank = keys.argsort(1).argsort(1)  # (B, T): rank of each position's key in its row
    return rank < count.unsqueeze(1)


def mask_for_waveforms(cfg: SpeechMaskConfig, conv_layers: list[ConvLayerSpec], num_samples: int,
                       sample_padding_mask: Tensor | None, batch_size: int,
                       generator: torch.Generator) -> Tensor:
    """(B, T) frame mask for a (B, num_samples) waveform batch, computable in a data loader."""
    num_frames = int(frame_lengths(torch.tensor([num_samples]), conv_layers)[0])
    padding = frame_padding_mask(sample_padding_mask, conv_layers, num_frames)
    return span_mask(padding, (batch_size, num_frames), cfg.mask_prob, cfg.mask_length,
                     cfg.min_masks, generator)


# ----------------------------------------------------------------------------------- modules


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim computed in fp32 (fairseq Fp32LayerNorm: statistics of raw-audio
    conv outputs are not safe in fp16/bf16); returns the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Fp32TimeGroupNorm(nn.GroupNorm):
    """wav2vec 2.0 'group_norm' mode: GroupNorm(C, C) on (B, T, C), i.e. each channel normalised
    over time per example, in fp32."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        y = F.group_norm(x.transpose(1, 2).float(), self.num_groups, weight, bias, self.eps)
        return y.transpose(1, 2).to(x.dtype)  # (B, T, C)


class ConvLayer(nn.Module):
    """One feature-encoder layer on frames: Conv1d -> norm -> GELU, (B, S, C_in) -> (B, T, C_out).

    ``conv`` holds the weights in nn.Conv1d's (C_out, C_in, k) shape, but in training the
    convolution runs as unfold + matmul in the (B, T, C) layout: the per-frame LayerNorm and GELU
    then read contiguous memory instead of transposed views, which makes the encoder about twice
    as fast on CPU. In eval mode it runs in the original layouts (see ``_reference_forward``).
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, bias: bool,
                 norm: nn.Module, device=None, dtype=None) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, stride=stride, bias=bias, device=device,
                              dtype=dtype)
        self.norm = norm
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self._reference_forward(x)
        kernel, stride = self.conv.kernel_size[0], self.conv.stride[0]
        windows = x.unfold(1, kernel, stride).flatten(2)  # (B, T, C_in * k), (C_in, k) order
        y = F.linear(windows, self.conv.weight.flatten(1), self.conv.bias)  # (B, T, C_out)
        return self.act(self.norm(y))

    def _reference_forward(self, x: Tensor) -> Tensor:
        """fairseq's / HF's op order and layouts (conv on (B, C, T), GELU on the transposed
        view): same maths, but bit-identical features, so converted models agree to ~1e-6 at
        Base size instead of 1.3e-5 (the vectorised and strided GELU kernels round apart)."""
        y = self.conv(x.transpose(1, 2))  # (B, C_out, T)
        y = self.norm(y.transpose(1, 2)).transpose(1, 2)  # (B, C_out, T), normalised per frame
        return self.act(y).transpose(1, 2)  # (B, T, C_out)


class PositionalConvLayer(nn.Module):
    """Grouped Conv1d (same length) -> LayerNorm without affine -> GELU, (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, kernel: int, groups: int, eps: float, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups, device=device,
                              dtype=dtype)
        self.trim = 1 if kernel % 2 == 0 else 0  # an even kernel with padding k//2 adds one frame
        self.norm = Fp32LayerNorm(dim, eps=eps, elementwise_affine=False, device=device,
                                  dtype=dtype)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.transpose(1, 2))  # (B, D, T + trim)
        y = y[..., : y.shape[-1] - self.trim].transpose(1, 2)  # (B, T, D)
        return self.act(self.norm(y))


class PositionalConv(nn.Module):
    """Relative positions from a stack of grouped convs over the frames (data2vec 1.0 speech)."""

    def __init__(self, dim: int, depth: int, kernel: int, groups: int, eps: float, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PositionalConvLayer(dim, kernel, groups, eps, device, dtype)
                                    for _ in range(depth))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """(B, T, D) -> (B, T, D) positional signal; padded frames are zero in and out
        (without `padding_mask`: the plain conv stack, whatever the padded frames hold)."""
        if padding_mask is None:
            for layer in self.layers:
                x = layer(x)
            return x
        keep = (~padding_mask).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        for layer in self.layers:
            # Zero padding before every layer, not only the first (as HF / fairseq do): each
            # conv then sees exactly the input of the utterance alone, so nothing leaks.
            x = layer(x * keep)
        return x * keep


class SpeechFrontEnd(FrontEnd):
    """Waveform (B, S) -> transformer input (B, T, D) for data2vec 1.0 speech.

    ``local_features``: conv feature encoder -> LayerNorm(C) -> Linear(C, D) (the "feature
    projection"), shared with the teacher. ``contextualize``: masked frames -> ``mask_emb``,
    padded frames -> 0 (where and whether: ``cfg.pos_conv_padding``), then ``x + pos_conv(x)``.
    """

    num_extra_tokens = 0
    window_size = None
    local_modules = ("feature_encoder", "feature_norm", "feature_proj")

    def __init__(self, cfg: SpeechFrontEndConfig, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        if dim % cfg.pos_conv_groups:
            raise ConfigError(f"model.encoder.dim={dim} is not divisible by "
                              f"model.frontend.pos_conv_groups={cfg.pos_conv_groups}")
        self.cfg = cfg
        self.dim = dim
        self.conv_layers = parse_conv_spec(cfg.conv_spec)
        self.feature_encoder = self._feature_encoder(cfg, **kw)
        channels = self.conv_layers[-1][0]
        self.feature_norm = nn.LayerNorm(channels, eps=cfg.layer_norm_eps, **kw)
        self.feature_proj = nn.Linear(channels, dim, **kw)
        self.mask_emb = nn.Parameter(torch.empty(dim, **kw).uniform_())
        self.pos_conv = PositionalConv(dim, cfg.pos_conv_depth, cfg.pos_conv_kernel,
                                       cfg.pos_conv_groups, cfg.layer_norm_eps, **kw)

    def _feature_encoder(self, cfg: SpeechFrontEndConfig, device=None, dtype=None) -> nn.ModuleList:
        layers, in_dim = [], 1
        for i, (out_dim, kernel, stride) in enumerate(self.conv_layers):
            if cfg.extractor_mode == "layer_norm":
                norm: nn.Module = Fp32LayerNorm(out_dim, eps=cfg.layer_norm_eps, device=device,
                                                dtype=dtype)
            elif i == 0:  # group_norm: one group per channel, first layer only
                norm = Fp32TimeGroupNorm(out_dim, out_dim, eps=cfg.layer_norm_eps, device=device,
                                         dtype=dtype)
            else:
                norm = nn.Identity()
            layers.append(ConvLayer(in_dim, out_dim, kernel, stride, cfg.conv_bias, norm, device,
                                    dtype))
            in_dim = out_dim
        return nn.ModuleList(layers)

    @property
    def receptive_field(self) -> int:
        """Samples seen by one frame (400 for the paper's spec)."""
        field = 1
        for _, kernel, stride in reversed(self.conv_layers):
            field = (field - 1) * stride + kernel
        return field

    def local_features(self, source: Tensor,
                       padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(B, S) waveform, (B, S) True = pad -> (B, T, D) frame features, (B, T) True = pad."""
        if source.ndim != 2:
            raise DataError(f"speech source must be (batch, samples), got {tuple(source.shape)}")
        if source.shape[1] < self.receptive_field:
            raise DataError(f"waveform of {source.shape[1]} samples is shorter than one frame "
                            f"({self.receptive_field} samples)")
        x = source.unsqueeze(1).transpose(1, 2)  # (B, S, 1), a view of fairseq's (B, 1, S) input
        for layer in self.feature_encoder:
            x = layer(x)  # (B, S', C)
        x = self.feature_proj(self.feature_norm(x))  # (B, T, D)
        return x, frame_padding_mask(padding_mask, self.conv_layers, x.shape[1])

    def contextualize(self, features: Tensor, padding_mask: Tensor | None,
                      mask: Tensor | None,
                      pos_conv_padding: PosConvPadding | None = None
                      ) -> tuple[Tensor, Tensor | None]:
        """Masked frames -> mask_emb, padded frames -> 0 (as `cfg.pos_conv_padding` says, or
        `pos_conv_padding` when given: feature extraction asks for 'every_layer', which makes a
        padded row equal its utterance alone whatever the model was trained with), then add the
        conv positions."""
        x = features
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise DataError(f"mask has shape {tuple(mask.shape)}, expected frames "
                                f"{tuple(x.shape[:2])}")
            x = torch.where(mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)  # (B, T, D)
        mode = pos_conv_padding or self.cfg.pos_conv_padding
        if padding_mask is not None and mode != "none":
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        per_layer_padding = padding_mask if mode == "every_layer" else None
        return x + self.pos_conv(x, per_layer_padding), padding_mask

    def init_weights(self) -> None:
        """Kaiming-normal feature convs, U[0, 1) mask embedding, PyTorch defaults elsewhere
        (fairseq leaves the projection and positional convs at their default init)."""
        for layer in self.feature_encoder:
            layer.conv.reset_parameters()
            nn.init.kaiming_normal_(layer.conv.weight)
            if not isinstance(layer.norm, nn.Identity):
                layer.norm.reset_parameters()
        self.feature_norm.reset_parameters()
        self.feature_proj.reset_parameters()
        nn.init.uniform_(self.mask_emb)
        for layer in self.pos_conv.layers:
            layer.conv.reset_parameters()


def build_frontend(cfg: SpeechFrontEndConfig, dim: int) -> SpeechFrontEnd:
    """The speech front-end projecting to the encoder width `dim`."""
    return SpeechFrontEnd(cfg, dim)


__all__ = ["PAPER_CONV_SPEC", "ConvLayerSpec", "SpeechFrontEnd", "SpeechFrontEndConfig",
           "SpeechMaskConfig", "build_frontend", "frame_lengths", "frame_padding_mask",
           "mask_for_waveforms", "parse_conv_spec", "span_mask"]
