"""data2vec 2.0 objective: the student never sees masked steps, one teacher pass per example,
decoder shapes, loss and CLS loss reach only what they should, ALiBi, EMA scopes."""

from __future__ import annotations

import math

import pytest
import torch

from data2vec.batch import Batch
from data2vec.build import build_model
from data2vec.config import Config, load_config
from data2vec.data.v2_masks import block_mask_1d, inverse_block_mask_2d, random_mask
from data2vec.errors import ConfigError, DataError
from data2vec.nn.decoder import Decoder1d, Decoder2d, DecoderConfig
from data2vec.objective.data2vec2 import Data2VecV2, alibi_slopes

SMALL = ["model.encoder.depth=2", "model.encoder.dim=32", "model.encoder.num_heads=2",
         "model.encoder.ffn_dim=64", "model.objective.top_k=2", "model.v2.decoder_dim=32",
         "model.v2.decoder_layers=2"]


def small_config(modality: str, clones: int = 2, *extra: str) -> Config:
    overrides = [*SMALL, f"model.v2.clone_batch={clones}", *extra]
    if modality == "speech":
        overrides += ["model.frontend.conv_spec=[(16,10,5)] + [(16,3,2)]*2"]
    if modality == "text":
        overrides += ["model.frontend.vocab_size=50"]
    return load_config(modality, "tiny", 2, overrides=overrides)


def small_batch(cfg: Config, b: int = 2, seed: int = 0) -> Batch:
    """Random input and exact-count masks as the v2 data loader makes them."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model.v2.clone_batch
    if cfg.modality == "speech":
        source = torch.randn(b, 1200, generator=g)
        frames = 59  # 1200 samples -> 239 -> 119 -> 59 frames
        mask = block_mask_1d(frames, b * m, 0.5, 5, 0.05, g)
        return Batch(source=source, mask=mask)
    if cfg.modality == "image":
        source = torch.randn(b, 3, 32, 32, generator=g)
        return Batch(source=source, mask=inverse_block_mask_2d((8, 8), b * m, 0.8, 3, 0.07, g))
    source = torch.randint(4, 50, (b, 24), generator=g)
    return Batch(source=source, mask=random_mask(24, b * m, 0.48, g))


def model_for(cfg: Config) -> Data2VecV2:
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, Data2VecV2)
    return model


@pytest.mark.parametrize("modality", ["speech", "image", "text"])
def test_student_output_ignores_masked_input(modality: str) -> None:
    """Changing the local features at masked steps leaves the student encoder output exactly
    unchanged (speech: conv positions and ALiBi included)."""
    cfg = small_config(modality)
    model = model_for(cfg).eval()
    batch = small_batch(cfg)
    local, pad = model.frontend.local_features(batch.source, None)
    rows = local.repeat_interleave(2, 0)
    out = model.encode_visible(local, pad, batch.mask)[0].x
    noisy = rows + 5.0 * torch.randn_like(rows) * batch.mask.unsqueeze(-1)
    # encode each clone row on its own, as an example whose masked steps were changed
    for r in range(rows.shape[0]):
        clean = model.encode_visible(rows[r:r + 1], None, batch.mask[r:r + 1])[0].x
        changed = model.encode_visible(noisy[r:r + 1], None, batch.mask[r:r + 1])[0].x
        assert torch.equal(clean, changed)
        assert torch.allclose(clean, out[r:r + 1], atol=1e-5)
    # and the change does matter when the same steps are visible
    visible = model.encode_visible(noisy[:1], None, torch.zeros_like(batch.mask[:1]))[0].x
    base = model.encode_visible(rows[:1], None, torch.zeros_like(batch.mask[:1]))[0].x
    assert not torch.allclose(visible, base)


def test_image_pixels_of_masked_patches_do_not_reach_the_student() -> None:
    cfg = small_config("image", 1)
    model = model_for(cfg).eval()
    batch = small_batch(cfg, b=1)
    patch_mask = batch.mask.view(1, 1, 8, 8).float()
    pixel_mask = torch.nn.functional.interpolate(patch_mask, scale_factor=4).bool()  # (1,1,32,32)
    noisy = batch.source + 3.0 * torch.randn_like(batch.source) * pixel_mask
    a = model.encode(batch.source, mask=batch.mask)[0].x
    b = model.encode(noisy, mask=batch.mask)[0].x
    assert torch.equal(a, b)
    assert a.shape == (1, 1 + 12, 32)  # CLS + 12 visible patches


@pytest.mark.parametrize("clones", [1, 4])
@pytest.mark.parametrize("modality", ["speech", "image", "text"])
def test_teacher_runs_once_per_example(modality: str, clones: int) -> None:
    cfg = small_config(modality, clones)
    model = model_for(cfg).train()
    calls: list[int] = []
    model.teacher.model["encoder"].register_forward_hook(
        lambda mod, args, out: calls.append(args[0].shape[0]))
    student_rows: list[int] = []
    model.encoder.register_forward_hook(
        lambda mod, args, out: student_rows.append(args[0].shape[0]))
    out = model(small_batch(cfg, b=3))
    assert calls == [3]  # one pass over the 3 examples, whatever M is
    assert student_rows == [3 * clones]
    assert torch.isfinite(out.loss)


def test_targets_are_repeated_to_the_clones() -> None:
    cfg = small_config("speech", 3)
    model = model_for(cfg)
    batch = small_batch(cfg, b=2)
    local, pad = model.frontend.local_features(batch.source, None)
    targets = model._targets(batch, local, pad)
    assert targets.shape[0] == 2
    # the loss uses targets repeat_interleave'd: rows 0-2 share example 0's targets
    seen: list[torch.Tensor] = []
    original = model._loss
    model._loss = lambda p, t, m, pm: (seen.append(t), original(p, t, m, pm))[1]
    model(batch)
    assert torch.equal(seen[0][0], seen[0][2]) and torch.equal(seen[0][0], targets[0])
    assert torch.equal(seen[0][3], targets[1])


@pytest.mark.parametrize("two_d", [False, True])
def test_decoder_shapes_and_residual(two_d: bool) -> None:
    cfg = DecoderConfig(dim=16, layers=3, kernel=4 if not two_d else 3, groups=4, residual=True)
    dec = Decoder2d(cfg, 24, (5, 6)) if two_d else Decoder1d(cfg, 24)
    x = torch.randn(2, 30, 24)
    assert dec(x).shape == (2, 30, 24)
    assert len(dec.layers) == 3 and dec.layers[0].conv.in_channels == 24
    assert dec.layers[1].conv.groups == 4
    # layer norm without affine: no parameters besides the convs and the projection
    names = {n.split(".")[-1] for n, _ in dec.named_parameters()}
    assert names == {"weight", "bias"} and not any("norm" in n for n, _ in dec.named_parameters())
    two = Decoder1d(DecoderConfig(16, 2, 9, 1, False, 2), 24)
    assert two(x).shape == (2, 30, 24) and len(two.proj) == 3
    with pytest.raises(ValueError):
        Decoder2d(cfg, 24, (4, 4))(x)


def test_decoder_input_is_noise_at_masked_steps_and_encoder_output_elsewhere() -> None:
    cfg = small_config("text", 1, "model.v2.decoder_input_dropout=0.0")
    model = model_for(cfg)
    mask = random_mask(24, 2, 0.48, torch.Generator().manual_seed(1))
    x = torch.randn(2, 24 - int(mask[0].sum()), 32)
    seen: list[torch.Tensor] = []
    model.decoder.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    model.decode(x, mask)
    full = seen[0]
    assert torch.equal(full[~mask].view(2, -1, 32), x)
    assert abs(full[mask].std().item() - cfg.model.v2.mask_noise_std) < 0.003


@pytest.mark.parametrize("modality", ["speech", "image", "text"])
def test_loss_only_at_masked_positions(modality: str) -> None:
    cfg = small_config(modality, 2, "model.v2.cls_loss=0.0")
    model = model_for(cfg)
    batch = small_batch(cfg)
    grads: list[torch.Tensor] = []

    def keep_grad(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.register_hook(grads.append)

    model.decoder.register_forward_hook(keep_grad)
    out = model(batch)
    out.loss_sum.backward()
    g = grads[0].abs().sum(-1)  # (B·M, T)
    assert (g[~batch.mask] == 0).all()
    assert (g[batch.mask] > 0).all()
    assert int(out.sample_size) == int(batch.mask.sum())


def test_cls_loss_reaches_only_the_student_encoder_and_cls_token() -> None:
    cfg = small_config("image", 2, "model.v2.cls_loss=0.01")
    model = model_for(cfg)
    batch = small_batch(cfg)
    local, pad = model.frontend.local_features(batch.source, None)
    targets = model._targets(batch, local, pad).repeat_interleave(2, 0)
    out = model.encode_visible(local, pad, batch.mask)[0].x
    term = model.cls_loss(out[:, 0], targets, None)
    term.backward()
    assert model.frontend.cls_token.grad.abs().sum() > 0
    assert model.encoder.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.decoder.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
    # hand computation: weight · Σ_rows Σ_dims (pred − mean target)² / √D
    expected = 0.01 * ((out[:, 0] - targets.mean(1)) ** 2).sum() / math.sqrt(32)
    assert torch.allclose(term, expected, rtol=1e-5)


def test_cls_loss_enters_the_loss_scaled_by_the_sample_size() -> None:
    with_cls = small_config("image", 2, "model.v2.cls_loss=0.01")
    batch = small_batch(with_cls)
    a = model_for(with_cls)
    b = model_for(small_config("image", 2, "model.v2.cls_loss=0.0"))
    b.load_state_dict(a.state_dict())
    calls: list[torch.Tensor] = []
    original = a.cls_loss
    a.cls_loss = lambda *args: (calls.append(original(*args)), calls[-1])[1]
    torch.manual_seed(1)
    out_a = a(batch)
    torch.manual_seed(1)
    out_b = b(batch)
    assert torch.allclose(out_a.loss_sum - out_b.loss_sum, calls[0] * out_a.sample_size,
                          rtol=1e-4)


def test_alibi_slopes_follow_the_recipe() -> None:
    assert torch.allclose(alibi_slopes(16), 2.0 ** (-0.5 * torch.arange(1, 17)))
    twelve = alibi_slopes(12)
    assert torch.allclose(twelve[:8], 2.0 ** -torch.arange(1.0, 9.0))
    assert torch.allclose(twelve[8:], torch.tensor([2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]))


def test_gathered_alibi_keeps_original_distances() -> None:
    cfg = small_config("speech")
    model = model_for(cfg)
    with torch.no_grad():
        model.alibi.alibi_scale.copy_(torch.tensor([0.5, -1.0]))  # negative clamps to 0
    ids = torch.tensor([[0, 3, 4, 9]])
    full = model.alibi(torch.arange(10).unsqueeze(0))  # (1, H, 10, 10)
    gathered = model.alibi(ids)
    assert torch.allclose(gathered, full[:, :, ids[0]][:, :, :, ids[0]])
    assert gathered[0, 0, 0, 3].item() == pytest.approx(-0.5 * 2 ** -4 * 9)  # H = 2: 2^-4, 2^-8
    assert (gathered[0, 1] == 0).all()


def test_speech_teacher_tracks_context_but_shares_the_conv_encoder() -> None:
    cfg = small_config("speech")
    model = model_for(cfg)
    teacher = dict(model.teacher.model.named_parameters())
    assert any(k.startswith("frontend.pos_conv") for k in teacher)
    assert "alibi.alibi_scale" in teacher
    assert not any("feature_encoder" in k or "feature_proj" in k for k in teacher)
    with torch.no_grad():
        model.frontend.pos_conv.layers[0].conv.weight.add_(1.0)
    before = model.teacher.model["frontend"].pos_conv.layers[0].conv.weight.clone()
    tau = model.ema_step(0)
    after = model.teacher.model["frontend"].pos_conv.layers[0].conv.weight
    assert torch.allclose(after - before, torch.full_like(before, 1 - tau), atol=1e-6)
    model.reset_teacher()
    assert torch.equal(after, model.frontend.pos_conv.layers[0].conv.weight)


def test_ema_scopes_of_images_and_text() -> None:
    image = dict(model_for(small_config("image")).teacher.model.named_parameters())
    assert "frontend.patch_embed.weight" in image and "frontend.cls_token" in image
    text = dict(model_for(small_config("text")).teacher.model.named_parameters())
    assert all(k.startswith("encoder.") for k in text)


def test_mask_embeddings_are_frozen_and_optimizer_excludes_teacher() -> None:
    model = model_for(small_config("speech"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "frontend.mask_emb" not in names
    assert len(model.student_parameters()) == len([n for n in names if "teacher" not in n])


def test_unequal_mask_counts_are_an_error() -> None:
    cfg = small_config("text", 1)
    model = model_for(cfg)
    batch = small_batch(cfg)
    batch.mask[0, :] = False
    with pytest.raises(DataError, match="same masked count"):
        model(batch)


def test_prenet_blocks_are_never_target_layers() -> None:
    with pytest.raises(ConfigError, match="prenet"):
        load_config("image", "tiny", 2, overrides=["model.v2.prenet_depth=2",
                                                   "model.objective.top_k=3"])
    cfg = load_config("image", "tiny", 2, overrides=["model.v2.prenet_depth=1",
                                                     "model.objective.top_k=3"])
    assert cfg.model.encoder.depth - cfg.model.v2.prenet_depth == 3
    with pytest.raises(ConfigError, match="version 2"):
        load_config("speech", "tiny", 1, overrides=["model.objective.ema_scope=context"])
