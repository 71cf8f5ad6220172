"""Training loop mechanics: schedules, EMA per update, resume equality, atomic checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import LinearFrontEnd
from data2vec.batch import Batch
from data2vec.config import Config, OptimConfig, RunConfig
from data2vec.errors import CheckpointError
from data2vec.nn.transformer import EncoderConfig, TransformerEncoder
from data2vec.objective import Data2Vec, ObjectiveConfig
from data2vec.train import checkpoint as ckpt
from data2vec.train.distributed import DistInfo
from data2vec.train.loop import Trainer, TrainingError
from data2vec.train.optim import build_optimizer, lr_at, no_weight_decay


class SyntheticBatches:
    """Endless seeded batches whose position is saved and restored, like the real loaders."""

    def __init__(self, seed: int = 0, batch_size: int = 4) -> None:
        self.seed, self.batch_size, self.position = seed, batch_size, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.position)
            self.position += 1
            source = torch.randn(self.batch_size, 12, 6, generator=g)
            yield Batch(source, None, torch.rand(self.batch_size, 12, generator=g) < 0.5)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def make_trainer(run_dir: Path, max_steps: int = 6, grad_accum: int = 1, **run) -> Trainer:
    torch.manual_seed(0)
    enc = EncoderConfig(depth=3, dim=32, num_heads=4, ffn_dim=64, dropout=0.1,
                        attention_dropout=0.1, layerdrop=0.2)
    model = Data2Vec(LinearFrontEnd(6, 32), TransformerEncoder(enc),
                     ObjectiveConfig(top_k=2, ema_start=0.9, ema_end=0.99, ema_anneal_steps=4))
    cfg = Config(optim=OptimConfig(lr=1e-3, warmup_steps=2, grad_accum=grad_accum, clip_norm=1.0),
                 run=RunConfig(max_steps=max_steps, checkpoint_every=3, keep_last=2,
                               tensorboard=False, progress=False, log_every=1, **run))
    cfg.model.encoder = enc
    return Trainer(cfg, run_dir, model, build_optimizer(model, cfg.optim), SyntheticBatches(),
                   DistInfo())


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


def test_cosine_and_tri_stage_schedules() -> None:
    cos = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cos, 110) == pytest.approx(0.1)
    assert lr_at(9, cos, 110) == pytest.approx(1.0)
    assert lr_at(60, cos, 110) == pytest.approx(0.5)
    assert lr_at(110, cos, 110) == pytest.approx(0.0, abs=1e-12)
    tri = OptimConfig(lr=1.0, schedule="tri_stage", tri_stage=(0.1, 0.4, 0.5),
                      init_lr_scale=0.01, final_lr_scale=0.05)
    assert lr_at(0, tri, 100) == pytest.approx(0.01)
    assert lr_at(30, tri, 100) == pytest.approx(1.0)
    assert lr_at(75, tri, 100) == pytest.approx(math.exp(math.log(0.05) * 0.5))
    assert lr_at(100, tri, 100) == pytest.approx(0.05)


def test_no_weight_decay_rule() -> None:
    p2, p1 = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    assert not no_weight_decay("blocks.0.mlp.fc1.weight", p2)
    assert no_weight_decay("blocks.0.mlp.fc1.bias", p1)
    assert no_weight_decay("blocks.0.norm1.weight", p1)
    assert no_weight_decay("alibi_scale", torch.nn.Parameter(torch.ones(1, 1, 4, 1, 1)))


def test_ema_steps_once_per_update_with_accumulation(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=3, grad_accum=3)
    calls = []
    original = trainer.model.ema_step
    trainer.model.ema_step = lambda step: calls.append(step) or original(step)
    trainer.run()
    assert calls == [0, 1, 2]
    assert trainer.batches.position == 9  # 3 updates x 3 micro-batches


def test_resume_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    full = make_trainer(tmp_path / "full", max_steps=6)
    full.run()
    first = make_trainer(tmp_path / "part", max_steps=3)
    first.run()
    resumed = make_trainer(tmp_path / "part", max_steps=6)
    resumed.resume(ckpt.latest_checkpoint(tmp_path / "part" / "checkpoints"))
    resumed.run()
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, step
    wa = full.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        assert torch.allclose(v, wa[k], atol=1e-6), k


def test_checkpoints_atomic_and_pruned(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=7)
    trainer.run()
    kept = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert kept == ["step-0000006", "step-0000007"]
    assert not list((tmp_path / "checkpoints").glob(".step-*"))  # no temp dirs left behind
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-0000007"


def test_truncated_checkpoint_is_named(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.run()
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    weights = latest / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ckpt.load_weights(latest)
    state = latest / ckpt.STATE
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="state.pt"):
        ckpt.load_state(latest)


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=5)
    good = {}
    original = trainer.model.forward

    def forward(batch):
        out = original(batch)
        if trainer.step == 2:
            good.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
            out.loss_sum = out.loss_sum * float("nan")
        return out

    trainer.model.forward = forward
    with pytest.raises(TrainingError, match="non-finite loss at step 3"):
        trainer.run()
    saved = ckpt.load_weights(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert ckpt.load_state(ckpt.latest_checkpoint(tmp_path / "checkpoints"))["step"] == 2
    assert all(torch.equal(saved[k], v) for k, v in good.items())


def test_collapse_alarm_logs_and_optionally_aborts(tmp_path: Path, caplog) -> None:
    trainer = make_trainer(tmp_path / "a", max_steps=2, collapse_min_target_std=10.0)
    with caplog.at_level("WARNING", logger="data2vec"):
        trainer.run()
    assert "COLLAPSE ALARM" in caplog.text
    aborting = make_trainer(tmp_path / "b", max_steps=2, collapse_min_target_std=10.0,
                            abort_on_collapse=True)
    with pytest.raises(TrainingError, match="collapse at step 1"):
        aborting.run()


# ------------------------------------------------------------- loss normalisation and padding


def _padded_batches(k: int, seed: int = 0) -> list[Batch]:
    """k micro-batches whose masks also cover padded positions (as v2 text masks may)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        source = torch.randn(3, 12, 6, generator=g)
        padding = torch.zeros(3, 12, dtype=torch.bool)
        padding[1, 12 - 3 - 2 * i:] = True
        padding[2, 5:] = True
        mask = torch.rand(3, 12, generator=g) < 0.6
        mask[2, 6:] = True  # masked *and* padding
        out.append(Batch(source, padding, mask))
    return out


def _grads_at_step(trainer: Trainer, micro_batches: list[Batch]) -> tuple[dict, float]:
    """Gradients the optimizer sees (after division, before clipping changes nothing: no clip)."""
    seen: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step

    def record(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()
                     if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = record
    result = trainer.train_step(micro_batches)
    return seen, result.loss


def _deterministic_trainer(run_dir: Path, grad_accum: int = 1) -> Trainer:
    trainer = make_trainer(run_dir, grad_accum=grad_accum)
    trainer.cfg.optim.clip_norm = 0.0
    for m in trainer.model.modules():  # dropout and layer-drop off: passes must be comparable
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.0
    trainer.model.encoder.cfg.layerdrop = 0.0
    return trainer


def test_loss_and_gradient_count_only_masked_positions_that_are_not_padding(
        tmp_path: Path) -> None:
    trainer = _deterministic_trainer(tmp_path)
    batch = _padded_batches(1)[0]
    reference = _deterministic_trainer(tmp_path / "ref").model
    reference.load_state_dict(trainer.model.state_dict())
    reference.train()
    out = reference(batch)
    counted = (batch.mask & ~batch.padding_mask).sum()
    assert int(out.sample_size) == int(counted) < int(batch.mask.sum())
    out.loss.backward()
    grads, logged = _grads_at_step(trainer, [batch])
    assert logged == pytest.approx(out.loss.item(), rel=1e-6)
    for name, p in reference.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5)


def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch(tmp_path: Path) -> None:
    micro = _padded_batches(3, seed=1)
    whole = Batch(torch.cat([b.source for b in micro]),
                  torch.cat([b.padding_mask for b in micro]), torch.cat([b.mask for b in micro]))
    accumulated = _deterministic_trainer(tmp_path / "k", grad_accum=3)
    one = _deterministic_trainer(tmp_path / "one")
    one.model.load_state_dict(accumulated.model.state_dict())
    grads_k, loss_k = _grads_at_step(accumulated, micro)
    grads_1, loss_1 = _grads_at_step(one, [whole])
    assert loss_k == pytest.approx(loss_1, rel=1e-6)
    assert grads_k.keys() == grads_1.keys() and grads_k
    for name in grads_1:
        torch.testing.assert_close(grads_k[name], grads_1[name], atol=1e-6, rtol=1e-5)
