"""Speed in one run: matmul peaks, our encoders beside HuggingFace's, our full pre-training steps,
loader throughput, and (optionally) birder's data2vec 2.0 image step.

    python benchmarks/speed.py --quick      # < 10 min on 2 cores: tiny rows + image Base
    python benchmarks/speed.py              # everything (< 45 min on 2 cores, idle)
    python benchmarks/speed.py --birder-python /tmp/birder-venv/bin/python   # + birder rows

Everything is measured side by side in this one process: the matmul peaks first, then for each
modality x size x precision the rows to compare, their repetitions interleaved (ours, HF, ours,
HF, ...) so that a change in the machine's load hits both; each figure is a median. With
other jobs on the cores the absolute figures (and MFU) shrink while the ratios stay
comparable: the JSON records the load average and, per row, the share of the machine's CPU
that other processes used while the row ran.

Rows:

- ``matmul``: best of N 2048^2 matmuls per dtype (fp32, bf16): the ceiling MFU is taken against.
- ``encoder``: front-end + transformer forward and backward (``h.float().pow(2).mean()``) of our
  student and of the HuggingFace ``Data2Vec{Audio,Vision,Text}Model`` built from the same
  config (``data2vec.interop.hf.hf_config_dict``: same shapes, parameters and dropouts), both
  attention kernels of each; rows are skipped with a note when ``transformers`` is missing.
- ``step``: one optimizer update of our real training loop (``Trainer.train_step``: teacher,
  targets, student, decoder / head, loss, backward, gradient scaling and clipping, fused AdamW,
  EMA), data2vec 1.0 and 2.0, on synthetic inputs of the stated shapes with the masks drawn by
  the loader's own maskers; per row the share of the step spent in each part (one extra step
  timed by wrapping the parts) and the peak memory the step adds, per sample.
- ``loader``: the real pre-training loader (demo data, same batch size and crop) in samples
  (speech: seconds of audio) per second, against the step's rate on the same unit.
- ``ablation``: each speed option on and off in the same run (full mode).
- ``birder``: one full data2vec2 step of birder (PyPI) on ViT-B/16 beside ours, in birder's
  venv, via ``../shared/perf-anchors/birder_d2v2_step.py`` (``--birder-python``).

FLOPs are counted by formula (see :func:`encoder_flops`): 2·m·n·k per matmul and convolution
(grouped: divided by the groups), attention 4·T²·D per row and layer forward; backward = 2x
forward, except for layers whose input needs no gradient (the first convolution, the patch
embedding: weight gradient only); the teacher forward only. Element-wise work (norms,
activations, the optimizer, the EMA) is not counted. MFU = counted FLOPs / time / the matmul
peak of the dtype the matmuls ran in (bf16 for bf16 rows): ``mfu`` against the best 2048^2
matmul of the run (measured at its start and end), ``mfu_load_matched`` against a block of
2048^2 matmuls timed in the same rounds as the row (so under the same load from other jobs).

Writes ``benchmarks/results/speed.json`` (``speed_quick.json`` with ``--quick``) and a PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, print_table, write_result  # noqa: E402
from data2vec.batch import Batch  # noqa: E402
from data2vec.build import build_model  # noqa: E402
from data2vec.config import Config, load_config  # noqa: E402
from data2vec.modalities.speech import frame_lengths, parse_conv_spec  # noqa: E402
from data2vec.runtime import tune_malloc  # noqa: E402
from data2vec.train.distributed import DistInfo  # noqa: E402
from data2vec.train.loop import Trainer  # noqa: E402
from data2vec.train.optim import build_optimizer  # noqa: E402

MODALITIES = ("speech", "image", "text")
HF_MODALITY = {"speech": "audio", "image": "vision", "text": "text"}
KIT = Path(__file__).resolve().parents[2] / "shared" / "perf-anchors"
if not KIT.is_dir():
    KIT = Path("/work/shared/perf-anchors")


# ------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class Shape:
    """Per-step input of one row: rows (examples) and their length."""

    batch: int
    samples: int = 0  # speech: waveform samples per example
    length: int = 0  # text: tokens per example

    def describe(self, modality: str, cfg: Config) -> str:
        if modality == "speech":
            return f"{self.batch} x {self.samples / 16000:g} s"
        if modality == "image":
            size = cfg.model.frontend.image_size
            return f"{self.batch} x {size}x{size}"
        return f"{self.batch} x {self.length} tokens"


SHAPES = {  # the issue's Base shapes; tiny: the tiny presets' own batches
    ("speech", "tiny"): Shape(8, samples=16000), ("speech", "base"): Shape(2, samples=64000),
    ("image", "tiny"): Shape(8), ("image", "base"): Shape(8),
    ("text", "tiny"): Shape(8, length=128), ("text", "base"): Shape(8, length=512),
}
V2_BATCH = {"tiny": 4, "base": 4}  # examples per v2 step (x clone_batch masked copies)
V2_BASE_CLONES = 8  # the v2 image row (M = 8, as birder's default); all modalities alike


def config(modality: str, size: str, version: int, precision: str) -> Config:
    cfg = load_config(modality, size, version,
                      overrides=[f"run.precision={precision}", "run.progress=false",
                                 "run.tensorboard=false"])
    if version == 2 and size == "base":
        cfg.model.v2.clone_batch = V2_BASE_CLONES
    return cfg


# ------------------------------------------------------------------------------ machine


def _proc_busy_seconds() -> float:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class OtherLoad:
    """Share of the machine's CPU used by *other* processes while the block ran (0 = none,
    0.5 on 2 cores = one core busy elsewhere)."""

    share = 0.0

    def __enter__(self) -> OtherLoad:
        self.wall, self.busy, self.own = time.perf_counter(), _proc_busy_seconds(), \
            _own_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.wall
        other = (_proc_busy_seconds() - self.busy) - (_own_cpu_seconds() - self.own)
        self.share = max(0.0, other) / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 12) -> float:
    """Best of `reps` n x n matmuls, GFLOP/s: the machine's ceiling for MFU (a peak, so the
    best rather than the median)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def matmul_probe(precision: str, n: int = 2048) -> tuple[Callable[[], None], float]:
    """A fixed block of n x n matmuls (~0.1 s on an idle machine) timed beside a row's steps:
    the machine's matmul rate under the same load as the row, and its FLOPs."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    count = 4 if precision == "bf16" else 1

    def run() -> None:
        for _ in range(count):
            a @ b
    return run, 2.0 * n**3 * count


def with_probe(timed: dict[str, dict[str, Any]], probe_flops: float) -> float:
    """Pop the matmul probe's timings; its GFLOP/s at the median (the row's load-matched peak)."""
    probe = timed.pop("matmul")
    return probe_flops / probe["median_s"] / 1e9


# ------------------------------------------------------------------------------- timing


def interleaved(steps: dict[str, Callable[[], Any]], warmup: int, reps: int,
                before: Callable[[str], None] | None = None,
                min_time_s: float = 0.0) -> dict[str, dict[str, Any]]:
    """Time each step in rounds (a, b, a, b, ...) after `warmup` untimed calls each: `reps`
    rounds, or more until every step's timed calls add up to `min_time_s` (millisecond steps
    need many samples on a shared machine); `before(name)` runs untimed before every call.
    Returns median/min/max s and the other processes' CPU share per step."""
    for name, step in steps.items():
        for _ in range(warmup):
            if before:
                before(name)
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    loads: dict[str, list[float]] = {name: [] for name in steps}
    rounds = 0
    counted = [name for name in steps if name != "matmul"]  # the probe rides along
    while rounds < reps or min(sum(times[name]) for name in counted) < min_time_s:
        rounds += 1
        for name, step in steps.items():
            if before:
                before(name)
            with OtherLoad() as load:
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
            loads[name].append(load.share)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                   "times_s": [round(v, 4) for v in t],
                   "other_load": round(statistics.mean(loads[name]), 3)}
            for name, t in times.items()}


# --------------------------------------------------------------------------------- FLOPs


def encoder_fwd_flops(rows: int, tokens: int, cfg: Config) -> float:
    """Forward FLOPs of the transformer blocks: QKV, projection, MLP and attention."""
    e = cfg.model.encoder
    dense = 2 * (4 * e.dim * e.dim + 2 * e.dim * e.ffn_dim) * tokens
    attention = 4 * tokens * tokens * e.dim
    return rows * e.depth * (dense + attention)


def speech_local_flops(rows: int, samples: int, cfg: Config) -> tuple[float, float, int]:
    """(FLOPs of the conv feature encoder's first layer, of the rest + projection, frames)."""
    fe, dim = cfg.model.frontend, cfg.model.encoder.dim
    layers = parse_conv_spec(fe.conv_spec)
    first = rest = 0.0
    length, in_dim = samples, 1
    for i, (out_dim, kernel, stride) in enumerate(layers):
        length = (length - kernel) // stride + 1
        flops = 2 * in_dim * kernel * out_dim * length
        first, rest = (first + flops, rest) if i == 0 else (first, rest + flops)
        in_dim = out_dim
    rest += 2 * in_dim * dim * length  # feature projection
    return rows * first, rows * rest, length


def pos_conv_flops(rows: int, frames: int, cfg: Config) -> float:
    fe, dim = cfg.model.frontend, cfg.model.encoder.dim
    return rows * fe.pos_conv_depth * 2 * (dim // fe.pos_conv_groups) * fe.pos_conv_kernel * \
        dim * frames


def tokens_of(modality: str, shape: Shape, cfg: Config) -> int:
    """Positions the transformer sees per example (image: patches + CLS)."""
    if modality == "speech":
        layers = parse_conv_spec(cfg.model.frontend.conv_spec)
        return int(frame_lengths(torch.tensor([shape.samples]), layers)[0])
    if modality == "image":
        fe = cfg.model.frontend
        return (fe.image_size // fe.patch_size) ** 2 + (1 if fe.cls_token else 0)
    return shape.length


def encoder_flops(modality: str, shape: Shape, cfg: Config) -> float:
    """Front-end + transformer forward and backward (the encoder rows)."""
    rows, dim = shape.batch, cfg.model.encoder.dim
    if modality == "speech":
        first, rest, frames = speech_local_flops(rows, shape.samples, cfg)
        front = 2 * first + 3 * (rest + pos_conv_flops(rows, frames, cfg))
        return front + 3 * encoder_fwd_flops(rows, frames, cfg)
    tokens = tokens_of(modality, shape, cfg)
    front = 0.0
    if modality == "image":
        fe = cfg.model.frontend
        front = 2 * 2 * fe.in_channels * fe.patch_size**2 * dim * rows * (tokens - 1)
    return front + 3 * encoder_fwd_flops(rows, tokens, cfg)


def decoder_fwd_flops(rows: int, positions: int, cfg: Config) -> float:
    v2, dim = cfg.model.v2, cfg.model.encoder.dim
    kernel_area = v2.decoder_kernel ** (2 if cfg.modality == "image" else 1)
    flops, in_dim = 0.0, dim
    for _ in range(v2.decoder_layers):
        flops += 2 * (in_dim // v2.decoder_groups) * kernel_area * v2.decoder_dim * positions
        in_dim = v2.decoder_dim
    if v2.decoder_projection_layers == 1:
        flops += 2 * v2.decoder_dim * dim * positions
    else:
        flops += 2 * (2 * v2.decoder_dim * v2.decoder_dim + 2 * v2.decoder_dim * dim) * positions
    return rows * flops


def step_flops(modality: str, shape: Shape, cfg: Config, masked: int, visible: int) -> float:
    """One pre-training update: teacher forward, student forward + backward, head / decoder.
    `masked` / `visible`: positions per (v1) example / (v2) masked copy."""
    rows, dim = shape.batch, cfg.model.encoder.dim
    tokens = tokens_of(modality, shape, cfg)
    fe = cfg.model.frontend
    if cfg.version == 1:
        student = encoder_flops(modality, shape, cfg)
        teacher = encoder_fwd_flops(rows, tokens, cfg)
        if modality == "speech":
            teacher += pos_conv_flops(rows, tokens, cfg)
        if modality == "image":  # the teacher's own patch embedding
            teacher += 2 * fe.in_channels * fe.patch_size**2 * dim * rows * (tokens - 1)
        head = (1 if cfg.model.objective.head_layers == 1 else 4) * 2 * dim * dim * masked * rows
        return teacher + student + 3 * head
    clones = cfg.model.v2.clone_batch
    extra = 1 if modality == "image" and fe.cls_token else 0
    grid = tokens - extra
    teacher = encoder_fwd_flops(rows, tokens, cfg)
    student = 3 * encoder_fwd_flops(rows * clones, extra + visible, cfg)
    if modality == "speech":
        first, rest, frames = speech_local_flops(rows, shape.samples, cfg)
        student += 2 * first + 3 * rest + 3 * pos_conv_flops(rows * clones, frames, cfg)
        teacher += pos_conv_flops(rows, frames, cfg)
    if modality == "image":
        patch = 2 * fe.in_channels * fe.patch_size**2 * dim * rows * grid
        teacher += patch
        student += 2 * patch
    return teacher + student + 3 * decoder_fwd_flops(rows * clones, grid, cfg)


# --------------------------------------------------------------------------- inputs


def synthetic_source(modality: str, shape: Shape, cfg: Config, gen: torch.Generator) -> Any:
    if modality == "speech":
        return torch.randn(shape.batch, shape.samples, generator=gen)
    if modality == "image":
        size = cfg.model.frontend.image_size
        return torch.randn(shape.batch, cfg.model.frontend.in_channels, size, size, generator=gen)
    ids = torch.randint(5, cfg.model.frontend.vocab_size, (shape.batch, shape.length),
                        generator=gen)
    ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
    return ids


def masked_batch(modality: str, shape: Shape, cfg: Config, seed: int) -> Batch:
    """A batch of the row's shape, masked by the same functions the loader's collators call."""
    from data2vec.data.v2_masks import block_mask_1d, inverse_block_mask_2d, random_mask
    from data2vec.modalities.image import compute_mask
    from data2vec.modalities.speech import mask_for_waveforms
    from data2vec.modalities.text import mask_sequence

    gen = torch.Generator().manual_seed(seed)
    source = synthetic_source(modality, shape, cfg, gen)
    v2, clones = cfg.model.v2, cfg.model.v2.clone_batch if cfg.version == 2 else 1
    if modality == "speech":
        layers = parse_conv_spec(cfg.model.frontend.conv_spec)
        if cfg.version == 2:
            frames = tokens_of(modality, shape, cfg)
            mask = torch.cat([block_mask_1d(frames, clones, v2.mask_prob, v2.mask_length,
                                            v2.mask_prob_adjust, gen)
                              for _ in range(shape.batch)])
        else:
            mask = mask_for_waveforms(cfg.model.masking, layers, shape.samples, None,
                                      shape.batch, gen)
        return Batch(source, None, mask)
    if modality == "image":
        fe = cfg.model.frontend
        grid = (fe.image_size // fe.patch_size,) * 2
        if cfg.version == 2:
            masks = [inverse_block_mask_2d(grid, clones, v2.mask_prob, v2.mask_length,
                                           v2.mask_prob_adjust, gen) for _ in range(shape.batch)]
        else:
            masks = [compute_mask(cfg.model.masking, 1, grid, gen) for _ in range(shape.batch)]
        return Batch(source, None, torch.cat(masks))
    if cfg.version == 2:
        mask = torch.cat([random_mask(shape.length, clones, v2.mask_prob, gen)
                          for _ in range(shape.batch)])
        return Batch(source, None, mask, student_source=source.repeat_interleave(clones, 0))
    pairs = [mask_sequence(row, (0, 1, 2, 3), 4, cfg.model.frontend.vocab_size,
                           cfg.model.masking, gen) for row in source]
    return Batch(source, None, torch.stack([m for m, _ in pairs]),
                 student_source=torch.stack([s for _, s in pairs]))


# ---------------------------------------------------------------------------- encoders


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" \
        else contextlib.nullcontext()


def _fwd_bwd(model: torch.nn.Module, forward: Callable[[], torch.Tensor], precision: str):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(precision):
            h = forward()
        h.float().pow(2).mean().backward()
    return step


def hf_model(cfg: Config, attn: str):
    """HuggingFace's model of the same config (random weights), in train mode."""
    import transformers

    from data2vec.interop.hf import HF_CLASSES, hf_config_dict

    kwargs = hf_config_dict(cfg)
    if cfg.modality == "speech":
        kwargs["mask_time_prob"] = 0.0  # no SpecAugment: ours encodes unmasked input too
    name = HF_CLASSES[cfg.modality]
    config_cls = getattr(transformers, name.replace("Model", "Config"))
    extra = {} if cfg.modality == "speech" else {"add_pooling_layer": False}
    model = getattr(transformers, name)._from_config(config_cls(**kwargs),
                                                     attn_implementation=attn, **extra)
    return model.train()


def hf_forward(model, modality: str, source: torch.Tensor) -> Callable[[], torch.Tensor]:
    key = {"speech": "input_values", "image": "pixel_values", "text": "input_ids"}[modality]
    return lambda: model(**{key: source}).last_hidden_state


def encoder_rows(modality: str, size: str, precision: str, args: argparse.Namespace,
                 peaks: dict[str, float]) -> list[dict[str, Any]]:
    cfg = config(modality, size, 1, precision)
    shape = SHAPES[modality, size]
    source = synthetic_source(modality, shape, cfg, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ours = build_model(cfg).train()
    # ours with attention_impl=auto (the attention ablation times the other kernel)
    steps: dict[str, Callable[[], None]] = {
        "ours/auto": _fwd_bwd(ours, lambda: ours.encode(source)[0].x, precision)}
    note = ""
    hf_params = None
    try:
        import transformers  # noqa: F401
    except ModuleNotFoundError:
        note = "transformers not installed: HF rows skipped"
    else:
        for attn in (("sdpa", "eager") if args.both_kernels else ("sdpa",)):
            model = hf_model(cfg, attn)
            hf_params = sum(p.numel() for p in model.parameters())
            steps[f"hf/{attn}"] = _fwd_bwd(model, hf_forward(model, modality, source), precision)
    steps["matmul"], probe_flops = matmul_probe(precision)
    timed = interleaved(steps, args.warmup, args.reps, min_time_s=args.min_time)
    row_peak = with_probe(timed, probe_flops)
    flops = encoder_flops(modality, shape, cfg)
    student_params = sum(p.numel() for n, p in ours.named_parameters()
                         if not n.startswith(("teacher.", "head.")))
    ours_key = "ours/auto"
    hf_times = {k: v["median_s"] for k, v in timed.items() if k.startswith("hf/")}
    row: dict[str, Any] = {
        "kind": "encoder", "modality": modality, "size": size, "precision": precision,
        "shape": shape.describe(modality, cfg), "tokens": tokens_of(modality, shape, cfg),
        "params_ours": student_params, "params_hf": hf_params, "flops": flops,
        "variants": timed, "note": note, "matmul_gflops_in_row": row_peak,
    }
    t = timed[ours_key]["median_s"]
    row.update(ours_s=t, samples_per_s=shape.batch / t,
               mfu=flops / t / 1e9 / peaks[precision], mfu_load_matched=flops / t / 1e9 / row_peak,
               other_load=timed[ours_key]["other_load"])
    if hf_times:
        best_hf = min(hf_times, key=hf_times.get)
        hf_min = min(v["min_s"] for k, v in timed.items() if k.startswith("hf/"))
        row.update(hf_s=hf_times[best_hf], hf_best=best_hf,
                   speedup_vs_hf=hf_times[best_hf] / t,
                   speedup_vs_hf_of_minima=hf_min / timed[ours_key]["min_s"],
                   hf_mfu=flops / hf_times[best_hf] / 1e9 / peaks[precision],
                   hf_mfu_load_matched=flops / hf_times[best_hf] / 1e9 / row_peak)
    return [row]


# ------------------------------------------------------------------------------- steps


class PhaseClock:
    """Wall time of each part of one training update, taken by wrapping the parts (one extra,
    untimed-for-the-headline step): teacher, student front-end + encoder forward, decoder /
    head forward + loss, backward (the decoder / head's share from backward hooks), gradient
    scaling and clipping, AdamW, EMA."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.model = trainer, trainer.model
        self.marks: dict[str, float] = {}
        self.spent: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []

    def _wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        own = attr in vars(owner)  # a module's function, or an instance's own attribute

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self.marks.setdefault(f"{name}_start", start)
            try:
                return original(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.marks[f"{name}_end"] = end
                self.spent[name] = self.spent.get(name, 0.0) + end - start

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, original) if own
                          else delattr(owner, attr))

    def measure(self, batch: Batch) -> dict[str, float]:
        import data2vec.train.loop as loop_module

        model = self.model
        head = getattr(model, "decoder", None) or model.head
        self._wrap(model, "forward", "forward")
        self._wrap(model, "_targets", "teacher")
        self._wrap(model.encoder, "forward", "student_encoder")
        self._wrap(model, "decode" if model.version == 2 else "_loss", "head_fwd")
        self._wrap(self.trainer.optimizer, "step", "adamw")
        self._wrap(model, "ema_step", "ema")
        self._wrap(loop_module, "scale_and_clip_grads_", "clip")
        def mark(name: str) -> Callable[..., None]:
            def hook(*_: Any) -> None:  # returns None: the gradients pass unchanged
                self.marks.setdefault(name, time.perf_counter())
            return hook

        hooks = [head.register_full_backward_pre_hook(mark("head_bwd_start")),
                 head.register_full_backward_hook(mark("head_bwd_end"))]
        try:
            start = time.perf_counter()
            loss = self.trainer.train_step([batch]).loss
            total = time.perf_counter() - start
        finally:
            for undo in reversed(self._undo):
                undo()
            for hook in hooks:
                hook.remove()
        s, m = self.spent, self.marks
        backward = m["clip_start"] - m["forward_end"]
        head_bwd = m.get("head_bwd_end", m["forward_end"]) - m.get("head_bwd_start",
                                                                   m["forward_end"])
        parts = {
            "teacher": s["teacher"],
            "student": s["forward"] - s["teacher"] - s["head_fwd"] + backward - head_bwd,
            "decoder_or_head": s["head_fwd"] + head_bwd,
            "optimizer": s["clip"] + s["adamw"],
            "ema": s["ema"],
        }
        parts["other"] = total - sum(parts.values())
        return {"total_s": total, **{k: v / total for k, v in parts.items()},
                "student_encoder_fwd": s["student_encoder"] / total, "loss": loss}


class MallocPeak:
    """Peak bytes glibc has handed out (``mallinfo2``: heap + mmapped, in use) while the block
    runs, above the level when it started, sampled every millisecond in a thread."""

    class _Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                                                   "hblkhd", "usmblks", "fsmblks",
                                                   "uordblks", "fordblks", "keepcost")]

    def __init__(self) -> None:
        self.peak = 0
        try:
            self._fn = ctypes.CDLL("libc.so.6").mallinfo2
            self._fn.restype = self._Info
        except (OSError, AttributeError):
            self._fn = None

    def _used(self) -> int:
        info = self._fn()
        return info.uordblks + info.hblkhd

    def __enter__(self) -> MallocPeak:
        if self._fn is None:
            return self
        self._base = self._used()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self._used() - self._base)
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fn is not None:
            self._stop.set()
            self._thread.join()


def make_trainer(cfg: Config, run_dir: Path) -> Trainer:
    torch.manual_seed(0)
    model = build_model(cfg)
    return Trainer(cfg, run_dir, model, build_optimizer(model, cfg.optim), _NoData(),
                   DistInfo())


class _NoData:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def mask_counts(batch: Batch, cfg: Config) -> tuple[int, int]:
    """(masked positions per example (v1), visible positions per masked copy (v2))."""
    mask = batch.mask
    if cfg.version == 1:
        return int(mask.sum()) // mask.shape[0], 0
    return 0, int((~mask[0]).sum())


def step_rows(modality: str, size: str, precision: str, args: argparse.Namespace,
              peaks: dict[str, float], workdir: Path) -> list[dict[str, Any]]:
    """v1 and v2 updates of the real loop, interleaved, then their phase shares and memory."""
    trainers, batches, cfgs, shapes = {}, {}, {}, {}
    for version in (1, 2):
        cfg = config(modality, size, version, precision)
        shape = SHAPES[modality, size] if version == 1 else \
            Shape(V2_BATCH[size], SHAPES[modality, size].samples, SHAPES[modality, size].length)
        key = f"v{version}"
        cfgs[key], shapes[key] = cfg, shape
        trainers[key] = make_trainer(cfg, workdir / key)
        batches[key] = [masked_batch(modality, shape, cfg, seed)
                        for seed in range(args.warmup + args.reps + 3)]
    cursor = {k: itertools.count() for k in trainers}
    current: dict[str, Batch] = {}

    def pick(name: str) -> None:
        current[name] = batches[name][next(cursor[name]) % len(batches[name])]

    steps = {k: (lambda k=k: trainers[k].train_step([current[k]])) for k in trainers}
    steps["matmul"], probe_flops = matmul_probe(precision)
    timed = interleaved(steps, args.warmup, args.reps, before=lambda k: k in batches and pick(k),
                        min_time_s=args.min_time)
    row_peak = with_probe(timed, probe_flops)
    rows = []
    for key, trainer in trainers.items():
        cfg, shape = cfgs[key], shapes[key]
        batch = batches[key][-1]
        with MallocPeak() as memory:  # its sampling thread is asleep 99 % of the time
            phases = PhaseClock(trainer).measure(batch)
        masked, visible = mask_counts(batch, cfg)
        flops = step_flops(modality, shape, cfg, masked, visible)
        t = timed[key]["median_s"]
        rows.append({
            "kind": "step", "modality": modality, "size": size, "precision": precision,
            "version": cfg.version, "shape": shape.describe(modality, cfg)
            + (f" x M={cfg.model.v2.clone_batch}" if cfg.version == 2 else ""),
            "examples": shape.batch, "median_s": t, "min_s": timed[key]["min_s"],
            "max_s": timed[key]["max_s"], "times_s": timed[key]["times_s"],
            "samples_per_s": shape.batch / t, "flops": flops,
            "mfu": flops / t / 1e9 / peaks[precision], "other_load": timed[key]["other_load"],
            "mfu_load_matched": flops / t / 1e9 / row_peak, "matmul_gflops_in_row": row_peak,
            "phases": phases, "peak_mb_per_sample": memory.peak / 1e6 / shape.batch,
            "masked_per_example": masked, "visible_per_copy": visible,
            "loss": phases.pop("loss"),
        })
    return rows


OP_GROUPS = (  # where the time of a step goes, by aten op (self time)
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot",
                "aten::mkldnn_convolution", "aten::convolution_backward",
                "aten::_convolution", "aten::linear")),
    ("casts & copies", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous",
                        "aten::cat", "aten::index", "aten::gather", "aten::scatter")),
    ("norms", ("layer_norm", "instance_norm", "aten::var", "aten::rsqrt", "batch_norm")),
    ("activations & softmax", ("gelu", "softmax", "aten::dropout", "bernoulli")),
    ("optimizer", ("adam",)),
    ("EMA", ("lerp",)),
)


def profile_rows(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """torch.profiler on one Base image v1 step per precision: self time by op group and the
    top ops (the profile table README quotes where a goal is missed)."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for precision in args.precisions:
        cfg = config("image", args.ablation_size, 1, precision)
        trainer = make_trainer(cfg, workdir / f"profile-{precision}")
        batch = masked_batch("image", SHAPES["image", args.ablation_size], cfg, 0)
        trainer.train_step([batch])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train_step([batch])
        ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        groups: dict[str, float] = {}
        for e in ops:
            name = next((g for g, keys in OP_GROUPS if any(k in e.key for k in keys)),
                        "other element-wise")
            groups[name] = groups.get(name, 0.0) + e.self_cpu_time_total / total
        groups["python, autograd engine, dispatch"] = 1.0 - sum(groups.values())
        top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:12]
        rows.append({"kind": "profile", "precision": precision,
                     "config": f"image {args.ablation_size} v1 step",
                     "groups": {k: round(v, 4) for k, v in groups.items()},
                     "top_ops": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 4),
                                  "calls": e.count} for e in top]})
        print(f"  profile {precision}: " + ", ".join(f"{k} {100 * v:.0f} %"
                                                    for k, v in groups.items()), flush=True)
    return rows


# ------------------------------------------------------------------------------ loader


def loader_rows(modality: str, size: str, args: argparse.Namespace,
                step_rates: dict[tuple, float]) -> list[dict[str, Any]]:
    """The real pre-training loader on the demo data, at the step rows' batch size."""
    from data2vec.data.loader import build_pretrain_loader
    from data2vec.train.pretrain import prepare_data

    rows = []
    for version in (1, 2):
        cfg = config(modality, size, version, "fp32")
        shape = SHAPES[modality, size] if version == 1 else \
            Shape(V2_BATCH[size], SHAPES[modality, size].samples, SHAPES[modality, size].length)
        cfg.data.batch_size = shape.batch
        if modality == "speech":
            cfg.data.max_tokens, cfg.data.max_sample_size = 0, shape.samples
        if modality == "text":
            cfg.data.tokens_per_sample = shape.length
        prepare_data(cfg)
        batches = iter(build_pretrain_loader(cfg))
        next(batches)  # file lists, tokenizer: once per run
        count = args.loader_batches
        units = 0.0
        with OtherLoad() as load:
            start = time.perf_counter()
            for _ in range(count):
                batch = next(batches)
                units += batch.source.numel() / 16000 if modality == "speech" else len(batch)
            elapsed = time.perf_counter() - start
        unit = "audio_s" if modality == "speech" else "examples"
        rate = units / elapsed
        for precision in args.precisions:
            step = step_rates.get((modality, size, version, precision))
            if step is None:
                continue
            step_rate = step * (shape.samples / 16000 if modality == "speech" else 1)
            rows.append({"kind": "loader", "modality": modality, "size": size,
                         "version": version, "precision": precision, "unit": unit,
                         "loader_per_s": rate, "step_per_s": step_rate,
                         "ratio": rate / step_rate, "batches": count,
                         "other_load": load.share, "mask_rows": int(batch.mask.shape[0])})
    return rows


# ----------------------------------------------------------------------------- ablations


def ablation_rows(args: argparse.Namespace, peaks: dict[str, float],
                  workdir: Path) -> list[dict[str, Any]]:
    """Each option on and off, interleaved, on the Base image v1 step in bf16 (the cast copy,
    attention) and fp32 (optimizer, EMA, top-K average), and compile on the tiny step."""
    from data2vec.objective import ema as ema_module
    from data2vec.objective import targets as targets_module

    rows = []

    def pair(name: str, precision: str, on: Callable[[Trainer], None],
             off: Callable[[Trainer], None], size: str = args.ablation_size,
             modality: str = "image", reps: int | None = None, micro: int = 1) -> None:
        cfg = config(modality, size, 1, precision)
        cfg.optim.grad_accum = micro
        a, b = make_trainer(cfg, workdir / "on"), make_trainer(cfg, workdir / "off")
        on(a)
        off(b)
        row_shape = SHAPES[modality, size]
        data = [masked_batch(modality, row_shape, cfg, s) for s in range(4)]
        pos = itertools.count()
        current = {}

        def pick(key: str) -> None:
            current[key] = [data[next(pos) % len(data)] for _ in range(micro)]

        timed = interleaved({"on": lambda: a.train_step(current["on"]),
                             "off": lambda: b.train_step(current["off"])},
                            args.warmup, reps or args.reps, before=pick)
        micro_note = f", {micro} micro-batches per update" if micro > 1 else ""
        rows.append({"kind": "ablation", "option": name, "precision": precision,
                     "config": f"{modality} {size} v1, {row_shape.describe(modality, cfg)}"
                     + micro_note,
                     "on_s": timed["on"]["median_s"], "off_s": timed["off"]["median_s"],
                     "speedup": timed["off"]["median_s"] / timed["on"]["median_s"],
                     "other_load": (timed["on"]["other_load"] + timed["off"]["other_load"]) / 2,
                     "times": timed})
        print(f"  ablation {name} ({precision}): on {timed['on']['median_s']:.3f} s, off "
              f"{timed['off']['median_s']:.3f} s", flush=True)

    def cast(dtype: torch.dtype | None) -> Callable[[Trainer], None]:
        return lambda t: t.model.teacher.keep_cast_copy(dtype)

    for micro in (1, 2):  # on by default only with accumulation (train/parallel.py)
        pair("teacher bf16 weight copy", "bf16", cast(torch.bfloat16), cast(None), micro=micro)

    def attention(impl: str) -> Callable[[Trainer], None]:
        def set_impl(t: Trainer) -> None:
            for m in t.model.modules():
                if hasattr(m, "impl"):
                    m.impl = impl
        return set_impl

    for precision in args.precisions:
        pair(f"attention auto ({'eager' if precision == 'bf16' else 'sdpa'}) vs the other",
             precision, lambda t: None,
             attention("sdpa" if precision == "bf16" else "eager"))

    def loop_optimizer(t: Trainer) -> None:
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")}
                  for g in t.optimizer.param_groups]
        t.optimizer = torch.optim.AdamW(groups, foreach=False)

    pair("fused AdamW (vs torch's CPU default, the per-tensor loop)", "fp32", lambda t: None,
         loop_optimizer)

    # module-level switches need both trainers to run with their own function: swap per call
    def with_ema(fn):
        def step_fn(t: Trainer) -> None:
            original = t.model.teacher.update

            def update(student_part, step):
                saved = ema_module.ema_update
                ema_module.ema_update = fn
                try:
                    return original(student_part, step)
                finally:
                    ema_module.ema_update = saved
            t.model.teacher.update = update
        return step_fn

    def per_tensor_ema(teacher, student, decay):
        if decay >= 1.0:
            return
        s_params = dict(student.named_parameters())
        with torch.no_grad():
            for name, p in teacher.named_parameters():
                s = s_params[name]
                p.lerp_(s, 1 - decay) if s.requires_grad else p.copy_(s)
            s_buffers = dict(student.named_buffers())
            for name, b in teacher.named_buffers():
                b.copy_(s_buffers[name])

    pair("foreach EMA (vs a per-tensor loop)", "fp32", lambda t: None, with_ema(per_tensor_ema))

    def stacked(t: Trainer) -> None:
        original = t.model._targets

        def targets(*a, **k):
            saved = targets_module.build_targets
            module = sys.modules[type(t.model).__module__]

            def build(layers, top_k, norm="instance", final="none", pad=None):
                normed = [targets_module._normalise(y.float(), norm, pad)
                          for y in layers[-top_k:]]
                return targets_module._normalise(torch.stack(normed).mean(0), final, pad)
            module.build_targets = build
            try:
                return original(*a, **k)
            finally:
                module.build_targets = saved
        t.model._targets = targets

    pair("top-K average without stacking", "fp32", lambda t: None, stacked)
    if args.compile:
        from data2vec.train.parallel import compile_blocks, student_blocks, teacher_blocks

        def compiled(t: Trainer) -> None:
            compile_blocks(student_blocks(t.model) + teacher_blocks(t.model))

        for precision in args.precisions:
            pair("torch.compile of every block (inductor)", precision, compiled,
                 lambda t: None, size="tiny", modality="text", reps=max(args.reps, 5))
    return rows


def release_heap() -> None:
    """Give the freed heap back to the OS before starting worker processes. With the tuned
    malloc (no mmap, trim only above 1 GiB free) this process keeps every page it has used —
    17 GB after the Base rows — and the first complete full run was OOM-killed (23 GB machine)
    when the malloc A/B workers built their Base text models beside it."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def malloc_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """glibc defaults vs ``tune_malloc`` on the Base text v1 fp32 step (the issue's example):
    two worker processes (the setting is per process), their repetitions interleaved."""
    workers = {}
    for name, flag in (("tuned", "1"), ("glibc default", "0")):
        env = {**os.environ, "D2V_SPEED_MALLOC": flag, "OMP_NUM_THREADS": str(args.threads)}
        workers[name] = subprocess.Popen(
            [sys.executable, __file__, "--malloc-worker", "--threads", str(args.threads),
             "--ablation-size", args.ablation_size],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    for w in workers.values():  # each builds its model and warms up while the other waits
        w.stdin.write("warm\n")
        w.stdin.flush()
        w.stdout.readline()
    times: dict[str, list[float]] = {k: [] for k in workers}
    for _ in range(args.reps):
        for name, w in workers.items():
            w.stdin.write("step\n")
            w.stdin.flush()
            times[name].append(float(w.stdout.readline()))
    for w in workers.values():
        w.stdin.close()
        w.wait()
    tuned, default = (statistics.median(times[k]) for k in ("tuned", "glibc default"))
    shape = SHAPES["text", args.ablation_size]
    return [{"kind": "ablation", "option": "glibc malloc: no mmap, 1 GiB trim threshold",
             "precision": "fp32", "config": f"text {args.ablation_size} v1, {shape.batch} x "
             f"{shape.length} tokens (two worker processes)",
             "on_s": tuned, "off_s": default, "speedup": default / tuned,
             "times": {k: [round(v, 3) for v in t] for k, t in times.items()}}]


def malloc_worker(args: argparse.Namespace) -> None:
    if os.environ.get("D2V_SPEED_MALLOC") == "1":
        tune_malloc()
    torch.set_num_threads(args.threads)
    cfg = config("text", args.ablation_size, 1, "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(cfg, Path(tmp))
        batches = [masked_batch("text", SHAPES["text", args.ablation_size], cfg, s)
                   for s in range(3)]
        i = itertools.count()
        for line in sys.stdin:
            batch = batches[next(i) % len(batches)]
            if line.strip() == "warm":
                trainer.train_step([batch])
                print("ok", flush=True)
                continue
            start = time.perf_counter()
            trainer.train_step([batch])
            print(time.perf_counter() - start, flush=True)


# -------------------------------------------------------------------------------- birder


def birder_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run this file with --birder-worker in birder's venv (one process holds both steps)."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(KIT)])}
    cmd = [args.birder_python, __file__, "--birder-worker", "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--reps", str(args.reps)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "?"
        return [{"kind": "birder", "note": f"birder worker failed: {last}"}]
    return json.loads(result.stdout.strip().splitlines()[-1])


def birder_worker(args: argparse.Namespace) -> None:
    """In birder's venv: birder's ViT-B/16 data2vec2 step (the kit's rebuild of its training
    script) and ours on the same config, interleaved."""
    import birder_d2v2_step as kit  # ../shared/perf-anchors, on PYTHONPATH

    tune_malloc()  # as our command line does; one process, so birder's step gets it too
    torch.set_num_threads(args.threads)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            case = kit.birder_case("vit_b16", 4, precision, V2_BASE_CLONES, None, None, None,
                                   n_masks=16)
            cfg = config("image", "base", 2, precision)
            trainer = make_trainer(cfg, Path(tmp))
            shape = Shape(4)
            data = [masked_batch("image", shape, cfg, s) for s in range(4)]
            pos = itertools.count()
            current = {}

            def pick(name: str, data=data, pos=pos, current=current, case=case) -> None:
                if name == "birder":
                    case.next_batch()
                else:
                    current["ours"] = data[next(pos) % len(data)]

            timed = interleaved({"ours": lambda t=trainer, c=current: t.train_step([c["ours"]]),
                                 "birder": case.step}, args.warmup, args.reps, before=pick)
            masked, visible = mask_counts(data[0], cfg)
            flops = step_flops("image", shape, cfg, masked, visible)
            ours, theirs = timed["ours"]["median_s"], timed["birder"]["median_s"]
            rows.append({"kind": "birder", "precision": precision, "ours_s": ours,
                         "birder_s": theirs, "speedup_vs_birder": theirs / ours,
                         "mfu_ours": flops / ours / 1e9 / peaks[precision],
                         "mfu_birder": flops / theirs / 1e9 / peaks[precision],
                         "flops": flops, "visible_per_copy": visible, "times": timed,
                         "birder_config": case.config, "peaks_gflops": peaks})
            del case, trainer
    print(json.dumps(rows))


# ---------------------------------------------------------------------------------- report


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    enc = [r for r in payload["rows"] if r["kind"] == "encoder"]
    steps = [r for r in payload["rows"] if r["kind"] == "step"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    labels = [f"{r['modality']} {r['size']} {r['precision']}" for r in enc]
    axes[0].barh(labels, [r.get("speedup_vs_hf", 0) for r in enc], color="tab:blue")
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].axvline(1.25, color="tab:red", lw=0.8, ls="--")
    axes[0].set_title("encoder fwd+bwd: HF time / ours (goal ≥ 1.25 bf16)")
    labels = [f"{r['modality']} {r['size']} v{r['version']} {r['precision']}" for r in steps]
    axes[1].barh(labels, [100 * r["mfu"] for r in steps], color="tab:green")
    axes[1].set_title("full pre-training step: MFU % (formula FLOPs)")
    left = [0.0] * len(steps)
    for part, colour in zip(("teacher", "student", "decoder_or_head", "optimizer", "ema",
                             "other"), ("tab:purple", "tab:blue", "tab:orange", "tab:red",
                                        "tab:brown", "tab:gray"), strict=True):
        width = [max(0.0, r["phases"][part]) for r in steps]
        axes[2].barh(labels, width, left=left, color=colour, label=part)
        left = [a + b for a, b in zip(left, width, strict=True)]
    axes[2].set_title("share of the step")
    axes[2].legend(fontsize=7, loc="lower right")
    load = payload["load_average"]
    fig.suptitle(f"{payload['machine'].get('cpu', '?')}, {payload['threads']} threads; load "
                 f"average {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_tables(rows: list[dict[str, Any]]) -> None:
    pct = {"mfu", "hf_mfu", "mfu_load_matched", "hf_mfu_load_matched", "mfu_ours", "mfu_birder"}
    for kind, cols in (
            ("encoder", ["modality", "size", "precision", "shape", "ours_s", "hf_s", "hf_best",
                         "speedup_vs_hf", "speedup_vs_hf_of_minima", "mfu", "hf_mfu",
                         "mfu_load_matched", "hf_mfu_load_matched", "other_load"]),
            ("step", ["modality", "size", "version", "precision", "shape", "median_s",
                      "samples_per_s", "mfu", "mfu_load_matched", "peak_mb_per_sample",
                      "other_load"]),
            ("loader", ["modality", "size", "version", "precision", "unit", "loader_per_s",
                        "step_per_s", "ratio"]),
            ("ablation", ["option", "precision", "config", "on_s", "off_s", "speedup"]),
            ("birder", ["precision", "ours_s", "birder_s", "speedup_vs_birder", "mfu_ours",
                        "mfu_birder", "note"])):
        subset = [{k: (100 * v if k in pct and isinstance(v, float) else v)
                   for k, v in r.items()} for r in rows if r["kind"] == kind]
        if subset:
            print(f"\n== {kind}")
            print_table(subset, cols)
    steps = [r for r in rows if r["kind"] == "step"]
    if steps:
        print("\n== share of each step")
        print_table([{"row": f"{r['modality']} {r['size']} v{r['version']} {r['precision']}",
                      **{k: round(100 * v) for k, v in r["phases"].items() if k != "total_s"}}
                     for r in steps],
                    ["row", "teacher", "student", "decoder_or_head", "optimizer", "ema",
                     "other"])


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny rows of every modality and the image Base rows (< 10 min)")
    parser.add_argument("--modalities", nargs="+", default=list(MODALITIES))
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per row")
    parser.add_argument("--min-time", type=float, default=4.0,
                        help="more repetitions until each variant's timed steps add up to this "
                        "many seconds (tiny rows)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=8)
    parser.add_argument("--birder-python", help="python of a venv with birder (see "
                        "../shared/perf-anchors/setup_venvs.sh); omitted: no birder rows")
    parser.add_argument("--no-ablations", action="store_true",
                        help="skip the ablation and malloc rows (the op profile still runs)")
    parser.add_argument("--skip-steps", nargs="*", default=[], metavar="MODALITY",
                        help="encoder rows only for these modalities (no step or loader rows)")
    parser.add_argument("--ablation-size", default="base", choices=["tiny", "base"],
                        help="preset of the ablation and malloc rows")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile ablation (minutes of compilation)")
    parser.add_argument("--out", help="result name (default speed / speed_quick)")
    parser.add_argument("--birder-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--malloc-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.birder_worker:
        return birder_worker(args)
    if args.malloc_worker:
        return malloc_worker(args)
    tune_malloc()  # as the command line does
    torch.set_num_threads(args.threads)
    args.both_kernels = not args.quick
    began = time.perf_counter()
    load_start = os.getloadavg()
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak 2048^2: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} "
          f"GFLOP/s; load average {load_start[0]:.1f}", flush=True)
    plan = [(m, s) for s in args.sizes for m in args.modalities
            if not args.quick or s == "tiny" or m == "image"]
    rows: list[dict[str, Any]] = []
    step_rates: dict[tuple, float] = {}
    name = args.out or ("speed_quick" if args.quick else "speed")

    def save_partial() -> None:  # a stopped run keeps the rows it measured
        write_result(f"{name}.partial", {"threads": args.threads, "peaks_gflops": peaks,
                                          "partial": True, "rows": rows})

    with tempfile.TemporaryDirectory() as tmp:
        for modality, size in plan:
            for precision in args.precisions:
                print(f"-- {modality} {size} {precision}", flush=True)
                for row in encoder_rows(modality, size, precision, args, peaks):
                    rows.append(row)
                    print(f"  encoder: ours {row['ours_s']:.3f} s, HF "
                          f"{row.get('hf_s', float('nan')):.3f} s ({row.get('hf_best')}), "
                          f"x{row.get('speedup_vs_hf', float('nan')):.2f}, MFU "
                          f"{100 * row['mfu']:.0f} %", flush=True)
                if modality in args.skip_steps:
                    continue
                for row in step_rows(modality, size, precision, args, peaks, Path(tmp)):
                    rows.append(row)
                    step_rates[modality, size, row["version"], precision] = row["samples_per_s"]
                    print(f"  step v{row['version']}: {row['median_s']:.3f} s, MFU "
                          f"{100 * row['mfu']:.0f} %", flush=True)
            if modality not in args.skip_steps:
                rows += loader_rows(modality, size, args, step_rates)
            save_partial()
        if not (args.quick or args.no_ablations):
            rows += ablation_rows(args, peaks, Path(tmp))
            save_partial()
            release_heap()
            rows += malloc_rows(args)
        if not args.quick:
            rows += profile_rows(args, Path(tmp))
            save_partial()
    if args.birder_python:
        release_heap()
        rows += birder_rows(args)
    else:
        rows.append({"kind": "birder", "note": "skipped: no --birder-python (birder needs its "
                     "own venv, never the project's)"})
    peaks_end = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    load_end = os.getloadavg()
    best = {k: max(peaks[k], peaks_end[k]) for k in peaks}
    for row in rows:  # MFU against the better of the two ceilings (the least disturbed)
        if row["kind"] == "encoder":
            row["mfu"] = row["flops"] / row["ours_s"] / 1e9 / best[row["precision"]]
            if "hf_s" in row:
                row["hf_mfu"] = row["flops"] / row["hf_s"] / 1e9 / best[row["precision"]]
        elif row["kind"] == "step":
            row["mfu"] = row["flops"] / row["median_s"] / 1e9 / best[row["precision"]]
        elif row["kind"] == "birder" and "flops" in row:  # not the worker's own, colder probe
            row["mfu_ours"] = row["flops"] / row["ours_s"] / 1e9 / best[row["precision"]]
            row["mfu_birder"] = row["flops"] / row["birder_s"] / 1e9 / best[row["precision"]]
    payload = {
        "threads": args.threads, "quick": args.quick, "wall_s": time.perf_counter() - began,
        "peaks_gflops": peaks, "peaks_gflops_at_end": peaks_end,
        "load_average": {"start": list(load_start), "end": list(load_end)},
        "flops_method": "formula: 2mnk per matmul / conv (grouped / groups), attention 4T^2D "
                        "per row and layer forward, backward 2x (weight-gradient only for "
                        "layers whose input needs none), teacher forward only; element-wise "
                        "ops not counted",
        "mfu_note": "MFU against the best 2048^2 matmul of this run; other processes shared "
                    "the 2 cores (see load_average and each row's other_load): absolute "
                    "figures are lower bounds, ratios within a row are side by side",
        "rows": rows,
    }
    print_tables(rows)
    path = write_result(name, payload)
    (RESULTS / f"{name}.partial.json").unlink(missing_ok=True)
    plot({**payload, "machine": machine()}, RESULTS / f"{name}.png")
    print(f"\n{path} ({payload['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
