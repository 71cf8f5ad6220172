"""fairseq / BEiT import: real tiny fairseq checkpoints against the tensors fairseq computed from
them (tests/data/fairseq, made by the oracle kit), CTC-wrapped and BEiT-format layouts, every key
accounted for, and the restricted unpickler.

References: the ``.npz`` files hold what fairseq itself computed (block outputs, FFN outputs,
teacher targets, predictions, loss); the BEiT-format test uses HuggingFace's Data2VecVisionModel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from data2vec.batch import Batch
from data2vec.cli import main
from data2vec.errors import CheckpointError
from data2vec.interop.common import load_our_model
from data2vec.interop.fairseq import model_from_fairseq, read_fairseq
from data2vec.interop.hf import hf_config_dict, to_hf_state_dict
from data2vec.interop.safe_unpickle import load_checkpoint_file, plain

DATA = Path(__file__).parent / "data" / "fairseq"
TOL = 1e-5


def _refs(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(DATA / f"{name}.npz"))


def _diff(ours: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(ours.detach().numpy() - ref).max())


def _batch(name: str, ref: dict[str, np.ndarray]) -> Batch:
    mask = torch.from_numpy(ref["mask"])
    if name == "audio_v1":
        return Batch(source=torch.from_numpy(ref["source"]), padding_mask=None, mask=mask)
    return Batch(source=torch.from_numpy(ref["tokens"]), padding_mask=None, mask=mask,
                 student_source=torch.from_numpy(ref["masked_tokens"]))


@pytest.mark.parametrize("name", ["audio_v1", "text_v1"])
def test_real_fairseq_checkpoint_reproduces_fairseq_outputs(name: str) -> None:
    cfg, model, _ = model_from_fairseq(DATA / f"{name}.pt")
    ref = _refs(name)
    batch = _batch(name, ref)
    depth = cfg.model.encoder.depth
    with torch.no_grad():
        x, padding_mask = model.frontend(batch.source, None)
        blocks = model.encoder(x, padding_mask, collect_layers=depth, target_source="block")
        ffn = model.encoder(x, padding_mask, collect_layers=depth, target_source="ffn")
        assert _diff(blocks.x, ref["encoder_out"]) <= TOL
        for i in range(depth):
            assert _diff(blocks.layer_results[i], ref["layer_outputs"][i]) <= TOL
            assert _diff(ffn.layer_results[i], ref["ffn_outputs"][i]) <= TOL
        # teacher (the imported EMA weights, which differ from the student's in these files):
        # its top-K FFN outputs and the averaged targets
        student_x, teacher_x, padding_mask = model._inputs(batch)
        k = cfg.model.objective.top_k
        teacher = model.teacher.model(teacher_x, padding_mask, collect_layers=k)
        student = model.encoder(teacher_x, padding_mask, collect_layers=k)
        for i in range(k):
            assert _diff(teacher.layer_results[i], ref["teacher_ffn_outputs"][i]) <= TOL
            assert _diff(student.layer_results[i], ref["teacher_ffn_outputs"][i]) > 1e-2
        targets = model._targets(batch, teacher_x, padding_mask)
        assert _diff(targets, ref["targets"]) <= TOL
        prediction = model.encoder(student_x, padding_mask).x
        assert _diff(model.head(prediction[batch.mask]), ref["predictions"]) <= TOL
        out = model(batch)
    assert int(out.sample_size) == int(ref["sample_size"])
    assert abs(float(out.loss) - float(ref["loss"])) <= 1e-5 * abs(float(ref["loss"]))


@pytest.mark.parametrize(("name", "ema_key", "student"), [
    ("audio_v1", "_ema", "encoder."), ("text_v1", "encoder._ema", "encoder.sentence_encoder.")])
def test_teacher_tensors_come_from_the_files_ema_entry(name: str, ema_key: str,
                                                       student: str) -> None:
    # The kit perturbs the EMA teacher apart from the student (except what fairseq keeps shared:
    # the audio positional conv, the text embeddings), so each tensor's source is visible.
    sd, _, _ = read_fairseq(DATA / f"{name}.pt")
    ema = sd[ema_key]
    _, model, _ = model_from_fairseq(DATA / f"{name}.pt")
    ours = model.state_dict()
    for i in range(3):
        src, dst = f"layers.{i}", f"teacher.model.blocks.{i}"
        assert not torch.equal(ema[f"{src}.fc2.weight"], sd[f"{student}{src}.fc2.weight"])
        qkv = torch.cat([ema[f"{src}.self_attn.{p}_proj.weight"] for p in ("q", "k", "v")])
        assert torch.equal(ours[f"{dst}.attn.qkv.weight"], qkv)
        assert torch.equal(ours[f"{dst}.norm1.bias"], ema[f"{src}.self_attn_layer_norm.bias"])
        assert torch.equal(ours[f"{dst}.norm2.weight"], ema[f"{src}.final_layer_norm.weight"])
        assert torch.equal(ours[f"{dst}.mlp.fc2.weight"], ema[f"{src}.fc2.weight"])
        assert torch.equal(ours[f"encoder.blocks.{i}.mlp.fc2.weight"],
                           sd[f"{student}{src}.fc2.weight"])
    if name == "audio_v1":  # the wav2vec 2.0 encoder LayerNorm is the teacher's input norm
        assert torch.equal(ours["teacher.model.input_norm.weight"], ema["layer_norm.weight"])
        assert not torch.equal(ema["layer_norm.weight"], sd["encoder.layer_norm.weight"])


@pytest.mark.parametrize("name", ["audio_v1", "text_v1"])
def test_fairseq_to_ours_to_hf_matches_fairseq_and_the_kits_hf_config(name: str) -> None:
    cfg, model, _ = model_from_fairseq(DATA / f"{name}.pt")
    kit = json.loads((DATA / f"{name}.hf_config.json").read_text())
    ours = hf_config_dict(cfg)
    fields = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "layer_norm_eps"]
    fields += (["conv_dim", "conv_kernel", "conv_stride", "conv_bias", "num_conv_pos_embeddings",
                "conv_pos_kernel_size", "num_conv_pos_embedding_groups"]
               if name == "audio_v1" else
               ["vocab_size", "max_position_embeddings", "type_vocab_size", "pad_token_id"])
    assert {f: ours[f] for f in fields} == {f: kit[f] for f in fields}
    cls = transformers.Data2VecAudioModel if name == "audio_v1" else transformers.Data2VecTextModel
    config_cls = transformers.Data2VecAudioConfig if name == "audio_v1" else \
        transformers.Data2VecTextConfig
    kwargs = {} if name == "audio_v1" else {"add_pooling_layer": False}
    hf = cls(config_cls(**ours), **kwargs).eval()
    hf.load_state_dict(to_hf_state_dict(cfg, model))
    ref = _refs(name)
    source = torch.from_numpy(ref["source"] if name == "audio_v1" else ref["tokens"])
    with torch.no_grad():
        out = hf(source, output_hidden_states=True)
    assert _diff(out.last_hidden_state, ref["encoder_out"]) <= TOL
    for i, hidden in enumerate(out.hidden_states[1:]):
        assert _diff(hidden, ref["layer_outputs"][i]) <= TOL


def test_cli_import_writes_a_checkpoint_our_loader_reads(tmp_path: Path, capsys) -> None:
    assert main(["import", "--from", "fairseq", str(DATA / "text_v1.pt"), "--out",
                 str(tmp_path / "ck")]) == 0
    assert "note:" in capsys.readouterr().out  # the shared embeddings of the teacher are named
    cfg, model = load_our_model(tmp_path / "ck")
    # the run layout every import shares (config.yaml + checkpoints/step-0000000)
    assert (tmp_path / "ck" / "config.yaml").is_file()
    state = torch.load(tmp_path / "ck" / "checkpoints" / "step-0000000" / "state.pt",
                       weights_only=True)
    assert state["step"] == 0 and state["config"]["modality"] == "text"
    ref = _refs("text_v1")
    with torch.no_grad():
        out, _ = model.encode(torch.from_numpy(ref["tokens"]))
    assert _diff(out.x, ref["encoder_out"]) <= TOL


def _save(tmp_path: Path, obj: dict, name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_ctc_finetuned_layout_imports_the_same_encoder(tmp_path: Path) -> None:
    sd, cfg, _ = read_fairseq(DATA / "audio_v1.pt")
    student = {k: v for k, v in sd.items() if k not in ("_ema",) and not k.startswith("final_proj")}
    wrapped = {f"w2v_encoder.w2v_model.{k}": v for k, v in student.items()}
    wrapped["w2v_encoder.proj.weight"] = torch.randn(32, 96)
    wrapped["w2v_encoder.proj.bias"] = torch.randn(32)
    path = _save(tmp_path, {"model": wrapped, "args": None,
                            "cfg": {"model": {"_name": "wav2vec_ctc", "w2v_args": cfg}}})
    _, model, report = model_from_fairseq(path)
    _, plain_model, _ = model_from_fairseq(DATA / "audio_v1.pt")
    ours, ref = model.state_dict(), plain_model.state_dict()
    for key in (k for k in ref if k.startswith(("frontend.", "encoder."))):
        assert torch.equal(ours[key], ref[key]), key
    assert any("w2v_encoder.proj.weight" in note for note in report.notes)
    assert any("teacher = copy of the student" in note for note in report.notes)


def test_released_head_as_one_element_sequential_is_accepted(tmp_path: Path) -> None:
    sd, cfg, _ = read_fairseq(DATA / "audio_v1.pt")
    sd["final_proj.0.weight"] = sd.pop("final_proj.weight")
    sd["final_proj.0.bias"] = sd.pop("final_proj.bias")
    _, model, _ = model_from_fairseq(_save(tmp_path, {"model": sd, "cfg": cfg}))
    assert torch.equal(model.state_dict()["head.weight"], sd["final_proj.0.weight"])


def test_unknown_and_missing_fairseq_keys_are_named(tmp_path: Path) -> None:
    sd, cfg, _ = read_fairseq(DATA / "text_v1.pt")
    extra = dict(sd, **{"encoder.sentence_encoder.layers.0.surprise": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="layers.0.surprise"):
        model_from_fairseq(_save(tmp_path, {"model": extra, "cfg": cfg}, "extra.pt"))
    missing = dict(sd)
    missing.pop("encoder.sentence_encoder.layers.1.fc2.bias")
    with pytest.raises(CheckpointError, match=r"layers\.1\.fc2\.bias"):
        model_from_fairseq(_save(tmp_path, {"model": missing, "cfg": cfg}, "missing.pt"))


# ------------------------------------------------------------------------ BEiT (vision v1)


def _beit_from_hf(hf: transformers.Data2VecVisionModel, per_layer: bool) -> dict:
    """HF Data2VecVision tensors renamed to the data2vec_vision (BEiT) checkpoint layout."""
    s = hf.state_dict()
    out = {"cls_token": s["embeddings.cls_token"], "mask_token": s["embeddings.mask_token"],
           "patch_embed.proj.weight": s["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": s["embeddings.patch_embeddings.projection.bias"]}
    grid = hf.embeddings.patch_embeddings.patch_shape
    index = transformers.models.data2vec.modeling_data2vec_vision.\
        Data2VecVisionRelativePositionBias.generate_relative_position_index(grid)
    table = "relative_position_bias.relative_position_bias_table"
    if not per_layer:
        out["rel_pos_bias.relative_position_bias_table"] = s[f"encoder.{table}"]
        out["rel_pos_bias.relative_position_index"] = index
    for i in range(hf.config.num_hidden_layers):
        h, b = f"encoder.layer.{i}", f"blocks.{i}"
        att = f"{h}.attention.attention"
        out[f"{b}.attn.qkv.weight"] = torch.cat([s[f"{att}.{p}.weight"]
                                                 for p in ("query", "key", "value")])
        out[f"{b}.attn.q_bias"], out[f"{b}.attn.v_bias"] = s[f"{att}.query.bias"], \
            s[f"{att}.value.bias"]
        if per_layer:
            out[f"{b}.attn.relative_position_bias_table"] = s[f"{att}.{table}"]
            out[f"{b}.attn.relative_position_index"] = index
        for theirs, ours in (("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"),
                             ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"),
                             ("output.dense", "mlp.fc2")):
            out[f"{b}.{ours}.weight"] = s[f"{h}.{theirs}.weight"]
            out[f"{b}.{ours}.bias"] = s[f"{h}.{theirs}.bias"]
        out[f"{b}.gamma_1"], out[f"{b}.gamma_2"] = s[f"{h}.lambda_1"], s[f"{h}.lambda_2"]
    if "layernorm.weight" in s:
        out["norm.weight"], out["norm.bias"] = s["layernorm.weight"], s["layernorm.bias"]
    return out


@pytest.mark.parametrize("per_layer", [False, True])
def test_beit_format_vision_checkpoint_matches_hf_forward(tmp_path: Path, per_layer: bool) -> None:
    config = transformers.Data2VecVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=4, use_mask_token=True, layer_norm_eps=1e-6,
        use_shared_relative_position_bias=not per_layer, use_relative_position_bias=per_layer,
        use_mean_pooling=per_layer, layer_scale_init_value=0.1)
    hf = transformers.Data2VecVisionModel(config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model_sd = _beit_from_hf(hf, per_layer)
    ema = {k: v + 0.01 for k, v in model_sd.items() if "index" not in k}
    ckpt = {"model": model_sd, "model_ema": ema, "epoch": 799,
            "args": argparse.Namespace(layer_scale_init_value=0.1, drop_path=0.1)}
    if per_layer:  # a fine-tuned file: mean-pooling norm and classifier are reported
        model_sd.update({"fc_norm.weight": torch.ones(32), "fc_norm.bias": torch.zeros(32),
                         "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)})
    else:
        model_sd.update({"lm_head.weight": torch.randn(32, 32), "lm_head.bias": torch.randn(32)})
    cfg, model, report = model_from_fairseq(_save(tmp_path, ckpt))
    images = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 4:10] = True
    with torch.no_grad():
        ref = hf(images, bool_masked_pos=mask, output_hidden_states=True)
        x, padding_mask = model.frontend(images, None, mask)
        out = model.encoder(x, padding_mask, collect_layers=2, target_source="block")
    assert float((out.x - ref.last_hidden_state).abs().max()) <= TOL
    for ours, theirs in zip(out.layer_results, ref.hidden_states[1:], strict=True):
        assert float((ours - theirs).abs().max()) <= TOL
    sd = model.state_dict()
    assert torch.equal(sd["teacher.model.encoder.blocks.1.ls2.gamma"], ema["blocks.1.gamma_2"])
    assert cfg.model.encoder.relative_position_bias == ("per_block" if per_layer else "shared")
    if per_layer:
        assert any("fc_norm.weight" in note and "head.weight" in note for note in report.notes)
    else:
        assert torch.equal(sd["head.weight"], model_sd["lm_head.weight"])


# ------------------------------------------------------------------------ safe unpickling


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _save(tmp_path, {"model": {}, "x": _Evil(marker)})
    with pytest.raises(CheckpointError, match="system"):
        load_checkpoint_file(path)
    assert not marker.exists()


def _fake_omegaconf(cfg: dict):
    """Objects whose classes live in modules named like omegaconf's (not installed here)."""
    modules = {}
    for name in ("omegaconf", "omegaconf.dictconfig", "omegaconf.nodes"):
        modules[name] = sys.modules[name] = types.ModuleType(name)
    DictConfig = type("DictConfig", (), {"__module__": "omegaconf.dictconfig"})
    AnyNode = type("AnyNode", (), {"__module__": "omegaconf.nodes"})
    modules["omegaconf.dictconfig"].DictConfig = DictConfig
    modules["omegaconf.nodes"].AnyNode = AnyNode

    def convert(value):
        if isinstance(value, dict):
            node = DictConfig()
            node.__dict__.update(_content={k: convert(v) for k, v in value.items()},
                                 _metadata=None, _parent=None)
            return node
        node = AnyNode()
        node.__dict__.update(_val=value, _metadata=None, _parent=None)
        return node

    return convert(cfg), list(modules)


def test_omegaconf_and_argparse_objects_load_as_plain_values(tmp_path: Path) -> None:
    sd, cfg, _ = read_fairseq(DATA / "audio_v1.pt")
    omega, names = _fake_omegaconf(cfg)
    try:
        path = _save(tmp_path, {"model": sd, "cfg": omega,
                                "args": argparse.Namespace(arch="data2vec_audio")})
    finally:
        for name in names:
            sys.modules.pop(name, None)
    loaded = load_checkpoint_file(path)
    assert plain(loaded["cfg"]) == cfg
    assert plain(loaded["args"]) == {"arch": "data2vec_audio"}
    loaded_cfg, model, _ = model_from_fairseq(path)
    assert loaded_cfg.model.encoder.num_heads == cfg["model"]["encoder_attention_heads"]
