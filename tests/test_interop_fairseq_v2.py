"""data2vec 2.0 (fairseq ``data2vec_multi``) import: real tiny fairseq checkpoints for speech,
images and text against the tensors fairseq computed from them (tests/data/fairseq, made by the
oracle kit), every key accounted for, teacher placement, fine-tuned layout, refusals by name, and
continuing pre-training from an imported model.

fairseq's decoder adds N(0, 0.01) noise from its global RNG at masked slots, so the decoder is
checked on the kit's recorded ``decoder_input``; everything before and after is ours end to end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data2vec.batch import Batch
from data2vec.cli import main
from data2vec.errors import CheckpointError, ConfigError
from data2vec.interop.common import load_our_model
from data2vec.interop.fairseq import model_from_fairseq, read_fairseq

DATA = Path(__file__).parent / "data" / "fairseq"
TOL = 1e-5
NAMES = ["audio_v2", "image_v2", "text_v2"]
PREFIX = {"audio_v2": "AUDIO", "image_v2": "IMAGE", "text_v2": "TEXT"}


def _refs(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(DATA / f"{name}.npz"))


def _diff(ours: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(ours.detach().numpy() - ref).max())


def _source(ref: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(ref["source"] if "source" in ref else ref["tokens"])


def _save(tmp_path: Path, obj: dict, name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("name", NAMES)
def test_real_v2_checkpoint_reproduces_fairseq_outputs(name: str) -> None:
    cfg, model, _ = model_from_fairseq(DATA / f"{name}.pt")
    ref = _refs(name)
    source, mask = _source(ref), torch.from_numpy(ref["mask"])
    prenet, depth = cfg.model.v2.prenet_depth, cfg.model.encoder.depth
    extra = model.frontend.num_extra_tokens
    with torch.no_grad():
        local, pad = model.frontend.local_features(source, None)
        x, _ = model.frontend.contextualize(local, pad, None)
        bias = model._full_alibi(local.shape[1], x.device)
        blocks = model.encoder(x, pad, bias, collect_layers=depth, target_source="block")
        ffn = model.encoder(x, pad, bias, collect_layers=depth, target_source="ffn")
        assert _diff(blocks.x[:, extra:], ref["encoder_out"]) <= TOL
        for i in range(depth - prenet):  # fairseq counts the prenet blocks outside its blocks
            assert _diff(blocks.layer_results[prenet + i], ref["layer_outputs"][i]) <= TOL
            assert _diff(ffn.layer_results[prenet + i], ref["ffn_outputs"][i]) <= TOL
        batch = Batch(source=source, padding_mask=None, mask=mask)
        targets = model._targets(batch, local, pad)  # the imported EMA teacher
        assert _diff(targets, ref["targets"]) <= TOL
        student, _ = model.encode_visible(local, pad, mask)  # visible steps only
        visible = student.x[:, extra:].reshape(-1, student.x.shape[-1])
        decoder_input = torch.from_numpy(ref["decoder_input"])
        assert _diff(visible, ref["decoder_input"][~ref["mask"]]) <= TOL
        prediction = model.decoder(decoder_input)
        assert _diff(prediction, ref["decoder_output"]) <= TOL
        clones = mask.shape[0] // source.shape[0]
        out = model._loss(prediction, targets.repeat_interleave(clones, 0), mask, None)
        loss_sum = out.loss_sum
        if cfg.model.v2.cls_loss > 0:
            assert _diff(student.x[:, 0], ref["cls_predictions"]) <= TOL
            cls = model.cls_loss(student.x[:, 0], targets.repeat_interleave(clones, 0), None)
            assert abs(float(cls * out.sample_size) - float(ref["loss_cls"])) <= 1e-5 * float(
                ref["loss_cls"])
            loss_sum = loss_sum + cls * out.sample_size
    assert int(out.sample_size) == int(ref["sample_size"])
    assert abs(float(loss_sum) - float(ref["loss_sum"])) <= 1e-6 * abs(float(ref["loss_sum"]))


@pytest.mark.parametrize("name", NAMES)
def test_v2_teacher_tensors_come_from_the_files_ema_entry(tmp_path: Path, name: str) -> None:
    # The kit's teachers equal their students, so move the teacher away and follow each tensor.
    sd, cfg, _ = read_fairseq(DATA / f"{name}.pt")
    g = torch.Generator().manual_seed(0)
    ema = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd["_ema"].items()}
    if name == "image_v2":  # the frozen sin-cos table must stay what it is
        key = "modality_encoders.IMAGE.fixed_positional_encoder.positions"
        ema[key] = sd["_ema"][key]
    sd["_ema"] = ema
    model_cfg, model, _ = model_from_fairseq(_save(tmp_path, {"model": sd, "cfg": cfg}))
    ours = model.state_dict()
    prenet = model_cfg.model.v2.prenet_depth
    blocks = "" if name == "text_v2" else "blocks."
    for i in range(3):
        dst = f"teacher.model.encoder.blocks.{prenet + i}"
        assert torch.equal(ours[f"{dst}.mlp.fc2.weight"], ema[f"{blocks}{i}.mlp.fc2.weight"])
        assert torch.equal(ours[f"{dst}.attn.qkv.bias"], ema[f"{blocks}{i}.attn.qkv.bias"])
        assert not torch.equal(ours[f"{dst}.mlp.fc2.weight"],
                               ours[f"encoder.blocks.{prenet + i}.mlp.fc2.weight"])
    p = f"modality_encoders.{PREFIX[name]}."
    if name == "audio_v2":
        assert torch.equal(ours["teacher.model.alibi.alibi_scale"],
                           ema[f"{p}alibi_scale"].reshape(-1))
        assert torch.equal(ours["teacher.model.frontend.pos_conv.layers.2.conv.weight"],
                           ema[f"{p}relative_positional_encoder.3.0.weight"])
        assert torch.equal(ours["teacher.model.encoder.input_norm.bias"],
                           ema[f"{p}context_encoder.norm.bias"])
    if name == "image_v2":
        assert torch.equal(ours["teacher.model.frontend.patch_embed.weight"],
                           ema[f"{p}local_encoder.proj.weight"])
        assert torch.equal(ours["teacher.model.encoder.blocks.0.norm1.weight"],
                           ema[f"{p}context_encoder.blocks.0.norm1.weight"])


def test_finetuned_v2_layout_imports_the_same_encoder(tmp_path: Path) -> None:
    sd, cfg, _ = read_fairseq(DATA / "audio_v2.pt")
    student = {k: v for k, v in sd.items() if k != "_ema" and ".decoder." not in k}
    wrapped = {f"w2v_encoder.w2v_model.{k}": v for k, v in student.items()}
    wrapped["w2v_encoder.proj.weight"] = torch.randn(32, 96)
    wrapped["w2v_encoder.proj.bias"] = torch.randn(32)
    path = _save(tmp_path, {"model": wrapped, "cfg": {"model": {"_name": "wav2vec_ctc",
                                                                "w2v_args": cfg}}})
    _, model, report = model_from_fairseq(path)
    _, plain_model, _ = model_from_fairseq(DATA / "audio_v2.pt")
    ours, ref = model.state_dict(), plain_model.state_dict()
    for key in (k for k in ref if k.startswith(("frontend.", "encoder.", "alibi."))):
        assert torch.equal(ours[key], ref[key]), key
    notes = " ".join(report.notes)
    assert "w2v_encoder.proj.weight" in notes and "no decoder" in notes
    assert "teacher = copy of the student" in notes


def test_v2_options_we_do_not_implement_are_refused_by_name(tmp_path: Path) -> None:
    sd, cfg, _ = read_fairseq(DATA / "audio_v2.pt")
    cfg["model"]["modalities"]["audio"]["learned_alibi_scale_per_layer"] = True
    with pytest.raises(ConfigError, match="learned_alibi_scale_per_layer"):
        model_from_fairseq(_save(tmp_path, {"model": sd, "cfg": cfg}))


def test_multi_modality_checkpoints_are_refused_naming_the_modalities(tmp_path: Path) -> None:
    sd, cfg, _ = read_fairseq(DATA / "text_v2.pt")
    sd["modality_encoders.AUDIO.alibi_scale"] = torch.ones(1, 1, 6, 1, 1)
    with pytest.raises(CheckpointError, match=r"\['AUDIO', 'TEXT'\]"):
        model_from_fairseq(_save(tmp_path, {"model": sd, "cfg": cfg}))


def test_v2_unknown_keys_and_foreign_position_tables_are_named(tmp_path: Path) -> None:
    sd, cfg, _ = read_fairseq(DATA / "text_v2.pt")
    extra = dict(sd, **{"modality_encoders.TEXT.surprise": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="modality_encoders.TEXT.surprise"):
        model_from_fairseq(_save(tmp_path, {"model": extra, "cfg": cfg}, "extra.pt"))
    sd, cfg, _ = read_fairseq(DATA / "image_v2.pt")
    key = "modality_encoders.IMAGE.fixed_positional_encoder.positions"
    sd[key] = sd[key] + 0.01
    with pytest.raises(CheckpointError, match="fixed_positional_encoder.positions"):
        model_from_fairseq(_save(tmp_path, {"model": sd, "cfg": cfg}, "pos.pt"))


def test_imported_v2_image_model_continues_pretraining(tmp_path: Path, monkeypatch) -> None:
    from data2vec.data.demo import prepare_demo
    from data2vec.train.checkpoint import find_checkpoint, load_weights

    prepare_demo("image", tmp_path / "home" / "demo" / "image")
    monkeypatch.setenv("DATA2VEC_HOME", str(tmp_path / "home"))
    imported = tmp_path / "imported"
    assert main(["import", "--from", "fairseq", str(DATA / "image_v2.pt"), "--out",
                 str(imported)]) == 0
    cfg, model = load_our_model(imported)
    assert cfg.version == 2 and cfg.model.v2.prenet_depth == 1
    run = tmp_path / "run"
    assert main(["pretrain", "--modality", "image", "--version", "2", "--out", str(run),
                 "--max-steps", "1", "--init", str(imported), "run.progress=false",
                 "run.tensorboard=false", "run.log_every=1", "run.threads=1", "optim.lr=1e-12",
                 "data.batch_size=4"]) == 0
    # lr 1e-12 (0 is refused): one AdamW update moves a weight by about 1e-12, so the imported
    # student carries over
    after = load_weights(find_checkpoint(run))
    before = model.state_dict()
    assert all(torch.allclose(after[k], before[k], rtol=0, atol=1e-9) for k in before
               if k.startswith(("frontend.", "encoder.", "decoder.")))
