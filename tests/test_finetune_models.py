"""Heads, layer-wise lr decay, freezing and fine-tuning masks."""

from __future__ import annotations

import math

import pytest
import torch

from data2vec.batch import Batch
from data2vec.finetune.loop import (
    FinetuneConfig,
    _optimizer,
    build_finetune_model,
    load_backbone,
    mix,
    train_step,
)
from data2vec.finetune.models import StandardizedLinear, channel_mask, layer_decay_scales
from data2vec.train.optim import set_lr

SMALL = ["model.encoder.depth=3"]


def _model(task: str, num_outputs: int, **settings):
    ft = FinetuneConfig(task=task, init="scratch", max_steps=4, **settings)
    cfg, backbone = load_backbone(ft, SMALL)
    return ft, cfg, build_finetune_model(ft, cfg, backbone, num_outputs)


def _snapshot(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def _changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, bool]:
    params = dict(model.named_parameters())
    return {n: not torch.equal(params[n], v) for n, v in before.items()}


def test_layer_decay_multipliers() -> None:
    ft, _, model = _model("image-cls", 10, layer_decay=0.5, lr=1e-3)
    scales = layer_decay_scales(model, 0.5)
    depth = 3
    assert scales["frontend.patch_embed.weight"] == 0.5 ** (depth + 1)
    assert scales["frontend.cls_token"] == 0.5 ** (depth + 1)
    for i in range(depth):
        assert scales[f"encoder.blocks.{i}.attn.qkv.weight"] == 0.5 ** (depth - i)
    assert scales["encoder.final_norm.weight"] == 1.0
    assert scales["head.1.weight"] == 1.0
    assert all(v == 1.0 for v in layer_decay_scales(model, 1.0).values())
    optimizer, _ = _optimizer(model, ft)
    set_lr(optimizer, 1e-3)
    names = {n: g["lr"] for g in optimizer.param_groups for n in g["names"]}
    assert math.isclose(names["encoder.blocks.0.mlp.fc1.weight"], 1e-3 * 0.5 ** 3)
    assert math.isclose(names["head.1.weight"], 1e-3)


def _speech_batch() -> Batch:
    gen = torch.Generator().manual_seed(0)
    wave = torch.randn(2, 8000, generator=gen)
    padding = torch.zeros(2, 8000, dtype=torch.bool)
    padding[1, 6000:] = True
    return Batch(source=wave, padding_mask=padding, target=torch.tensor([[1, 2, 3], [2, 3, 0]]),
                 target_lengths=torch.tensor([3, 2]))


def test_frozen_parts_get_no_gradient_and_do_not_change() -> None:
    ft, _, model = _model("asr", 5, freeze_encoder_steps=1, lr=1e-2, mask_prob=0.5,
                          channel_mask_prob=0.5, channel_mask_length=8, schedule="constant")
    optimizer, optim_cfg = _optimizer(model, ft)
    gen = torch.Generator().manual_seed(0)
    before = _snapshot(model, "")
    train_step(model, optimizer, _speech_batch(), ft, optim_cfg, 0, 5, gen)
    changed = _changed(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert not any(v for n, v in changed.items() if not n.startswith("head."))  # step 0: frozen
    assert all(v for n, v in changed.items() if n.startswith("head.") and n.endswith("weight"))
    train_step(model, optimizer, _speech_batch(), ft, optim_cfg, 1, 5, gen)
    changed = _changed(model, before)
    assert not any(v for n, v in changed.items() if ".feature_encoder." in n)  # always frozen
    assert all(not p.requires_grad for p in model.frontend.feature_encoder.parameters())
    assert changed["encoder.blocks.0.attn.qkv.weight"] and changed["frontend.feature_proj.weight"]


def test_linear_probe_trains_only_the_head() -> None:
    ft, _, model = _model("image-cls", 10, linear_probe=True, lr=1e-2, schedule="constant")
    optimizer, optim_cfg = _optimizer(model, ft)
    before = _snapshot(model, "")
    images = torch.randn(4, 3, 32, 32)
    batch = Batch(source=images, target=torch.tensor([0, 1, 2, 3]))
    train_step(model, optimizer, batch, ft, optim_cfg, 0, 10, torch.Generator().manual_seed(0))
    changed = _changed(model, before)
    assert changed["head.1.linear.weight"]
    assert not any(v for n, v in changed.items() if not n.startswith("head."))


def test_channel_mask_spans() -> None:
    gen = torch.Generator().manual_seed(0)
    mask = channel_mask(64, 32, 0.5, 4, gen)  # int(0.5·32/4 + U) = 4 spans of 4 per row
    counts = mask.sum(1)
    assert counts.min() >= 4 and counts.max() <= 16
    assert 0.3 < mask.float().mean() < 0.5  # overlaps keep it under 50 %
    for row in mask:  # every masked channel lies in a run of >= 4
        runs = torch.diff(torch.cat([torch.tensor([0]), row.int(), torch.tensor([0])]))
        starts, ends = (runs == 1).nonzero(), (runs == -1).nonzero()
        assert ((ends - starts) >= 4).all()
    assert not channel_mask(8, 32, 0.0, 4, gen).any()


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixing_keeps_targets_normalised(mode: str) -> None:
    ft = FinetuneConfig(task="image-cls", label_smoothing=0.1, **{mode: 1.0})
    gen = torch.Generator().manual_seed(3)
    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    images, soft = mix(Batch(source=x, target=torch.tensor([0, 1, 2, 3])), 5, ft, gen)
    assert torch.allclose(soft.sum(1), torch.ones(4))
    # row 0 is mixed with row 3 (the flipped batch): its label weights say by how much
    weight_own = float(soft[0, 0] - 0.1 / 5) / 0.9
    if mode == "mixup":
        assert torch.allclose(images[0], torch.full_like(images[0], 3 * (1 - weight_own)),
                              atol=1e-5)
    else:
        kept = float((images[0] == 0).float().mean())
        assert math.isclose(kept, weight_own, abs_tol=1e-6)


def test_v2_speech_fine_tuning_keeps_the_pretrained_alibi_bias(tmp_path) -> None:
    from data2vec.finetune.loop import _save, load_finetuned

    ft = FinetuneConfig(task="asr", init="scratch", version=2, max_steps=4)
    cfg, backbone = load_backbone(ft, SMALL)
    with torch.no_grad():
        backbone.alibi.alibi_scale.copy_(torch.tensor([0.5, 1.5, 2.0, 0.0]))
    model = build_finetune_model(ft, cfg, backbone, 5).eval()
    wave = torch.randn(2, 4000)
    with torch.no_grad():
        ours, _ = model.features(wave)
        pretrained, _ = backbone.eval().encode(wave)  # the v2 encoder with its full ALiBi bias
        assert torch.allclose(ours, pretrained.x, atol=1e-6)
        model.alibi = None  # without the bias the features change: the check has teeth
        assert not torch.allclose(model.features(wave)[0], ours, atol=1e-3)
    model.alibi = backbone.alibi
    assert "alibi.alibi_scale" in dict(model.named_parameters())  # fine-tuned with the rest
    from data2vec.finetune.ctc import Vocabulary

    _save(tmp_path, model, cfg, ft, {"vocab": Vocabulary(["<blank>", "|", "A", "B", "C"])},
          None, 1)
    loaded, *_ = load_finetuned(tmp_path)
    assert torch.equal(loaded.alibi.alibi_scale, backbone.alibi.alibi_scale)


def test_standardized_head_saves_as_the_plain_linear_it_equals() -> None:
    torch.manual_seed(0)
    head = StandardizedLinear(torch.nn.Linear(6, 3))
    features = 5.0 + 0.1 * torch.randn(4, 10, 6)  # a large common offset, as frozen features have
    for chunk in features:  # running statistics: the mean over every training batch
        head(chunk)
    head.eval()
    flat = features.reshape(-1, 6)
    assert torch.allclose(head.norm.running_mean, flat.mean(0), atol=1e-6)
    plain = torch.nn.Linear(6, 3)
    plain.load_state_dict(head.state_dict())  # exactly weight and bias
    assert set(head.state_dict()) == {"weight", "bias"}
    probe = torch.randn(7, 6) * 0.1 + 5.0
    assert torch.allclose(plain(probe), head(probe), atol=1e-5)
    batch_var = torch.stack([chunk.var(0) for chunk in features]).mean(0)  # averaged per batch
    expected = head.linear((probe - flat.mean(0)) / torch.sqrt(batch_var + head.norm.eps))
    assert torch.allclose(head(probe), expected, atol=1e-4)
