"""Text: token + learned position embeddings with an embedding LayerNorm, and token masking.

The front-end follows RoBERTa / HuggingFace ``Data2VecTextModel``: ``LayerNorm(token_emb +
position_emb [+ token_type])``, positions numbered from ``pad_index + 1`` over real tokens only.
No embedding dropout here: the encoder's input dropout plays that role (text presets set
``encoder.input_norm: false`` because the LayerNorm lives in this front-end).

Masking happens on token ids, before the model (in the data loader): :func:`mask_tokens` returns the
data2vec ``mask`` (True = masked = loss position) and the student's ids. Two rules:

- ``bert`` (default; the paper): p = 15 % of the maskable tokens per row; of those 80 % become
  ``<mask>``, 10 % a random non-special token, 10 % stay as they are — all are loss positions
  (fairseq's code scores only the ``<mask>`` ones, issue #4229; BERT, and we, score all).
- ``span`` (fairseq's released ``text/pretraining/base.yaml``): ``int(p·n/len + U)`` span starts
  (p = 0.35, len = 4) drawn without replacement among maskable tokens, each span ``len`` tokens
  long, cut short at the first special token or padding; every covered token becomes ``<mask>``.

Special tokens (``<s>``, ``</s>``, ``<pad>``, …) and padding are never masked.

Example::

    mask, student = mask_tokens(ids, tok.special_ids, tok.mask_id, tok.vocab_size,
                                TextMaskConfig(), torch.Generator().manual_seed(0))
    batch = Batch(source=ids, padding_mask=ids.eq(tok.pad_id), mask=mask, student_source=student)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from data2vec.errors import ConfigError, DataError
from data2vec.modalities.base import FrontEnd

# ---------------------------------------------------------------------------------------- configs


@dataclass
class TextFrontEndConfig:
    """Token and position embeddings (RoBERTa / fairseq ``TransformerSentenceEncoder`` layout)."""

    vocab_size: int = 50_265
    """Rows of the token embedding; the CLI / loader sets it from the tokenizer."""
    max_positions: int = 512
    """Longest sequence; the position table has max_positions + pad_index + 1 rows (514)."""
    pad_index: int = 1
    """Id of <pad>: its embedding row stays zero and positions are numbered from pad_index + 1."""
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if not 0 <= self.pad_index < self.vocab_size:
            raise ConfigError(f"model.frontend.pad_index={self.pad_index} must be in "
                              f"0..{self.vocab_size - 1} (model.frontend.vocab_size)")
        if self.max_positions < 1:
            raise ConfigError(f"model.frontend.max_positions={self.max_positions} must be >= 1")


@dataclass
class TextMaskConfig:
    """Which tokens the student sees replaced (see the module docstring for both rules)."""

    mode: Literal["bert", "span"] = "bert"
    """'bert' (default, the paper: 15 %, 80/10/10) or 'span' (fairseq's released config)."""
    mask_prob: float = 0.15
    """bert: fraction of maskable tokens chosen per row (stochastic rounding of p·n)."""
    leave_unmasked_prob: float = 0.1
    """bert: share of chosen tokens left unchanged (still loss positions)."""
    random_token_prob: float = 0.1
    """bert: share of chosen tokens replaced by a random non-special token."""
    span_mask_prob: float = 0.35
    """span: span-start probability (int(p·n/len + U) starts per row)."""
    span_length: int = 4
    """span: tokens per span (fewer where a span meets a special token or padding)."""

    def __post_init__(self) -> None:
        for key in ("mask_prob", "span_mask_prob"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"model.masking.{key}={getattr(self, key)} must be in (0, 1]")
        for key in ("leave_unmasked_prob", "random_token_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"model.masking.{key}={getattr(self, key)} must be in [0, 1]")
        if self.leave_unmasked_prob + self.random_token_prob > 1.0:
            raise ConfigError("model.masking.leave_unmasked_prob + random_token_prob must be <= 1")
        if self.span_length < 1:
            raise ConfigError(f"model.masking.span_length={self.span_length} must be >= 1")


# ---------------------------------------------------------------------------------------- masking


def special_table(special_ids: Iterable[int] | Tensor, vocab_size: int,
                  num_special_tokens: int = 0, device: torch.device | None = None) -> Tensor:
    """(vocab_size,) bool, True = special: the given ids and every id below num_special_tokens."""
    table = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    table[:num_special_tokens] = True
    ids = torch.as_tensor(list(special_ids) if not isinstance(special_ids, Tensor) else special_ids,
                          dtype=torch.long, device=device)
    table[ids] = True
    return table


def _uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _choose(maskable: Tensor, count: Tensor, generator: torch.Generator) -> Tensor:
    """(B, L) bool with exactly count[b] True entries per row, uniformly among maskable ones."""
    scores = _uniform(tuple(maskable.shape), generator, maskable.device)
    scores = scores.masked_fill(~maskable, 2.0)  # non-maskable sort last
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, L) rank of each position in its row
    return rank < count.unsqueeze(1)


def _stochastic_count(expected: Tensor, limit: Tensor, generator: torch.Generator) -> Tensor:
    """int(expected + U[0, 1)) per row (unbiased rounding, as fairseq), at most `limit`."""
    u = _uniform(tuple(expected.shape), generator, expected.device)
    return torch.minimum((expected + u).floor().long(), limit)


def bert_mask(maskable: Tensor, mask_prob: float, generator: torch.Generator) -> Tensor:
    """(B, L) True = masked: int(p·n + U) of the n maskable positions of each row."""
    n = maskable.sum(1)  # (B,)
    return _choose(maskable, _stochastic_count(mask_prob * n, n, generator), generator)


def span_mask(maskable: Tensor, span_prob: float, span_length: int,
              generator: torch.Generator) -> Tensor:
    """(B, L) True = masked: int(p·n/len + U) starts among maskable positions, each extended
    to `span_length` tokens but stopped at the first non-maskable one (special or padding)."""
    n = maskable.sum(1)  # (B,)
    starts = _choose(maskable, _stochastic_count(span_prob * n / span_length, n, generator),
                     generator)
    covered, front = starts, starts
    for _ in range(span_length - 1):
        # Shift the span fronts one step right; a front dies on a non-maskable token, so a span
        # never jumps over <s>, </s> or padding.
        front = torch.cat([torch.zeros_like(front[:, :1]), front[:, :-1]], dim=1) & maskable
        covered = covered | front
    return covered


def mask_tokens(tokens: Tensor, special_ids: Iterable[int] | Tensor, mask_id: int,
                vocab_size: int, cfg: TextMaskConfig, generator: torch.Generator,
                num_special_tokens: int = 0) -> tuple[Tensor, Tensor]:
    """Mask a (B, L) batch of token ids -> (mask (B, L) True = masked, student ids (B, L)).

    `special_ids` (which must include <pad>; ``BPETokenizer.special_ids``) are never masked nor
    drawn as random replacements. Ids below `num_special_tokens` count as special too (fairseq's
    ``nspecial``); the default 0 relies on `special_ids` alone, which is right for every
    vocabulary — a RoBERTa one has '.' at id 4, so 5 there would never mask full stops.
    """
    if tokens.dim() != 2:
        raise DataError(f"mask_tokens expects (B, L) token ids, got shape {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise DataError(f"token ids must be in 0..{vocab_size - 1}, got "
                        f"{int(tokens.min())}..{int(tokens.max())}")
    special = special_table(special_ids, vocab_size, num_special_tokens, tokens.device)
    maskable = ~special[tokens]  # (B, L)
    if cfg.mode == "span":
        mask = span_mask(maskable, cfg.span_mask_prob, cfg.span_length, generator)
        return mask, tokens.masked_fill(mask, mask_id)
    mask = bert_mask(maskable, cfg.mask_prob, generator)
    return mask, _bert_replace(tokens, mask, special, mask_id, cfg, generator)


def _bert_replace(tokens: Tensor, mask: Tensor, special: Tensor, mask_id: int,
                  cfg: TextMaskConfig, generator: torch.Generator) -> Tensor:
    """Chosen tokens -> <mask> / random non-special id / unchanged, independently per token."""
    u = _uniform(tuple(tokens.shape), generator, tokens.device)  # (B, L)
    to_random = mask & (u < cfg.random_token_prob)
    to_mask = mask & (u >= cfg.random_token_prob + cfg.leave_unmasked_prob)
    allowed = (~special).nonzero().squeeze(1)  # (V - #special,) ids a random draw may give
    pick = torch.randint(len(allowed), tuple(tokens.shape), generator=generator,
                         device=generator.device).to(tokens.device)
    student = tokens.masked_fill(to_mask, mask_id)
    return torch.where(to_random, allowed[pick], student)


def mask_sequence(tokens: Tensor, special_ids: Iterable[int] | Tensor, mask_id: int,
                  vocab_size: int, cfg: TextMaskConfig, generator: torch.Generator,
                  num_special_tokens: int = 0) -> tuple[Tensor, Tensor]:
    """:func:`mask_tokens` for one (L,) example, so a data loader can mask each with its own
    generator (seeded by seed, epoch and example index) -> (mask (L,), student ids (L,))."""
    if tokens.dim() != 1:
        raise DataError(f"mask_sequence expects (L,) token ids, got shape {tuple(tokens.shape)}")
    mask, student = mask_tokens(tokens.unsqueeze(0), special_ids, mask_id, vocab_size, cfg,
                                generator, num_special_tokens)
    return mask[0], student[0]


# -------------------------------------------------------------------------------------- front-end


def position_ids(padding_mask: Tensor | None, length: int, pad_index: int,
                 batch: int = 1, device: torch.device | None = None) -> Tensor:
    """(B, L) RoBERTa / fairseq positions: real tokens count pad_index + 1, pad_index + 2, …
    over the non-pad tokens of each row; padded slots get pad_index (a zero row)."""
    if padding_mask is None:
        start = pad_index + 1
        return torch.arange(start, start + length, device=device).expand(batch, length)
    real = (~padding_mask).long()  # (B, L)
    return real.cumsum(1) * real + pad_index


class TextFrontEnd(FrontEnd):
    """Token ids (B, L) -> LayerNorm(token + position [+ token_type]) (B, L, D).

    ``local_features`` is the token lookup (shared by student and teacher: the student's ids differ
    only where masked); ``contextualize`` adds positions and normalises. It ignores ``mask``: text
    masking already happened on the ids (``Batch.student_source``).

    ``token_type`` is a constant (D,) buffer, zero for models trained here. HuggingFace
    ``Data2VecTextModel`` / RoBERTa add ``token_type_embeddings.weight[0]`` to every position before
    the LayerNorm (type_vocab_size 1); an importer copies that row into this buffer, which makes
    the two front-ends equal: word_embeddings -> embed_tokens, position_embeddings (514 rows) ->
    embed_positions, LayerNorm -> layer_norm.
    """

    def __init__(self, cfg: TextFrontEndConfig, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.dim = dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, dim, padding_idx=cfg.pad_index, **kw)
        self.embed_positions = nn.Embedding(cfg.max_positions + cfg.pad_index + 1, dim,
                                            padding_idx=cfg.pad_index, **kw)
        self.layer_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps, **kw)
        self.register_buffer("token_type", torch.zeros(dim, **kw))

    def local_features(self, source: Tensor,
                       padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """source (B, L) long ids -> (B, L, D) token embeddings; padding_mask (B, L) True = pad,
        derived from ``source == pad_index`` when not given (None when there is no padding)."""
        if source.shape[1] > self.cfg.max_positions:
            raise DataError(f"text input of shape {tuple(source.shape)} is longer than "
                            f"model.frontend.max_positions={self.cfg.max_positions}")
        if padding_mask is None:
            is_pad = source.eq(self.cfg.pad_index)
            padding_mask = is_pad if bool(is_pad.any()) else None
        return self.embed_tokens(source), padding_mask

    def contextualize(self, features: Tensor, padding_mask: Tensor | None,
                      mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(B, L, D) token embeddings -> LayerNorm(tokens + positions + token_type); mask unused."""
        B, L, _ = features.shape
        positions = position_ids(padding_mask, L, self.cfg.pad_index, B, features.device)
        x = features + self.embed_positions(positions) + self.token_type  # (B, L, D)
        return self.layer_norm(x), padding_mask

    @torch.no_grad()
    def init_weights(self) -> None:
        """Keep the <pad> rows of both tables at zero whatever the generic init drew."""
        self.embed_tokens.weight[self.cfg.pad_index].zero_()
        self.embed_positions.weight[self.cfg.pad_index].zero_()
        self.token_type.zero_()


def build_frontend(cfg: TextFrontEndConfig, dim: int) -> TextFrontEnd:
    """The text front-end at encoder width `dim`."""
    return TextFrontEnd(cfg, dim)


__all__ = ["TextFrontEnd", "TextFrontEndConfig", "TextMaskConfig", "bert_mask", "build_frontend",
           "mask_sequence", "mask_tokens", "position_ids", "span_mask", "special_table"]
