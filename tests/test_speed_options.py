"""Speed options compute what the plain step computes: foreach / fused updates, the top-K average
without stacking, the teacher's bf16 copy, the attention switch, compile, activation
checkpointing, and FSDP2 across two gloo processes."""

from __future__ import annotations

import copy
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import LinearFrontEnd
from data2vec.batch import Batch
from data2vec.config import Config, OptimConfig, RunConfig
from data2vec.nn.attention import Attention, eager_attention
from data2vec.nn.transformer import EncoderConfig, TransformerEncoder
from data2vec.objective import Data2Vec, ObjectiveConfig, build_targets, ema_update
from data2vec.objective.targets import _normalise
from data2vec.train import checkpoint as ckpt
from data2vec.train.distributed import DistInfo
from data2vec.train.loop import Trainer
from data2vec.train.optim import adamw, build_optimizer, scale_and_clip_grads_
from data2vec.train.parallel import checkpoint_activations, compile_blocks, parallelize

GLOBAL_BATCH = 4


def encoder_config(dropout: float = 0.0) -> EncoderConfig:
    return EncoderConfig(depth=3, dim=32, num_heads=4, ffn_dim=64, dropout=dropout,
                         attention_dropout=dropout)


def tiny_model(dropout: float = 0.0) -> Data2Vec:
    return Data2Vec(LinearFrontEnd(6, 32), TransformerEncoder(encoder_config(dropout)),
                    ObjectiveConfig(top_k=2, ema_start=0.9, ema_end=0.99, ema_anneal_steps=4))


def batch(step: int, rows: slice = slice(None)) -> Batch:
    """Global batch `step` (4 rows), or the rows one rank takes of it."""
    g = torch.Generator().manual_seed(step)
    source = torch.randn(GLOBAL_BATCH, 12, 6, generator=g)
    mask = torch.rand(GLOBAL_BATCH, 12, generator=g) < 0.5
    return Batch(source[rows], None, mask[rows])


def tiny_config(**run) -> Config:
    cfg = Config(optim=OptimConfig(lr=1e-3, warmup_steps=1, clip_norm=1.0),
                 run=RunConfig(max_steps=10, tensorboard=False, progress=False, **run))
    cfg.model.encoder = encoder_config()
    return cfg


# ---------------------------------------------------------------------------- updates


def test_foreach_ema_equals_the_per_tensor_formula() -> None:
    student, teacher = tiny_model(), tiny_model()
    student.frontend.mask_emb.requires_grad_(False)  # copied, not averaged
    student.register_buffer("table", torch.randn(5))
    teacher.register_buffer("table", torch.zeros(5))
    expected = {}
    s_params = dict(student.named_parameters())
    for name, t in teacher.named_parameters():
        s = s_params[name]
        expected[name] = t.detach().lerp(s.detach(), 0.25) if s.requires_grad else s.detach()
    ema_update(teacher, student, 0.75)
    for name, t in teacher.named_parameters():
        assert torch.allclose(t, expected[name], atol=1e-7, rtol=0), name
    assert torch.equal(teacher.table, student.table)


@pytest.mark.parametrize("norm,final", [("none", "none"), ("layer", "layer"),
                                        ("instance", "none"), ("instance", "layer")])
def test_top_k_average_without_stacking_equals_the_stacked_mean(norm: str, final: str) -> None:
    layers = [torch.randn(2, 7, 5) for _ in range(4)]
    before = [y.clone() for y in layers]
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    ours = build_targets(layers, 3, norm, final, padding)
    stacked = torch.stack([_normalise(y, norm, padding) for y in layers[-3:]]).mean(0)
    assert torch.allclose(ours, _normalise(stacked, final, padding), atol=1e-6, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(layers, before, strict=True))  # inputs untouched


def test_fused_adamw_and_foreach_equal_the_per_tensor_loop() -> None:
    models = [tiny_model() for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    # eps 1e-6: the key bias's gradient is rounding noise (it cancels in softmax), which a
    # smaller eps would blow up into updates that differ between any two implementations
    optimizers = [torch.optim.AdamW(models[0].student_parameters(), lr=1e-2, eps=1e-6,
                                    foreach=False),
                  adamw([{"params": models[1].student_parameters()}], 1e-2, (0.9, 0.999),
                        1e-6, fused=False),
                  adamw([{"params": models[2].student_parameters()}], 1e-2, (0.9, 0.999),
                        1e-6, fused=True)]
    assert optimizers[2].defaults["fused"] and optimizers[1].defaults["foreach"]
    for step in range(3):
        for model, optimizer in zip(models, optimizers, strict=True):
            model(batch(step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for other in models[1:]:
        for (name, a), b in zip(models[0].named_parameters(), other.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), name


@pytest.mark.parametrize("clip", [0.05, float("inf")])
def test_scaling_and_clipping_in_one_pass_equals_divide_then_clip(clip: float) -> None:
    a, b = tiny_model(), tiny_model()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m(batch(0)).loss_sum.backward()
    count = torch.tensor(7.0)
    for p in a.student_parameters():
        p.grad.div_(count)
    expected = torch.nn.utils.clip_grad_norm_(a.student_parameters(), clip)
    norm = scale_and_clip_grads_(b.student_parameters(), count, clip)
    assert torch.allclose(norm, expected, rtol=1e-6)
    for p, q in zip(a.student_parameters(), b.student_parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-8, rtol=1e-5)


# ----------------------------------------------------------------------- bf16 and kernels


def test_teacher_bf16_copy_gives_the_autocast_result_and_follows_the_weights() -> None:
    model = tiny_model()
    x = torch.randn(2, 9, 32)
    teacher = model.teacher
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = teacher(x, collect_layers=2).layer_results
        teacher.keep_cast_copy(torch.bfloat16)
        cast = teacher(x, collect_layers=2).layer_results
    assert teacher.forward_model is teacher.model  # outside autocast: the fp32 weights
    assert all(torch.equal(p, c) for p, c in zip(plain, cast, strict=True))
    # the copy follows an EMA update and a load into the fp32 weights
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.1)
    model.ema_step(0)
    model.teacher.model.load_state_dict({k: v + 0.01 for k, v in
                                         model.teacher.model.state_dict().items()})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = teacher(x, collect_layers=2).layer_results
        teacher.keep_cast_copy(None)
        plain = teacher(x, collect_layers=2).layer_results
    assert all(torch.equal(p, c) for p, c in zip(plain, cast, strict=True))


def test_joint_model_keeps_no_teacher_copy_its_parts_would_bypass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from data2vec.build import build_model
    from data2vec.config import load_config
    from data2vec.train.parallel import use_teacher_cast_copy

    monkeypatch.setenv("DATA2VEC_HOME", str(tmp_path))
    cfg = load_config("image,text", "tiny", 1,
                      overrides=["run.precision=bf16", "optim.grad_accum=2"])
    model = build_model(cfg)
    assert not use_teacher_cast_copy(model, cfg)
    assert model.teacher._cast_dtype is None
    assert all(part.teacher is not model.teacher for part in model.views.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_kernels_agree(dtype: torch.dtype) -> None:
    attn = Attention(32, 4, impl="sdpa").to(dtype)
    x = torch.randn(2, 11, 32, dtype=dtype)
    pad = torch.zeros(2, 1, 1, 11, dtype=dtype)
    pad[1, ..., 8:] = float("-inf")
    outs = {}
    for impl in ("sdpa", "eager", "auto"):
        attn.impl = impl
        outs[impl] = attn(x, pad).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(outs["sdpa"], outs["eager"], atol=tol)
    assert torch.equal(outs["auto"], outs["eager" if dtype == torch.bfloat16 else "sdpa"])
    q = torch.randn(1, 2, 5, 8)
    ref = F.scaled_dot_product_attention(q, q, q)
    assert torch.allclose(eager_attention(q, q, q, None, 0.0), ref, atol=1e-6)


def test_bf16_training_step_runs_and_tracks_fp32(tmp_path: Path) -> None:
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = tiny_model()
        cfg = tiny_config(precision=precision)
        cfg.optim.grad_accum = 2  # bf16 + accumulation: the teacher's bf16 copy is used
        trainer = Trainer(cfg, tmp_path / precision, model,
                          build_optimizer(model, OptimConfig(lr=1e-3)), None, DistInfo())
        assert (model.teacher._cast_dtype is not None) == (precision == "bf16")
        losses[precision] = [trainer.train_step([batch(s), batch(s + 10)]).loss
                             for s in range(3)]
        assert trainer.step == 3
    assert all(abs(a - b) < 0.05 * abs(a) for a, b in zip(losses["fp32"], losses["bf16"],
                                                          strict=True))


# --------------------------------------------------------------- compile and checkpointing


def _grads_after_one_step(model: Data2Vec, seed: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the same dropout draws for every variant
    model.train()
    model(batch(1)).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_equal_eager() -> None:
    eager = tiny_model()
    compiled = copy.deepcopy(eager)
    # aot_eager: dynamo's capture of our blocks and the AOT forward/backward graphs, without the
    # minute of C++ compilation inductor needs on a cold cache (benchmarks/speed.py runs inductor)
    compile_blocks(list(compiled.encoder.blocks) + list(compiled.teacher.model.blocks),
                   backend="aot_eager")
    expected = _grads_after_one_step(eager)
    got = _grads_after_one_step(compiled)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=1e-5), name


def test_activation_checkpointing_equals_no_checkpointing() -> None:
    plain = tiny_model(dropout=0.2)  # dropout: the recomputation must draw the same masks
    checkpointed = copy.deepcopy(plain)
    checkpoint_activations(list(checkpointed.encoder.blocks))
    expected = _grads_after_one_step(plain)
    got = _grads_after_one_step(checkpointed)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-7, rtol=1e-6), name


def test_parallelize_applies_the_options_in_one_process() -> None:
    model = tiny_model()
    cfg = tiny_config(activation_checkpointing=True)
    assert parallelize(model, cfg, DistInfo()) is model
    assert all("forward" in vars(b) for b in model.encoder.blocks)  # checkpointed
    assert not any("forward" in vars(b) for b in model.teacher.model.blocks)


# ------------------------------------------------------------------ two gloo processes


def _train(model: Data2Vec, cfg: Config, info: DistInfo, run_dir: Path, steps: range,
           resume: Path | None = None) -> tuple[Trainer, list[float]]:
    wrapped = parallelize(model, cfg, info)
    trainer = Trainer(cfg, run_dir, wrapped, build_optimizer(model, cfg.optim), _NoData(), info)
    if resume is not None:
        trainer.resume(resume)
    rows = slice(info.rank * GLOBAL_BATCH // info.world_size,
                 (info.rank + 1) * GLOBAL_BATCH // info.world_size)
    return trainer, [trainer.train_step([batch(s, rows)]).loss for s in steps]


class _NoData:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _worker(rank: int, out: str, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    info = DistInfo(rank, 2, rank)
    results = {}
    try:
        for name, run in (("fsdp", {"data_parallel": "fsdp"}),
                          ("ddp+ac", {"activation_checkpointing": True})):
            torch.manual_seed(0)
            cfg = tiny_config(**run)
            run_dir = Path(out) / name
            trainer, losses = _train(tiny_model(), cfg, info, run_dir, range(3))
            trainer.save()  # FSDP2: gathered from both ranks, written by rank 0
            dist.barrier()  # rank 1 reads what rank 0 wrote
            if name == "fsdp":  # resume the sharded run from its own checkpoint
                torch.manual_seed(1)  # other initial weights: all must come from the checkpoint
                _, more = _train(tiny_model(), cfg, info, run_dir / "resumed", range(3, 4),
                                 resume=ckpt.latest_checkpoint(run_dir / "checkpoints"))
                losses += more
            results[name] = losses
        if rank == 0:
            torch.save(results, Path(out) / "losses.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_and_activation_checkpointing_on_two_processes_equal_one(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=2)
    torch.manual_seed(0)
    trainer, expected = _train(tiny_model(), tiny_config(), DistInfo(), tmp_path / "one",
                               range(3))
    single = {k: v.clone() for k, v in trainer.model.state_dict().items()}  # after 3 updates
    expected.append(trainer.train_step([batch(3)]).loss)
    two = torch.load(tmp_path / "losses.pt")
    for name, losses in two.items():
        assert len(losses) == (4 if name == "fsdp" else 3)
        for step, (a, b) in enumerate(zip(losses, expected, strict=False)):
            assert abs(a - b) <= 1e-5, (name, step)
    # the checkpoints written from the sharded and the replicated runs hold the same weights
    for name in two:
        weights = ckpt.load_weights(ckpt.latest_checkpoint(tmp_path / name / "checkpoints"))
        assert weights.keys() == single.keys()
        for key in weights:
            assert torch.allclose(weights[key], single[key], atol=1e-5), (name, key)


# ------------------------------------------------------------------------------ allocator


MALLOC_PROBE = """
import ctypes, torch
from data2vec.runtime import tune_malloc

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = Info

def mapped_by(size):
    before = mallinfo2().hblkhd
    big = torch.empty(size, dtype=torch.uint8)
    grown = mallinfo2().hblkhd - before
    del big
    return grown

size = 64 * 2**20  # above glibc's largest dynamic mmap threshold (32 MiB)
default = mapped_by(size)
assert tune_malloc()
print(default, mapped_by(size), size)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_tuned_malloc_keeps_large_tensors_off_mmap() -> None:
    # a fresh process: the allocator's state is process-wide, and earlier tests (the command
    # line tunes it) leave a heap large enough to serve the block without any mapping
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout
    default, tuned, size = map(int, out.split())
    assert default >= size  # glibc's default: a fresh mapping, page-faulted in at first use
    assert tuned < size  # tuned: from the heap, reused from step to step
