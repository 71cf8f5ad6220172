"""The data2vec objective: EMA teacher, τ schedule, targets and the masked regression loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import LinearFrontEnd
from data2vec.batch import Batch
from data2vec.nn.transformer import EncoderConfig, TransformerEncoder
from data2vec.objective import Data2Vec, ObjectiveConfig, build_targets, ema_decay, ema_update
from data2vec.objective.data2vec import regression_loss


def tiny_model(**objective) -> Data2Vec:
    enc = EncoderConfig(depth=4, dim=32, num_heads=4, ffn_dim=64, dropout=0.0,
                        attention_dropout=0.0)
    objective.setdefault("top_k", 3)
    cfg = ObjectiveConfig(ema_start=0.9, ema_end=0.99, ema_anneal_steps=10, **objective)
    return Data2Vec(LinearFrontEnd(6, 32), TransformerEncoder(enc), cfg)


def random_batch(b: int = 3, t: int = 10, pad: bool = False) -> Batch:
    g = torch.Generator().manual_seed(1)
    source = torch.randn(b, t, 6, generator=g)
    mask = torch.rand(b, t, generator=g) < 0.5
    mask[:, 0] = True
    padding = None
    if pad:
        padding = torch.zeros(b, t, dtype=torch.bool)
        padding[0, -3:] = True
        mask &= ~padding
    return Batch(source, padding, mask)


def test_tau_schedule_linear_then_constant() -> None:
    assert ema_decay(0, 0.999, 0.9999, 1000) == pytest.approx(0.999, abs=1e-12)
    assert ema_decay(500, 0.999, 0.9999, 1000) == pytest.approx(0.99945, abs=1e-12)
    assert ema_decay(1000, 0.999, 0.9999, 1000) == pytest.approx(0.9999, abs=1e-12)
    assert ema_decay(10**6, 0.999, 0.9999, 1000) == pytest.approx(0.9999, abs=1e-12)


def test_ema_update_matches_formula() -> None:
    model = tiny_model()
    before = {k: v.double() for k, v in model.teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tau = model.ema_step(step=4)
    assert tau == pytest.approx(0.9 + (0.99 - 0.9) * 0.4)
    student = model.encoder.state_dict()
    for name, t in model.teacher.model.state_dict().items():
        # the reference in float64; the fp32 teacher may differ by its own rounding only
        expected = tau * before[name] + (1 - tau) * student[name].double()
        assert torch.allclose(t.double(), expected, atol=1e-7, rtol=0), name


def test_ema_copies_untrained_parameters_and_freezes_at_one() -> None:
    student, teacher = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    student.bias.requires_grad_(False)
    ema_update(teacher, student, 0.5)
    assert torch.equal(teacher.bias, student.bias)
    frozen = teacher.weight.clone()
    ema_update(teacher, student, 1.0)
    assert torch.equal(teacher.weight, frozen)


def test_teacher_gets_no_gradient_and_no_optimizer_state() -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.student_parameters(), lr=1e-3)
    model(random_batch()).loss.backward()
    opt.step()
    teacher_ids = {id(p) for p in model.teacher.parameters()}
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert teacher_ids.isdisjoint({id(p) for g in opt.param_groups for p in g["params"]})
    assert teacher_ids.isdisjoint({id(p) for p in opt.state})
    assert len(opt.state) == len(model.student_parameters())


def test_shared_front_end_is_the_students_own() -> None:
    """ema_scope='encoder': the teacher holds no front-end copy and reads the student's."""
    model = tiny_model()
    assert not any(k.startswith("proj") or "mask_emb" in k
                   for k in model.teacher.model.state_dict())
    batch = random_batch()
    model.eval()
    before = model._targets(batch, *model._inputs(batch)[1:])
    with torch.no_grad():
        model.frontend.proj.weight.mul_(2.0)
    after = model._targets(batch, *model._inputs(batch)[1:])
    assert not torch.allclose(before, after)  # the change reached the teacher without an EMA step


def test_teacher_stays_in_eval_mode() -> None:
    model = tiny_model()
    model.train()
    assert model.encoder.training and not model.teacher.model.training


def independent_targets(model: Data2Vec, x: torch.Tensor, k: int, source: str, norm: str,
                        final: str) -> torch.Tensor:
    """Hooks capture each block's FFN / end-of-block output; plain loop of F.* norms + mean."""
    captured: list[torch.Tensor] = []
    teacher = model.teacher.model
    hooks = []
    for block in teacher.blocks:
        if source == "ffn":
            hooks.append(block.mlp.register_forward_hook(lambda m, i, o: captured.append(o)))
        else:
            hooks.append(block.register_forward_hook(lambda m, i, o: captured.append(o[0])))
    with torch.no_grad():
        teacher(x)
    for h in hooks:
        h.remove()
    layers = []
    for y in captured[-k:]:
        if norm == "instance":
            y = F.instance_norm(y.transpose(1, 2)).transpose(1, 2)
        elif norm == "layer":
            y = F.layer_norm(y, y.shape[-1:])
        layers.append(y)
    avg = sum(layers) / len(layers)
    if final == "layer":
        avg = F.layer_norm(avg, avg.shape[-1:])
    elif final == "instance":
        avg = F.instance_norm(avg.transpose(1, 2)).transpose(1, 2)
    return avg


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("source", ["ffn", "block"])
@pytest.mark.parametrize("norm,final", [("instance", "none"), ("layer", "layer"),
                                        ("layer", "none"), ("instance", "instance")])
def test_targets_equal_independent_computation(k: int, source: str, norm: str,
                                               final: str) -> None:
    model = tiny_model(top_k=k, target_source=source, layer_norm=norm, final_norm=final)
    x = torch.randn(2, 9, 32)
    out = model.teacher.model(x, collect_layers=k, target_source=source)
    ours = build_targets(out.layer_results, k, norm, final)
    ref = independent_targets(model, x, k, source, norm, final)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


def test_instance_norm_targets_ignore_padding() -> None:
    layer = torch.randn(2, 8, 5)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[1, 5:] = True
    ours = build_targets([layer], 1, "instance", "none", padding)
    alone = F.instance_norm(layer[1:, :5].transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(ours[1, :5], alone[0], atol=1e-6)
    assert torch.count_nonzero(ours[1, 5:]) == 0


@pytest.mark.parametrize("beta", [0.0, 0.5, 4.0])
def test_regression_loss_hand_computed(beta: float) -> None:
    pred = torch.tensor([[0.0, 1.0, -3.0]])
    target = torch.tensor([[0.2, 3.0, -3.0]])
    diff = (pred - target).abs()
    if beta == 0:
        per = diff**2
    else:
        per = torch.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta)
    expected = per.sum() / math.sqrt(3)
    assert torch.allclose(regression_loss(pred, target, beta, 1 / math.sqrt(3)), expected)


def test_loss_ignores_unmasked_and_padded_predictions() -> None:
    model = tiny_model(loss_beta=1.0)
    batch = random_batch(pad=True)
    targets = torch.randn(3, 10, 32)
    prediction = torch.randn(3, 10, 32, requires_grad=True)
    out = model._loss(prediction, targets, batch.mask, batch.padding_mask)
    out.loss.backward()
    ignored = ~batch.mask | batch.padding_mask
    assert torch.count_nonzero(prediction.grad[ignored]) == 0
    changed = prediction.detach().clone()
    changed[ignored] += 100.0
    again = model._loss(changed, targets, batch.mask, batch.padding_mask)
    assert torch.equal(out.loss, again.loss)
    assert int(out.sample_size) == int(batch.mask.sum())


def test_loss_scale_default_is_inverse_sqrt_dim() -> None:
    model = tiny_model()
    mask = torch.ones(1, 2, dtype=torch.bool)
    model.head = torch.nn.Identity()
    pred, target = torch.ones(1, 2, 32), torch.zeros(1, 2, 32)
    out = model._loss(pred, target, mask, None)
    assert out.loss.item() == pytest.approx(32 / math.sqrt(32))


def test_statistics_reported() -> None:
    out = tiny_model()(random_batch())
    assert set(out.stats) == {"target_std", "pred_std", "masked_fraction"}
    batch = random_batch()
    assert out.stats["masked_fraction"].item() == pytest.approx(batch.mask.float().mean().item())
    # instance-normalised targets: unit std per channel over time; the mean of K of them less
    assert 0.2 < out.stats["target_std"] <= 1.01
