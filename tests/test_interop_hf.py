"""HuggingFace interop: random HF data2vec models of several shapes imported with output parity,
ours -> HF -> ours exact, HF ``from_pretrained`` of our export, refusals and offline errors.

The reference is HuggingFace's own code (``transformers`` Data2Vec{Audio,Text,Vision}Model).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from data2vec.build import build_model
from data2vec.cli import main
from data2vec.config import load_config
from data2vec.errors import CheckpointError, ConfigError
from data2vec.interop.common import ImportReport, load_our_model, write_checkpoint
from data2vec.interop.hf import export_hf, hf_config_dict, import_hf
from data2vec.modalities.speech import parse_conv_spec

TOL = 1e-5


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (HF zero-inits tables, tokens and layer scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


AUDIO_CONFIGS = [
    dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
         conv_dim=[16, 16, 16], conv_kernel=[10, 3, 2], conv_stride=[5, 2, 2],
         num_conv_pos_embeddings=2, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4,
         mask_time_prob=0.5),
    dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
         conv_dim=[8, 12], conv_kernel=[8, 4], conv_stride=[4, 2], conv_bias=True,
         num_conv_pos_embeddings=1, conv_pos_kernel_size=4, num_conv_pos_embedding_groups=2,
         mask_time_prob=0.5),
]
TEXT_CONFIGS = [
    dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
         intermediate_size=64, max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5),
    dict(vocab_size=64, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
         intermediate_size=80, max_position_embeddings=20, type_vocab_size=1,
         layer_norm_eps=1e-12),
]
VISION_CONFIGS = [  # shared bias + final LayerNorm; per-layer bias + mean pooling + positions
    dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
         image_size=16, patch_size=4, use_mask_token=True, use_shared_relative_position_bias=True,
         use_mean_pooling=False, layer_scale_init_value=0.1, layer_norm_eps=1e-6),
    dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
         image_size=24, patch_size=8, num_channels=1, use_mask_token=True,
         use_relative_position_bias=True, use_absolute_position_embeddings=True,
         use_mean_pooling=True, layer_scale_init_value=0.1, layer_norm_eps=1e-6),
    dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
         image_size=16, patch_size=8, use_mask_token=False, use_absolute_position_embeddings=True,
         use_mean_pooling=True, layer_scale_init_value=0.0, layer_norm_eps=1e-6),
]


def _hf_dir(tmp_path: Path, cls_name: str, kwargs: dict, seed: int, **model_kwargs):
    cls = getattr(transformers, cls_name)
    config = getattr(transformers, cls_name.replace("Model", "Config"))(**kwargs)
    torch.manual_seed(seed)
    hf = cls(config, **model_kwargs).eval()
    _perturb(hf, seed)
    hf.save_pretrained(tmp_path / "hf")
    return hf


def _import(tmp_path: Path):
    out, report = import_hf(tmp_path / "hf", tmp_path / "ours")
    cfg, model = load_our_model(out)
    return cfg, model, report


def _ours_all_layers(model, source, padding_mask=None, mask=None):
    """Final output and every block output of our student."""
    x, padding_mask = model.frontend(source, padding_mask, mask)
    depth = model.encoder.cfg.depth
    out = model.encoder(x, padding_mask, collect_layers=depth, target_source="block")
    return out.x, out.layer_results


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("index", range(len(AUDIO_CONFIGS)))
def test_hf_audio_import_matches_every_hidden_state(tmp_path: Path, index: int) -> None:
    hf = _hf_dir(tmp_path, "Data2VecAudioModel", AUDIO_CONFIGS[index], seed=index)
    cfg, model, _ = _import(tmp_path)
    wave = torch.randn(2, 1600)
    with torch.no_grad():
        ref = hf(wave, output_hidden_states=True)
        x, layers = _ours_all_layers(model, wave)
        assert _max_diff(x, ref.last_hidden_state) <= TOL
        for ours, theirs in zip(layers, ref.hidden_states[1:], strict=True):
            assert _max_diff(ours, theirs) <= TOL
        # the mask embedding maps too: HF mask_time_indices == our mask
        mask = torch.zeros(x.shape[:2], dtype=torch.bool)
        mask[:, 3:9] = True
        masked_ref = hf(wave, mask_time_indices=mask).last_hidden_state
        masked, _ = _ours_all_layers(model, wave, mask=mask)
        assert _max_diff(masked, masked_ref) <= TOL
        assert _max_diff(masked, x) > 1e-3  # the mask changed the output
    spec = parse_conv_spec(cfg.model.frontend.conv_spec)
    assert [c for c, _, _ in spec] == AUDIO_CONFIGS[index]["conv_dim"]


@pytest.mark.parametrize("index", range(len(TEXT_CONFIGS)))
def test_hf_text_import_matches_every_hidden_state_with_padding(tmp_path: Path,
                                                                index: int) -> None:
    hf = _hf_dir(tmp_path, "Data2VecTextModel", TEXT_CONFIGS[index], seed=10 + index)
    cfg, model, _ = _import(tmp_path)
    vocab, pad = TEXT_CONFIGS[index]["vocab_size"], cfg.model.frontend.pad_index
    ids = torch.randint(4, vocab, (3, 12))
    ids[:, 0] = 0
    ids[1, 8:] = pad  # a padded row: positions and attention must agree with HF
    with torch.no_grad():
        ref = hf(ids, attention_mask=ids.ne(pad).long(), output_hidden_states=True)
        x, layers = _ours_all_layers(model, ids)
    real = ids.ne(pad).unsqueeze(-1)
    assert _max_diff(x * real, ref.last_hidden_state * real) <= TOL
    for ours, theirs in zip(layers, ref.hidden_states[1:], strict=True):
        assert _max_diff(ours * real, theirs * real) <= TOL
    assert cfg.model.frontend.layer_norm_eps == TEXT_CONFIGS[index]["layer_norm_eps"]


@pytest.mark.parametrize("index", range(len(VISION_CONFIGS)))
def test_hf_vision_import_matches_every_hidden_state(tmp_path: Path, index: int) -> None:
    kwargs = VISION_CONFIGS[index]
    hf = _hf_dir(tmp_path, "Data2VecVisionModel", kwargs, seed=20 + index)
    cfg, model, report = _import(tmp_path)
    side = kwargs["image_size"]
    images = torch.randn(2, kwargs.get("num_channels", 3), side, side)
    with torch.no_grad():
        ref = hf(images, output_hidden_states=True)
        x, layers = _ours_all_layers(model, images)
        assert _max_diff(x, ref.last_hidden_state) <= TOL
        for ours, theirs in zip(layers, ref.hidden_states[1:], strict=True):
            assert _max_diff(ours, theirs) <= TOL
        if kwargs["use_mask_token"]:
            n = (side // kwargs["patch_size"]) ** 2
            mask = torch.zeros(2, n, dtype=torch.bool)
            mask[:, : n // 2] = True
            masked_ref = hf(images, bool_masked_pos=mask).last_hidden_state
            masked, _ = _ours_all_layers(model, images, mask=mask)
            assert _max_diff(masked, masked_ref) <= TOL
        else:
            assert any("mask_token" in note for note in report.notes)
    assert cfg.model.encoder.final_norm == (not kwargs["use_mean_pooling"])


@pytest.mark.parametrize("modality", ["speech", "text", "image"])
def test_ours_to_hf_to_ours_round_trip_is_exact(tmp_path: Path, modality: str) -> None:
    cfg = load_config(modality, "tiny")
    model = build_model(cfg)
    _perturb(model, 1)
    write_checkpoint(tmp_path / "ck", cfg, model, ImportReport("test"))
    assert main(["export", "--to", "hf", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    assert main(["import", "--from", "hf", str(tmp_path / "hf"), "--out",
                 str(tmp_path / "back")]) == 0
    cfg2, back = load_our_model(tmp_path / "back")
    ours, theirs = model.state_dict(), back.state_dict()
    student = [k for k in ours if not k.startswith(("teacher.", "head"))]
    assert all(torch.equal(ours[k], theirs[k]) for k in student)
    assert cfg2.model.encoder == cfg.model.encoder
    fe, fe2 = copy.copy(cfg.model.frontend), copy.copy(cfg2.model.frontend)
    if modality == "speech":  # the same layers, spelled out instead of with '*'
        assert parse_conv_spec(fe.conv_spec) == parse_conv_spec(fe2.conv_spec)
        fe.conv_spec = fe2.conv_spec
        # HF zeroes padded frames once, before the positional conv: the import takes HF's way
        assert (fe.pos_conv_padding, fe2.pos_conv_padding) == ("every_layer", "input")
        fe.pos_conv_padding = fe2.pos_conv_padding
    assert fe == fe2
    # the imported teacher is a copy of the student's tracked part
    assert torch.equal(theirs["teacher.model.blocks.0.mlp.fc1.weight"] if modality != "image"
                       else theirs["teacher.model.encoder.blocks.0.mlp.fc1.weight"],
                       theirs["encoder.blocks.0.mlp.fc1.weight"])


@pytest.mark.parametrize("modality", ["speech", "text", "image"])
def test_hf_from_pretrained_of_our_export_matches_our_outputs(tmp_path: Path,
                                                             modality: str) -> None:
    cfg = load_config(modality, "tiny")
    model = build_model(cfg).eval()
    _perturb(model, 2)
    write_checkpoint(tmp_path / "ck", cfg, model, ImportReport("test"))
    export_hf(tmp_path / "ck", tmp_path / "hf")
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    # speech: HF's feature extractor config; images: the image processor's; this text model
    # has no tokenizer beside it (an import without one), so none is exported
    extra = set() if modality == "text" else {"preprocessor_config.json"}
    assert files == {"config.json", "model.safetensors", *extra}
    cls = {"speech": transformers.Data2VecAudioModel, "text": transformers.Data2VecTextModel,
           "image": transformers.Data2VecVisionModel}[modality]
    hf = cls.from_pretrained(tmp_path / "hf").eval()
    source = {"speech": torch.randn(2, 4000), "text": torch.randint(5, 200, (2, 16)),
              "image": torch.randn(2, 3, 32, 32)}[modality]
    with torch.no_grad():
        ref = hf(source, output_hidden_states=True)
        x, layers = _ours_all_layers(model, source)
    assert _max_diff(x, ref.last_hidden_state) <= TOL
    for ours, theirs in zip(layers, ref.hidden_states[1:], strict=True):
        assert _max_diff(ours, theirs) <= TOL


@pytest.mark.parametrize(("modality", "override", "option"), [
    ("image", "model.frontend.positions=sincos", "positions=sincos"),
    ("image", "model.encoder.qkv_bias=all", "qkv_bias=all"),
    ("speech", "model.encoder.layer_norm_first=true", "layer_norm_first=true"),
    ("speech", "model.frontend.extractor_mode=group_norm", "extractor_mode=group_norm"),
    ("text", "model.encoder.input_norm=true", "input_norm=true"),
    ("text", "model.encoder.layer_scale_init=0.1", "layer_scale_init"),
])
def test_export_refuses_options_hf_cannot_express(modality: str, override: str,
                                                  option: str) -> None:
    cfg = load_config(modality, "tiny", overrides=[override])
    with pytest.raises(ConfigError, match=option.replace("(", r"\(")):
        hf_config_dict(cfg)


def test_export_refuses_data2vec_2(tmp_path: Path) -> None:
    cfg = load_config("speech", "tiny")
    cfg.version = 2
    with pytest.raises(ConfigError, match="version=2"):
        hf_config_dict(cfg)


def test_cli_export_error_is_one_line_naming_the_option(tmp_path: Path, capsys) -> None:
    cfg = load_config("image", "tiny", overrides=["model.frontend.positions=sincos"])
    write_checkpoint(tmp_path / "ck", cfg, build_model(cfg), ImportReport("test"))
    assert main(["export", "--to", "hf", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("data2vec: error:") and "positions=sincos" in err
    assert "\n" not in err


def test_hub_id_not_in_local_cache_is_a_clear_offline_error(tmp_path: Path,
                                                            monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local HF cache"):
        import_hf("facebook/data2vec-audio-base", tmp_path / "out")


def test_hub_id_in_the_local_cache_is_found_offline(tmp_path: Path, monkeypatch) -> None:
    hf = _hf_dir(tmp_path, "Data2VecTextModel", TEXT_CONFIGS[0], seed=5)
    cache = tmp_path / "cache"
    repo = cache / "models--someone--tiny-d2v-text"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)  # the HF cache layout: refs -> snapshot
    (repo / "snapshots").mkdir()
    (tmp_path / "hf").rename(repo / "snapshots" / ("0" * 40))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    _, model = load_our_model(import_hf("someone/tiny-d2v-text", tmp_path / "ours")[0])
    ids = torch.randint(4, 100, (1, 9))
    with torch.no_grad():
        assert _max_diff(model.encode(ids)[0].x, hf(ids).last_hidden_state) <= TOL


def test_unknown_hf_tensor_is_listed_and_head_tensors_are_reported(tmp_path: Path) -> None:
    _hf_dir(tmp_path, "Data2VecTextModel", TEXT_CONFIGS[0], seed=3)
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["pooler.dense.weight"] = torch.zeros(32, 32)
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    _, report = import_hf(tmp_path / "hf", tmp_path / "ours")
    assert any("pooler.dense.weight" in note for note in report.notes)
    weights["encoder.layer.0.surprise"] = torch.zeros(3)
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="encoder.layer.0.surprise"):
        import_hf(tmp_path / "hf", tmp_path / "ours2")


def test_hf_config_without_an_equivalent_is_refused(tmp_path: Path) -> None:
    _hf_dir(tmp_path, "Data2VecTextModel", TEXT_CONFIGS[0], seed=4)
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config["hidden_act"] = "relu"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="hidden_act='relu'"):
        import_hf(tmp_path / "hf", tmp_path / "ours")


# ------------------------------------------------------------------ fine-tuned task heads


def _finetuned_checkpoint(tmp_path: Path, modality: str, task: str, labels: dict,
                          overrides: list[str] | None = None,
                          legacy: bool = False) -> torch.nn.Module:
    """A FineTuneModel saved the way ``data2vec finetune`` saves it (config, finetune, labels,
    whether the head reads the final norm); `legacy`: as runs from before that entry, whose
    image head read the final norm."""
    from data2vec.build import build_frontend
    from data2vec.config import to_dict
    from data2vec.finetune.models import FineTuneModel
    from data2vec.nn.transformer import TransformerEncoder
    from data2vec.train.checkpoint import save_checkpoint

    cfg = load_config(modality, "tiny", overrides=overrides)
    frontend = build_frontend(modality, cfg.model)
    encoder = TransformerEncoder(cfg.model.encoder, window_size=frontend.window_size)
    outputs = len(labels["vocab"]) if "vocab" in labels else max(1, len(labels["classes"]))
    model = FineTuneModel(frontend, encoder, task, outputs, "mean", 0.1,
                          final_norm=True if legacy else None).eval()
    _perturb(model, 7)
    state = {"step": 1, "config": to_dict(cfg), "labels": labels,
             "finetune": {"task": task, "pooling": "mean", "dropout": 0.1}}
    if not legacy:
        state["final_norm"] = model.use_final_norm
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, model, state)
    return model


@pytest.mark.parametrize(("modality", "task", "labels", "overrides", "hf_class"), [
    ("speech", "asr", {"vocab": ["<blank>", "|", "A", "B", "C"]}, None, "Data2VecAudioForCTC"),
    ("speech", "audio-cls", {"classes": ["dog", "cat", "car"]}, None,
     "Data2VecAudioForSequenceClassification"),
    ("text", "text-cls", {"classes": ["neg", "pos"]}, None,
     "Data2VecTextForSequenceClassification"),
    ("text", "text-cls", {"classes": []}, None, "Data2VecTextForSequenceClassification"),
    ("image", "image-cls", {"classes": [str(i) for i in range(10)]},
     ["model.encoder.final_norm=false"], "Data2VecVisionForImageClassification"),
    # the tiny preset's BEiT final norm: mean pooling skips it (BEiT), so HF's head is exact
    ("image", "image-cls", {"classes": [str(i) for i in range(10)]}, None,
     "Data2VecVisionForImageClassification"),
])
def test_finetuned_export_gives_the_hf_task_model_with_equal_logits(
        tmp_path: Path, modality: str, task: str, labels: dict, overrides, hf_class: str) -> None:
    model = _finetuned_checkpoint(tmp_path, modality, task, labels, overrides)
    assert main(["export", "--to", "hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    hf = getattr(transformers, hf_class).from_pretrained(tmp_path / "hf").eval()
    source = {"speech": torch.randn(2, 4000), "text": torch.randint(5, 200, (2, 16)),
              "image": torch.randn(2, 3, 32, 32)}[modality]
    with torch.no_grad():
        ours, _ = model(source)
        theirs = hf(source).logits
    assert theirs.shape == ours.shape
    assert _max_diff(ours, theirs) <= TOL
    if task == "asr":
        vocab = json.loads((tmp_path / "hf" / "vocab.json").read_text())
        assert vocab == {s: i for i, s in enumerate(labels["vocab"])}
        assert hf.config.pad_token_id == 0  # HF's CTC blank = our blank id
    if task == "text-cls" and not labels["classes"]:
        assert hf.config.problem_type == "regression"


def test_an_image_head_fine_tuned_after_the_final_norm_is_refused_with_the_reason(
        tmp_path: Path) -> None:
    _finetuned_checkpoint(tmp_path, "image", "image-cls", {"classes": ["a", "b"]}, legacy=True)
    with pytest.raises(ConfigError, match="final LayerNorm.*no exact equivalent"):
        export_hf(tmp_path / "run", tmp_path / "hf")
