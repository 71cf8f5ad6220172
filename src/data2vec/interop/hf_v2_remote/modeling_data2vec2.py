"""data2vec 2.0 encoders for speech, images and text, as HuggingFace ``transformers`` models.

Written by the data2vec project and shipped in every directory ``data2vec export --to hf`` writes
for a data2vec 2.0 model; ``transformers`` loads it with ``trust_remote_code=True``. It imports
only ``torch`` and ``transformers``. Module and tensor names are data2vec's own (``frontend.*``,
``encoder.blocks.N.*``, ``alibi.alibi_scale``; task heads ``head.*`` beside ``data2vec2.*``), so
the weights file holds data2vec's student tensors under their own names.

The models compute data2vec 2.0's student encoder on unmasked input, the path fine-tuning and
feature extraction use (the pre-training decoder and EMA teacher are not exported):

- speech, ``input_values`` (B, S): a 16 kHz waveform, normalised per utterance as in training,
  ``attention_mask`` (B, S) 1 = real sample. Conv waveform encoder -> LayerNorm -> Linear ->
  ``x + pos_conv(x)`` -> transformer, with an ALiBi attention bias (learned per-head scales);
- images, ``pixel_values`` (B, C, H, W): patch embedding + fixed 2-D sin-cos positions, a CLS
  token first -> transformer;
- text, ``input_ids`` (B, L) with ``attention_mask`` (or <pad> ids marking padding): token and
  position embeddings -> LayerNorm -> transformer.

``output_hidden_states=True`` returns the encoder input (after its input LayerNorm) and the output
of every block, ``num_hidden_layers + 1`` tensors; ``output_attentions=True`` every block's
attention probabilities (computed explicitly instead of by the fused kernel).

Example::

    from transformers import AutoModel
    model = AutoModel.from_pretrained("exported-dir", trust_remote_code=True).eval()
    out = model(wave, output_hidden_states=True)       # wave (B, S)
    out.last_hidden_state, len(out.hidden_states)      # (B, T, D), depth + 1
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutput,
    CausalLMOutput,
    ImageClassifierOutput,
    SequenceClassifierOutput,
)

from .configuration_data2vec2 import Data2Vec2Config

try:  # transformers >= 5: init functions that leave tensors loaded from the checkpoint alone
    from transformers import initialization as init
except ImportError:  # transformers 4 initialises before loading
    from torch.nn import init

# ------------------------------------------------------------------------- the shared transformer


def attention_bias(padding_mask: Tensor | None, bias: Tensor | None,
                   dtype: torch.dtype) -> Tensor | None:
    """Key padding (B, T) True = pad and an additive bias (1, H, T, T) as one additive mask."""
    if padding_mask is None:
        return None if bias is None else bias.to(dtype)
    pad = padding_mask[:, None, None, :]  # (B, 1, 1, T)
    if bias is None:
        bias = torch.zeros(pad.shape, dtype=dtype, device=pad.device)
    return bias.to(dtype).masked_fill(pad, float("-inf"))


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection."""

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.dropout = config.attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias == "all")
        self.q_bias = self.v_bias = None
        if config.qkv_bias == "qv":  # query and value biases, none for the key
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, bias: Tensor | None,
                need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """x (B, T, D), additive bias (B|1, H|1, T, T) -> (B, T, D), probabilities (B, H, T, T)."""
        batch, length, dim = x.shape
        qkv_bias = self.qkv.bias
        if self.q_bias is not None:
            qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, dim // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        dropout = self.dropout if self.training else 0.0
        if bias is not None:
            bias = bias.to(q.dtype)
        probs = None
        if need_weights:
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, T, T)
            if bias is not None:
                scores = scores + bias
            probs = scores.float().softmax(-1).to(q.dtype)
            out = F.dropout(probs, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim)), probs


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2."""

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()
        self.drop = nn.Dropout(config.activation_dropout)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch."""

    def __init__(self, dim: int, value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per example with probability `rate` (training)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class Block(nn.Module):
    """Attention and feed-forward sub-layers with residuals, post-LN or pre-LN."""

    def __init__(self, config: Data2Vec2Config, drop_path: float) -> None:
        super().__init__()
        dim, eps, scale = config.hidden_size, config.layer_norm_eps, config.layer_scale_init
        self.layer_norm_first = config.layer_norm_first
        self.attn = Attention(config)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(config)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.drop_path = DropPath(drop_path)
        self.ls1 = LayerScale(dim, scale) if scale > 0 else nn.Identity()
        self.ls2 = LayerScale(dim, scale) if scale > 0 else nn.Identity()

    def _branch(self, y: Tensor, scale: nn.Module) -> Tensor:
        return self.drop_path(scale(self.dropout(y)))

    def forward(self, x: Tensor, bias: Tensor | None,
                need_weights: bool) -> tuple[Tensor, Tensor | None]:
        if self.layer_norm_first:
            y, probs = self.attn(self.norm1(x), bias, need_weights)
            x = x + self._branch(y, self.ls1)
            return x + self._branch(self.mlp(self.norm2(x)), self.ls2), probs
        y, probs = self.attn(x, bias, need_weights)
        x = self.norm1(x + self._branch(y, self.ls1))
        return self.norm2(x + self._branch(self.mlp(x), self.ls2)), probs


class Encoder(nn.Module):
    """Input LayerNorm (post-LN models) and dropout, the blocks, a final LayerNorm (pre-LN)."""

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__()
        dim, eps, depth = config.hidden_size, config.layer_norm_eps, config.num_hidden_layers
        use_input_norm = config.input_norm and not config.layer_norm_first
        self.input_norm = nn.LayerNorm(dim, eps=eps) if use_input_norm else nn.Identity()
        self.input_dropout = nn.Dropout(config.hidden_dropout)
        rates = torch.linspace(0, config.drop_path, depth).tolist() if depth > 1 \
            else [config.drop_path]
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.final_norm = nn.LayerNorm(dim, eps=eps) if config.final_norm else nn.Identity()
        self.layerdrop = config.layerdrop

    def forward(self, x: Tensor, padding_mask: Tensor | None, bias: Tensor | None,
                output_hidden_states: bool, output_attentions: bool) -> BaseModelOutput:
        """x (B, T, D), padding_mask (B, T) True = pad, bias (1, H, T, T) or None."""
        x = self.input_dropout(self.input_norm(x))
        bias = attention_bias(padding_mask, bias, x.dtype)
        hidden = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for block in self.blocks:
            skip = self.training and self.layerdrop > 0 and \
                torch.rand(()).item() < self.layerdrop
            probs = None
            if not skip:
                x, probs = block(x, bias, output_attentions)
            if hidden is not None:
                hidden.append(x)
            if attentions is not None:
                attentions.append(probs)
        return BaseModelOutput(last_hidden_state=self.final_norm(x),
                               hidden_states=tuple(hidden) if hidden is not None else None,
                               attentions=tuple(attentions) if attentions is not None else None)


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's fixed per-head slopes 2^(-8(h+1)/H) for a power of two H; otherwise those of the
    largest power of two below H, then every other slope of twice that power (Press et al.)."""
    def geometric(n: int) -> list[float]:
        first = 2.0 ** (-8.0 / n)
        return [first ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return geometric(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return geometric(lower) + geometric(2 * lower)[0::2][: num_heads - lower]


class Alibi(nn.Module):
    """Additive bias -scale_h·slope_h·|i - j| (scales learned, clamped at 0), shared by all
    blocks; the extra tokens before the steps get none."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.alibi_scale = nn.Parameter(torch.ones(num_heads))

    def forward(self, num_steps: int, num_extra: int, device: torch.device) -> Tensor:
        steps = torch.arange(num_steps, device=device)
        distance = (steps[:, None] - steps[None, :]).abs().float()  # (T, T)
        slopes = torch.tensor(alibi_slopes(self.alibi_scale.shape[0]), device=device)
        slope = slopes * self.alibi_scale.clamp_min(0)  # (H,)
        bias = -slope[None, :, None, None] * distance[None, None]  # (1, H, T, T)
        return F.pad(bias, (num_extra, 0, num_extra, 0)) if num_extra else bias


# ------------------------------------------------------------------------------------ speech


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim computed in float32 (raw-audio statistics)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Fp32TimeGroupNorm(nn.GroupNorm):
    """One group per channel on (B, T, C): each channel normalised over time, in float32."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        y = F.group_norm(x.transpose(1, 2).float(), self.num_groups, weight, bias, self.eps)
        return y.transpose(1, 2).to(x.dtype)


class ConvLayer(nn.Module):
    """Waveform encoder layer: Conv1d -> norm over channels -> GELU, (B, S, C) -> (B, T, C')."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, bias: bool,
                 norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, stride=stride, bias=bias)
        self.norm = norm
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.transpose(1, 2))  # (B, C', T)
        y = self.norm(y.transpose(1, 2)).transpose(1, 2)
        return self.act(y).transpose(1, 2)  # (B, T, C')


class PositionalConvLayer(nn.Module):
    """Grouped Conv1d keeping the length -> LayerNorm without affine -> GELU on (B, T, D)."""

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__()
        dim, kernel = config.hidden_size, config.pos_conv_kernel
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2,
                              groups=config.pos_conv_groups)
        self.trim = 1 if kernel % 2 == 0 else 0  # an even kernel adds one step
        self.norm = Fp32LayerNorm(dim, eps=config.feature_layer_norm_eps,
                                  elementwise_affine=False)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.transpose(1, 2))
        y = y[..., : y.shape[-1] - self.trim].transpose(1, 2)  # (B, T, D)
        return self.act(self.norm(y))


class PositionalConv(nn.Module):
    """A stack of grouped convs over the frames: the relative positional signal."""

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PositionalConvLayer(config)
                                    for _ in range(config.pos_conv_depth))

    def forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        """With `padding_mask` (B, T) True = pad, padded frames are zeroed before every layer
        and in the output; without, the plain stack."""
        if padding_mask is None:
            for layer in self.layers:
                x = layer(x)
            return x
        keep = (~padding_mask).unsqueeze(-1).to(x.dtype)
        for layer in self.layers:
            x = layer(x * keep)
        return x * keep


def frame_lengths(sample_lengths: Tensor, conv_layers: list[list[int]]) -> Tensor:
    """Frames the waveform encoder makes from `sample_lengths` samples (valid convolutions)."""
    lengths = sample_lengths.long()
    for _, kernel, stride in conv_layers:
        lengths = (torch.div(lengths - kernel, stride, rounding_mode="floor") + 1).clamp_min(0)
    return lengths


class SpeechFrontEnd(nn.Module):
    """Waveform (B, S) -> frame features (B, T, D) with conv positions added."""

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__()
        self.config = config
        layers, in_dim = [], 1
        for i, (out_dim, kernel, stride) in enumerate(config.conv_layers):
            eps = config.feature_layer_norm_eps
            if config.extractor_mode == "layer_norm":
                norm: nn.Module = Fp32LayerNorm(out_dim, eps=eps)
            elif i == 0:  # group_norm mode: the first layer only
                norm = Fp32TimeGroupNorm(out_dim, out_dim, eps=eps)
            else:
                norm = nn.Identity()
            layers.append(ConvLayer(in_dim, out_dim, kernel, stride, config.conv_bias, norm))
            in_dim = out_dim
        self.feature_encoder = nn.ModuleList(layers)
        self.feature_norm = nn.LayerNorm(in_dim, eps=config.feature_layer_norm_eps)
        self.feature_proj = nn.Linear(in_dim, config.hidden_size)
        self.pos_conv = PositionalConv(config)

    def receptive_field(self) -> int:
        field = 1
        for _, kernel, stride in reversed(self.config.conv_layers):
            field = (field - 1) * stride + kernel
        return field

    def forward(self, waveform: Tensor,
                padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(B, S), (B, S) True = padded sample -> (B, T, D), (B, T) True = padded frame."""
        if waveform.ndim != 2 or waveform.shape[1] < self.receptive_field():
            raise ValueError(f"input_values must be (batch, samples) with at least "
                             f"{self.receptive_field()} samples, got {tuple(waveform.shape)}")
        x = waveform.unsqueeze(-1)  # (B, S, 1)
        for layer in self.feature_encoder:
            x = layer(x)
        x = self.feature_proj(self.feature_norm(x))  # (B, T, D)
        frames = None
        if padding_mask is not None:
            real = frame_lengths((~padding_mask).sum(-1), self.config.conv_layers)
            frames = torch.arange(x.shape[1], device=x.device)[None] >= real[:, None]
        mode = self.config.pos_conv_padding
        if frames is not None and mode != "none":
            x = x.masked_fill(frames.unsqueeze(-1), 0.0)
        return x + self.pos_conv(x, frames if mode == "every_layer" else None), frames


# ------------------------------------------------------------------------------------ images


def sincos_positions(grid: int, dim: int) -> Tensor:
    """(grid², dim) fixed 2-D positions, row-major patches: with w_k = 10000^(-k/(dim/4)),
    patch (r, c) -> [sin(c·w), cos(c·w), sin(r·w), cos(r·w)] (computed in float64)."""
    quarter = dim // 4
    freq = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    index = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(index, index, indexing="ij")

    def waves(pos: Tensor) -> Tensor:
        angle = pos.reshape(-1, 1) * freq  # (N, dim/4)
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([waves(cols), waves(rows)], dim=1).float()


class ImageFrontEnd(nn.Module):
    """Images (B, C, H, W) -> [CLS] + patch embeddings with positions, (B, 1 + N, D)."""

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__()
        self.config = config
        dim, patch = config.hidden_size, config.patch_size
        self.grid = config.image_size // patch
        self.patch_embed = nn.Conv2d(config.num_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.cls_token else None
        if config.positions == "learned":
            self.pos_embed = nn.Parameter(
                torch.zeros(1, config.num_extra_tokens + self.grid ** 2, dim))

    def forward(self, pixels: Tensor) -> Tensor:
        size, channels = self.config.image_size, self.config.num_channels
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (channels, size, size):
            raise ValueError(f"pixel_values must be (batch, {channels}, {size}, {size}), got "
                             f"{tuple(pixels.shape)}")
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.config.positions == "sincos":  # the patches only: CLS gets no position
            table = sincos_positions(self.grid, x.shape[-1]).to(x.device, x.dtype)
            x = x + table.unsqueeze(0)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        if self.config.positions == "learned":
            x = x + self.pos_embed.to(x.dtype)
        return x


# -------------------------------------------------------------------------------------- text


class TextFrontEnd(nn.Module):
    """Token ids (B, L) -> LayerNorm(token + position embeddings + token_type) (B, L, D);
    positions count pad_token_id + 1, + 2, ... over the real tokens."""

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__()
        self.config = config
        dim, pad = config.hidden_size, config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, dim, padding_idx=pad)
        self.embed_positions = nn.Embedding(config.max_positions + pad + 1, dim, padding_idx=pad)
        self.layer_norm = nn.LayerNorm(dim, eps=config.embedding_layer_norm_eps)
        self.register_buffer("token_type", torch.zeros(dim))  # a constant added everywhere

    def forward(self, input_ids: Tensor, padding_mask: Tensor | None) -> Tensor:
        """(B, L) ids, (B, L) True = padding -> (B, L, D)."""
        batch, length = input_ids.shape
        if length > self.config.max_positions:
            raise ValueError(f"input_ids has {length} tokens; the model takes at most "
                             f"{self.config.max_positions}")
        pad = self.config.pad_token_id
        if padding_mask is None:
            positions = torch.arange(pad + 1, pad + 1 + length, device=input_ids.device)
            positions = positions.expand(batch, length)
        else:
            real = (~padding_mask).long()
            positions = real.cumsum(1) * real + pad
        x = self.embed_tokens(input_ids) + self.embed_positions(positions) + self.token_type
        return self.layer_norm(x)


# ------------------------------------------------------------------------------------ models


class Data2Vec2PreTrainedModel(PreTrainedModel):
    """Weight init and the configuration class shared by every data2vec 2.0 model."""

    config_class = Data2Vec2Config
    base_model_prefix = "data2vec2"
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BERT-style init (as data2vec's student) for models built from a config; tensors
        loaded from a checkpoint are left alone."""
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d | nn.Conv2d):
            init.kaiming_normal_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if module.padding_idx is not None and \
                    not getattr(module.weight, "_is_hf_initialized", False):
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm | nn.GroupNorm) and module.weight is not None:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, Alibi):
            init.ones_(module.alibi_scale)
        elif isinstance(module, LayerScale):
            init.constant_(module.gamma, self.config.layer_scale_init)
        elif isinstance(module, Attention) and module.q_bias is not None:
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, ImageFrontEnd):
            if module.cls_token is not None:
                init.trunc_normal_(module.cls_token, std=0.02, a=-0.04, b=0.04)
            if module.config.positions == "learned":
                init.trunc_normal_(module.pos_embed, std=0.02, a=-0.04, b=0.04)

    def _init_encoder(self, config: Data2Vec2Config) -> None:
        self.encoder = Encoder(config)
        self.alibi = Alibi(config.num_attention_heads) if config.alibi else None

    def _encode(self, x: Tensor, padding_mask: Tensor | None, output_hidden_states: bool | None,
                output_attentions: bool | None) -> BaseModelOutput:
        """Front-end output (B, n + T, D) -> the encoder's output."""
        bias = None
        if self.alibi is not None:
            extra = self.config.num_extra_tokens
            bias = self.alibi(x.shape[1] - extra, extra, x.device)
        hidden = self.config.output_hidden_states if output_hidden_states is None \
            else output_hidden_states
        attentions = self.config.output_attentions if output_attentions is None \
            else output_attentions
        return self.encoder(x, padding_mask, bias, bool(hidden), bool(attentions))


def _padding(attention_mask: Tensor | None) -> Tensor | None:
    """HF attention_mask (1 = real) -> padding mask (True = pad)."""
    return None if attention_mask is None else attention_mask == 0


def _result(output, return_dict: bool | None, config: Data2Vec2Config):
    use_dict = getattr(config, "return_dict", True) if return_dict is None else return_dict
    return output if use_dict else output.to_tuple()


class Data2Vec2AudioModel(Data2Vec2PreTrainedModel):
    """data2vec 2.0 speech encoder: ``input_values`` (B, S) -> ``last_hidden_state`` (B, T, D)."""

    main_input_name = "input_values"

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__(config)
        self.frontend = SpeechFrontEnd(config)
        self._init_encoder(config)
        self.post_init()

    def _get_feat_extract_output_lengths(self, sample_lengths: Tensor) -> Tensor:
        """Frames per utterance of `sample_lengths` samples."""
        return frame_lengths(torch.as_tensor(sample_lengths), self.config.conv_layers)

    def encode(self, input_values: Tensor, attention_mask: Tensor | None = None,
               output_hidden_states: bool | None = None,
               output_attentions: bool | None = None) -> tuple[BaseModelOutput, Tensor | None]:
        """The encoder output and the frame padding mask (B, T) True = padded frame."""
        x, frames = self.frontend(input_values, _padding(attention_mask))
        return self._encode(x, frames, output_hidden_states, output_attentions), frames

    def forward(self, input_values: Tensor, attention_mask: Tensor | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        out, _ = self.encode(input_values, attention_mask, output_hidden_states,
                             output_attentions)
        return _result(out, return_dict, self.config)


class Data2Vec2VisionModel(Data2Vec2PreTrainedModel):
    """data2vec 2.0 image encoder: ``pixel_values`` (B, C, H, W) -> (B, 1 + N, D), CLS first."""

    main_input_name = "pixel_values"

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__(config)
        self.frontend = ImageFrontEnd(config)
        self._init_encoder(config)
        self.post_init()

    def encode(self, pixel_values: Tensor, output_hidden_states: bool | None = None,
               output_attentions: bool | None = None) -> tuple[BaseModelOutput, None]:
        x = self.frontend(pixel_values)
        return self._encode(x, None, output_hidden_states, output_attentions), None

    def forward(self, pixel_values: Tensor, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                **kwargs):
        out, _ = self.encode(pixel_values, output_hidden_states, output_attentions)
        return _result(out, return_dict, self.config)


class Data2Vec2TextModel(Data2Vec2PreTrainedModel):
    """data2vec 2.0 text encoder: ``input_ids`` (B, L) -> (B, L, D). Without ``attention_mask``
    the <pad> ids (``config.pad_token_id``) are the padding."""

    main_input_name = "input_ids"

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__(config)
        self.frontend = TextFrontEnd(config)
        self._init_encoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.frontend.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.frontend.embed_tokens = value

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               output_hidden_states: bool | None = None,
               output_attentions: bool | None = None) -> tuple[BaseModelOutput, Tensor | None]:
        padding = _padding(attention_mask)
        if padding is None:
            is_pad = input_ids.eq(self.config.pad_token_id)
            padding = is_pad if bool(is_pad.any()) else None
        x = self.frontend(input_ids, padding)
        return self._encode(x, padding, output_hidden_states, output_attentions), padding

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        out, _ = self.encode(input_ids, attention_mask, output_hidden_states, output_attentions)
        return _result(out, return_dict, self.config)


# -------------------------------------------------------------------------------- task models


def pool(x: Tensor, padding_mask: Tensor | None, num_extra: int, use_first: bool) -> Tensor:
    """(B, n + T, D) -> (B, D): the first token, or the mean over the real steps (extra tokens
    excluded)."""
    if use_first:
        return x[:, 0]
    x = x[:, num_extra:]
    if padding_mask is None:
        return x.mean(1)
    keep = (~padding_mask[:, num_extra:]).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def classification_loss(logits: Tensor, labels: Tensor, config: Data2Vec2Config) -> Tensor:
    """Regression (MSE), multi-label (BCE with logits) or single-label (cross-entropy)."""
    kind = config.problem_type
    if kind is None:
        kind = "regression" if config.num_labels == 1 else "single_label_classification"
    if kind == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
    if kind == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels.view(-1))


class Data2Vec2ForCTC(Data2Vec2PreTrainedModel):
    """Speech recognition: a linear layer on every frame -> ``logits`` (B, T, vocab_size); CTC
    blank = ``config.pad_token_id``. ``labels`` (B, U) padded with -100 give the CTC loss summed
    over utterances / B."""

    main_input_name = "input_values"

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__(config)
        self.data2vec2 = Data2Vec2AudioModel(config)
        self.head = nn.Sequential(nn.Dropout(config.classifier_dropout),
                                  nn.Linear(config.hidden_size, config.vocab_size))
        self.post_init()

    def forward(self, input_values: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                **kwargs):
        out, frames = self.data2vec2.encode(input_values, attention_mask, output_hidden_states,
                                            output_attentions)
        logits = self.head(out.last_hidden_state)
        loss = None
        if labels is not None:
            lengths = torch.full(logits.shape[:1], logits.shape[1], dtype=torch.long,
                                 device=logits.device) if frames is None else (~frames).sum(1)
            real = labels >= 0
            log_probs = F.log_softmax(logits.float(), -1).transpose(0, 1)  # (T, B, V)
            loss = F.ctc_loss(log_probs, labels[real], lengths, real.sum(1),
                              blank=self.config.pad_token_id, reduction="sum",
                              zero_infinity=True) / logits.shape[0]
        output = CausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                attentions=out.attentions)
        return _result(output, return_dict, self.config)


class Data2Vec2ForAudioClassification(Data2Vec2PreTrainedModel):
    """Audio classification: mean over the real frames -> linear -> ``logits`` (B, num_labels)."""

    main_input_name = "input_values"

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__(config)
        self.data2vec2 = Data2Vec2AudioModel(config)
        self.head = nn.Sequential(nn.Dropout(config.classifier_dropout),
                                  nn.Linear(config.hidden_size, config.num_labels))
        self.post_init()

    def forward(self, input_values: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                **kwargs):
        out, frames = self.data2vec2.encode(input_values, attention_mask, output_hidden_states,
                                            output_attentions)
        logits = self.head(pool(out.last_hidden_state, frames, 0, use_first=False))
        loss = None if labels is None else classification_loss(logits, labels, self.config)
        output = SequenceClassifierOutput(loss=loss, logits=logits,
                                          hidden_states=out.hidden_states,
                                          attentions=out.attentions)
        return _result(output, return_dict, self.config)


class Data2Vec2ForSequenceClassification(Data2Vec2PreTrainedModel):
    """Text classification / regression: the first token (<s>) -> dense -> tanh -> linear."""

    main_input_name = "input_ids"

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__(config)
        self.data2vec2 = Data2Vec2TextModel(config)
        dim, drop = config.hidden_size, config.classifier_dropout
        self.head = nn.Sequential(nn.Dropout(drop), nn.Linear(dim, dim), nn.Tanh(),
                                  nn.Dropout(drop), nn.Linear(dim, config.num_labels))
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                **kwargs):
        out, _ = self.data2vec2.encode(input_ids, attention_mask, output_hidden_states,
                                       output_attentions)
        logits = self.head(out.last_hidden_state[:, 0])
        loss = None if labels is None else classification_loss(logits, labels, self.config)
        output = SequenceClassifierOutput(loss=loss, logits=logits,
                                          hidden_states=out.hidden_states,
                                          attentions=out.attentions)
        return _result(output, return_dict, self.config)


class Data2Vec2ForImageClassification(Data2Vec2PreTrainedModel):
    """Image classification: the CLS token or the mean patch (``config.pooling``) -> LayerNorm
    -> linear -> ``logits`` (B, num_labels)."""

    main_input_name = "pixel_values"

    def __init__(self, config: Data2Vec2Config) -> None:
        super().__init__(config)
        self.data2vec2 = Data2Vec2VisionModel(config)
        self.head = nn.Sequential(nn.LayerNorm(config.hidden_size,
                                               eps=config.classifier_norm_eps),
                                  nn.Linear(config.hidden_size, config.num_labels))
        self.post_init()

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        out, _ = self.data2vec2.encode(pixel_values, output_hidden_states, output_attentions)
        extra = self.config.num_extra_tokens
        use_cls = self.config.pooling == "cls" and extra > 0
        logits = self.head(pool(out.last_hidden_state, None, extra, use_first=use_cls))
        loss = None if labels is None else classification_loss(logits, labels, self.config)
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                       attentions=out.attentions)
        return _result(output, return_dict, self.config)


MODEL_CLASSES = {"speech": Data2Vec2AudioModel, "image": Data2Vec2VisionModel,
                 "text": Data2Vec2TextModel}

__all__ = ["Data2Vec2AudioModel", "Data2Vec2ForAudioClassification", "Data2Vec2ForCTC",
           "Data2Vec2ForImageClassification", "Data2Vec2ForSequenceClassification",
           "Data2Vec2PreTrainedModel", "Data2Vec2TextModel", "Data2Vec2VisionModel"]
