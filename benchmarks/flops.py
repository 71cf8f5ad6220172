"""Training FLOPs of one pre-training update, by formula, from the batch's actual shapes.

What is counted (torch's flop counter misses the CPU attention kernels and over-counts grouped
conv gradients on torch 2.13, see shared/design/environment-facts.md, hence formulas):

- every matrix multiply and convolution of a forward pass, 2 FLOPs per multiply-add: the speech
  conv feature encoder, feature projection and positional convs, the image patch embedding, the
  transformer (q/k/v/out projections, the T x T attention scores and their weighted sum, FFN),
  the v1 regression head at masked positions, the v2 conv decoder and its projection;
- the student's backward as 2x its forward; the teacher's forward once (it has no backward);
  the teacher's front-end work as its ``ema_scope`` implies (its own patch embedding for
  images; speech: the positional convs re-run on the student's conv features);
- not counted: norms, activations, softmax, dropout, embeddings lookups, the loss, AdamW and EMA.

Where torch's counter is right (groups 1, eager attention) the two agree within 1 %
(tests/test_benchmark_flops.py, every modality, both versions).

Example::

    flops = update_flops(cfg, batch)     # cfg: the single-modality Config of the batch
"""

from __future__ import annotations

from data2vec.batch import Batch
from data2vec.config import Config
from data2vec.modalities.speech import frame_lengths, parse_conv_spec


def linear(rows: int, d_in: int, d_out: int) -> int:
    """A Linear(d_in, d_out) applied to `rows` vectors."""
    return 2 * rows * d_in * d_out


def conv(rows: int, out_positions: int, c_in: int, c_out: int, kernel_elems: int,
         groups: int = 1) -> int:
    """A (grouped) convolution with `kernel_elems` taps producing `out_positions` per row."""
    return 2 * rows * out_positions * c_out * (c_in // groups) * kernel_elems


def encoder(cfg: Config, rows: int, length: int) -> int:
    """The transformer over `rows` sequences of `length` tokens."""
    enc = cfg.model.encoder
    dim, tokens = enc.dim, rows * length
    per_block = (linear(tokens, dim, 3 * dim) + linear(tokens, dim, dim)  # qkv, out
                 + 2 * 2 * rows * length * length * dim                   # scores, weighted sum
                 + linear(tokens, dim, enc.ffn_dim) + linear(tokens, enc.ffn_dim, dim))
    return enc.depth * per_block


def _speech_local(cfg: Config, rows: int, samples: int) -> tuple[int, int]:
    """(FLOPs of conv feature encoder + projection, frames)."""
    layers = parse_conv_spec(cfg.model.frontend.conv_spec)
    flops, length, c_in = 0, samples, 1
    for c_out, kernel, stride in layers:
        length = (length - kernel) // stride + 1
        flops += conv(rows, length, c_in, c_out, kernel)
        c_in = c_out
    return flops + linear(rows * length, c_in, cfg.model.encoder.dim), length


def _speech_positions(cfg: Config, rows: int, frames: int) -> int:
    fe, dim = cfg.model.frontend, cfg.model.encoder.dim
    return fe.pos_conv_depth * conv(rows, frames, dim, dim, fe.pos_conv_kernel, fe.pos_conv_groups)


def _head(cfg: Config, positions: int) -> int:
    dim = cfg.model.encoder.dim
    if cfg.model.objective.head_layers == 1:
        return linear(positions, dim, dim)
    return linear(positions, dim, 2 * dim) + linear(positions, 2 * dim, dim)


def _decoder(cfg: Config, rows: int, length: int) -> int:
    v2, dim = cfg.model.v2, cfg.model.encoder.dim
    taps = v2.decoder_kernel ** (2 if cfg.modality == "image" else 1)
    flops, c_in = 0, dim
    for _ in range(v2.decoder_layers):
        flops += conv(rows, length, c_in, v2.decoder_dim, taps, v2.decoder_groups)
        c_in = v2.decoder_dim
    if v2.decoder_projection_layers == 1:
        return flops + linear(rows * length, v2.decoder_dim, dim)
    return (flops + linear(rows * length, v2.decoder_dim, 2 * v2.decoder_dim)
            + linear(rows * length, 2 * v2.decoder_dim, dim))


def _shapes(cfg: Config, batch: Batch) -> tuple[int, int, int, int]:
    """(examples B, student rows R, positions T per row, extra tokens n)."""
    rows = batch.mask.shape[0]
    if cfg.modality == "speech":
        layers = parse_conv_spec(cfg.model.frontend.conv_spec)
        frames = int(frame_lengths(batch.source.new_tensor([batch.source.shape[1]]).long(),
                                   layers)[0])
        return batch.source.shape[0], rows, frames, 0
    if cfg.modality == "image":
        fe = cfg.model.frontend
        return batch.source.shape[0], rows, (fe.image_size // fe.patch_size) ** 2, \
            int(fe.cls_token)
    return batch.source.shape[0], rows, batch.source.shape[1], 0


def update_flops(cfg: Config, batch: Batch) -> dict[str, int]:
    """{"student_forward", "teacher_forward", "total"} FLOPs of one update on `batch`."""
    examples, rows, length, extra = _shapes(cfg, batch)
    dim, masked = cfg.model.encoder.dim, int(batch.mask.sum())
    visible = length - masked // rows  # v2: the same count in every row
    local = teacher_local = 0
    if cfg.modality == "speech":
        local, _ = _speech_local(cfg, examples, batch.source.shape[1])
    elif cfg.modality == "image":
        fe = cfg.model.frontend
        local = linear(examples * length, fe.in_channels * fe.patch_size ** 2, dim)
        teacher_local = local  # the image teacher has its own patch embedding ('all')
    if cfg.version == 1:
        positions = _speech_positions(cfg, rows, length) if cfg.modality == "speech" else 0
        student = local + positions + encoder(cfg, rows, length + extra) + _head(cfg, masked)
        teacher = teacher_local + positions + encoder(cfg, examples, length + extra)
    else:
        positions = _speech_positions(cfg, rows, length) if cfg.modality == "speech" else 0
        student = (local + positions + encoder(cfg, rows, visible + extra)
                   + _decoder(cfg, rows, length))
        teacher = (teacher_local + encoder(cfg, examples, length + extra)
                   + (_speech_positions(cfg, examples, length) if cfg.modality == "speech"
                      else 0))
    return {"student_forward": student, "teacher_forward": teacher,
            "total": 3 * student + teacher}
