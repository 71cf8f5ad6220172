"""data2vec 2.0 -> HuggingFace with our model code shipped in the directory.

Every export here is loaded by ``transformers`` Auto classes with ``trust_remote_code=True`` in
one fresh Python process that cannot import this package (isolated mode, no site hooks: only the
virtual environment's site-packages directory, whose .pth files, our editable install among them,
are not read; the working directory lies outside the repository). Its outputs come back through a
file and are compared with our student encoder / fine-tuned model: tiny random models of all three
modalities (padded batches, ALiBi, pre-LN variants) and the fairseq data2vec 2.0 fixtures.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data2vec.build import build_frontend, build_model
from data2vec.cli import main
from data2vec.config import load_config, to_dict
from data2vec.errors import ConfigError
from data2vec.finetune.models import FineTuneModel
from data2vec.interop.common import ImportReport, load_our_model, write_checkpoint
from data2vec.interop.fairseq import import_fairseq
from data2vec.interop.hf_v2 import (
    REMOTE_DIR,
    REMOTE_FILES,
    build_hf_v2_task_model,
    task_config,
)
from data2vec.nn.transformer import TransformerEncoder
from data2vec.objective.data2vec2 import AlibiBias
from data2vec.train.checkpoint import save_checkpoint

TOL = 1e-5
FAIRSEQ = Path(__file__).parent / "data" / "fairseq"

# Runs in the fresh process: argv[1] = jobs.json. Loads each export with its Auto class, feeds it
# the saved inputs and saves what it returns.
CHILD = r"""
import importlib.util, json, sys
jobs = json.load(open(sys.argv[1]))
sys.path.extend(jobs["site"])  # site-packages itself, without processing its .pth files
assert importlib.util.find_spec("data2vec") is None, "data2vec is importable in the child"
import torch, transformers
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)
report = {}
for job in jobs["exports"]:
    cls = getattr(transformers, job["auto_class"])
    model, info = cls.from_pretrained(job["dir"], trust_remote_code=True,
                                      output_loading_info=True)
    model.eval()
    inputs = load_file(job["inputs"])
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    main = out.logits if hasattr(out, "logits") else out.last_hidden_state
    tensors = {"main": main.clone()}
    tensors.update({f"hidden.{i}": h.contiguous() for i, h in enumerate(out.hidden_states)})
    save_file(tensors, job["outputs"])
    report[job["name"]] = {"class": type(model).__name__,
                           "missing": sorted(info["missing_keys"]),
                           "unexpected": sorted(info["unexpected_keys"])}
report["data2vec_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "data2vec")
print(json.dumps(report))
"""


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (zero-initialised tokens, biases and scales included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in module.named_buffers():
            if name.endswith("token_type"):  # a constant row, zero unless imported from HF
                b.add_(torch.randn(b.shape, generator=g) * 0.1)


def _speech_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    wave = torch.randn(3, 6000)
    padding = torch.zeros(3, 6000, dtype=torch.bool)
    padding[1, 4100:] = True  # padded rows: frame padding, pos-conv zeroing and attention
    padding[2, 2500:] = True
    return wave, padding


def _text_inputs(vocab: int, pad: int) -> torch.Tensor:
    ids = torch.randint(4, vocab, (3, 20))
    ids[:, 0] = 0
    ids[1, 14:] = pad  # padding from the <pad> ids (no attention_mask given)
    return ids


def _our_outputs(model, source: torch.Tensor, padding: torch.Tensor | None) -> dict:
    """model.encode's output and, for hidden_states, the encoder input and every block."""
    with torch.no_grad():
        out, _ = model.encode(source, padding)
        local, pad = model.frontend.local_features(source, padding)
        x, pad = model.frontend.contextualize(local, pad, None)
        depth = model.encoder.cfg.depth
        blocks = model.encoder(x, pad, model._full_alibi(local.shape[1], x.device),
                               collect_layers=depth, target_source="block")
        hidden = [model.encoder.input_norm(x)] + blocks.layer_results
    assert torch.equal(blocks.x, out.x)
    return {"main": out.x, **{f"hidden.{i}": h for i, h in enumerate(hidden)}}


class Exports:
    """Exported directories, their inputs and our outputs, then the child's report."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.jobs: list[dict] = []
        self.ours: dict[str, dict[str, torch.Tensor]] = {}
        self.report: dict = {}

    def add(self, name: str, source_dir: Path, auto_class: str, inputs: dict,
            ours: dict[str, torch.Tensor]) -> Path:
        out = self.root / f"hf-{name}"
        assert main(["export", "--to", "hf", str(source_dir), str(out)]) == 0
        self.add_job(name, out, auto_class, inputs, ours)
        return out

    def add_job(self, name: str, directory: Path, auto_class: str, inputs: dict,
                ours: dict[str, torch.Tensor]) -> None:
        save_file({k: v.contiguous() for k, v in inputs.items()}, self.root / f"{name}.in")
        self.jobs.append({"name": name, "dir": str(directory), "auto_class": auto_class,
                          "inputs": str(self.root / f"{name}.in"),
                          "outputs": str(self.root / f"{name}.out")})
        self.ours[name] = ours

    def run_child(self) -> None:
        paths = sysconfig.get_paths()
        site = sorted({paths["purelib"], paths["platlib"]})
        (self.root / "jobs.json").write_text(json.dumps({"site": site, "exports": self.jobs}))
        (self.root / "child.py").write_text(CHILD)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.root),
               "HF_HOME": str(self.root / "hf-home"), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, "-I", "-S", "child.py", "jobs.json"],
                             cwd=self.root, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        self.report = json.loads(run.stdout.strip().splitlines()[-1])

    def theirs(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.root / f"{name}.out")


def _pretrained(exports: Exports, name: str, modality: str, seed: int,
                overrides: list[str] | None = None) -> None:
    cfg = load_config(modality, "tiny", version=2, overrides=overrides)
    model = build_model(cfg).eval()
    _perturb(model, seed)
    write_checkpoint(exports.root / name, cfg, model, ImportReport("test"))
    _add_base(exports, name, exports.root / name, model, modality)


def _add_base(exports: Exports, name: str, source_dir: Path, model, modality: str) -> None:
    if modality == "speech":
        wave, padding = _speech_inputs()
        inputs = {"input_values": wave, "attention_mask": (~padding).long()}
        ours = _our_outputs(model, wave, padding)
    elif modality == "image":
        fe = model.frontend.cfg
        pixels = torch.randn(2, fe.in_channels, fe.image_size, fe.image_size)
        inputs, ours = {"pixel_values": pixels}, _our_outputs(model, pixels, None)
    else:
        fe = model.frontend.cfg
        ids = _text_inputs(fe.vocab_size, fe.pad_index)
        inputs, ours = {"input_ids": ids}, _our_outputs(model, ids, None)
    exports.add(name, source_dir, "AutoModel", inputs, ours)


def _fairseq(exports: Exports, name: str) -> None:
    out, _ = import_fairseq(FAIRSEQ / f"{name}.pt", exports.root / name)
    cfg, model = load_our_model(out)
    _add_base(exports, name, out, model, cfg.modality)


TASKS = {  # name: (modality, task, labels, pooling, Auto class)
    "asr": ("speech", "asr", {"vocab": ["<blank>", "|", "A", "B", "C"]}, "mean",
            "AutoModelForCTC"),
    "audio-cls": ("speech", "audio-cls", {"classes": ["dog", "cat", "car"]}, "mean",
                  "AutoModelForAudioClassification"),
    "text-cls": ("text", "text-cls", {"classes": ["neg", "pos"]}, "mean",
                 "AutoModelForSequenceClassification"),
    "text-reg": ("text", "text-cls", {"classes": []}, "mean",
                 "AutoModelForSequenceClassification"),
    "image-cls": ("image", "image-cls", {"classes": [str(i) for i in range(10)]}, "cls",
                  "AutoModelForImageClassification"),
}


def _finetuned_model(root: Path, name: str, seed: int):
    """A data2vec 2.0 FineTuneModel saved the way ``data2vec finetune`` saves it."""
    modality, task, labels, pooling, _ = TASKS[name]
    cfg = load_config(modality, "tiny", version=2)
    frontend = build_frontend(modality, cfg.model)
    encoder = TransformerEncoder(cfg.model.encoder, window_size=frontend.window_size)
    alibi = AlibiBias(cfg.model.encoder.num_heads) if cfg.model.v2.alibi else None
    outputs = len(labels["vocab"]) if "vocab" in labels else max(1, len(labels["classes"]))
    model = FineTuneModel(frontend, encoder, task, outputs, pooling, 0.1, alibi).eval()
    _perturb(model, seed)
    state = {"step": 1, "config": to_dict(cfg), "labels": labels,
             "finetune": {"task": task, "pooling": pooling, "dropout": 0.1}}
    save_checkpoint(root / name / "checkpoints", 1, model, state)
    return cfg, model


def _finetuned(exports: Exports, name: str, seed: int) -> None:
    modality, _, _, _, auto_class = TASKS[name]
    cfg, model = _finetuned_model(exports.root, name, seed)
    if modality == "speech":
        source, padding = _speech_inputs()
        inputs = {"input_values": source, "attention_mask": (~padding).long()}
    elif modality == "image":
        source, padding = torch.randn(2, 3, 32, 32), None
        inputs = {"pixel_values": source}
    else:
        source, padding = _text_inputs(cfg.model.frontend.vocab_size, 1), None
        inputs = {"input_ids": source}
    with torch.no_grad():
        logits, _ = model(source, padding)
        features, _ = model.features(source, padding)
    out = exports.add(name, exports.root / name, auto_class, inputs, {"main": logits})
    if name == "asr":  # AutoModel on a task export: the base model, the head left out
        exports.add_job("asr-base", out, "AutoModel", inputs, {"main": features})


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Exports:
    torch.manual_seed(0)
    exports = Exports(tmp_path_factory.mktemp("hf-v2"))
    _pretrained(exports, "speech", "speech", 1)
    # fairseq's padding rule, GroupNorm feature encoder, conv bias, even pos-conv kernel, 3 heads
    _pretrained(exports, "speech-variant", "speech", 2, [
        "model.frontend.pos_conv_padding=input", "model.frontend.extractor_mode=group_norm",
        "model.frontend.conv_bias=true", "model.frontend.pos_conv_width=8",
        "model.frontend.pos_conv_groups=8", "model.encoder.num_heads=8"])
    _pretrained(exports, "image", "image", 3)
    # pre-LN with a final norm, q/v biases only, layer scale, learned positions
    _pretrained(exports, "image-variant", "image", 4, [
        "model.encoder.layer_norm_first=true", "model.encoder.final_norm=true",
        "model.encoder.qkv_bias=qv", "model.encoder.layer_scale_init=0.1",
        "model.frontend.positions=learned"])
    _pretrained(exports, "text", "text", 5)
    for name in ("audio_v2", "image_v2", "text_v2"):
        _fairseq(exports, name)
    for seed, name in enumerate(TASKS, start=10):
        _finetuned(exports, name, seed)
    exports.run_child()
    return exports


BASE = ["speech", "speech-variant", "image", "image-variant", "text", "audio_v2", "image_v2",
        "text_v2"]


@pytest.mark.parametrize("name", BASE)
def test_auto_model_of_the_export_matches_our_encoder_and_every_block(exports: Exports,
                                                                       name: str) -> None:
    ours, theirs = exports.ours[name], exports.theirs(name)
    assert set(theirs) == set(ours)  # depth + 1 hidden states
    for key in ours:
        assert theirs[key].shape == ours[key].shape, key
        assert float((theirs[key] - ours[key]).abs().max()) <= TOL, key
    assert exports.report[name]["missing"] == [] and exports.report[name]["unexpected"] == []


@pytest.mark.parametrize("name", list(TASKS))
def test_finetuned_export_gives_the_task_model_with_equal_logits(exports: Exports,
                                                                 name: str) -> None:
    ours, theirs = exports.ours[name]["main"], exports.theirs(name)["main"]
    assert theirs.shape == ours.shape
    assert float((theirs - ours).abs().max()) <= TOL
    expected = {"asr": "Data2Vec2ForCTC", "audio-cls": "Data2Vec2ForAudioClassification",
                "text-cls": "Data2Vec2ForSequenceClassification",
                "text-reg": "Data2Vec2ForSequenceClassification",
                "image-cls": "Data2Vec2ForImageClassification"}[name]
    assert exports.report[name] == {"class": expected, "missing": [], "unexpected": []}


def test_auto_model_of_a_task_export_is_its_encoder(exports: Exports) -> None:
    ours, theirs = exports.ours["asr-base"]["main"], exports.theirs("asr-base")["main"]
    assert float((theirs - ours).abs().max()) <= TOL
    report = exports.report["asr-base"]
    assert report["class"] == "Data2Vec2AudioModel" and report["missing"] == []
    assert report["unexpected"] == ["head.1.bias", "head.1.weight"]


def test_the_fresh_process_never_imported_data2vec(exports: Exports) -> None:
    assert exports.report["data2vec_modules"] == []
    for job in exports.jobs:
        files = {p.name for p in Path(job["dir"]).iterdir()}
        assert {"config.json", "model.safetensors", *REMOTE_FILES} <= files


def test_export_directory_contents(exports: Exports) -> None:
    config = json.loads((exports.root / "hf-asr" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_data2vec2.Data2Vec2Config",
                                  "AutoModel": "modeling_data2vec2.Data2Vec2AudioModel",
                                  "AutoModelForCTC": "modeling_data2vec2.Data2Vec2ForCTC"}
    assert config["architectures"] == ["Data2Vec2ForCTC"] and config["pad_token_id"] == 0
    vocab = json.loads((exports.root / "hf-asr" / "vocab.json").read_text())
    assert vocab == {s: i for i, s in enumerate(TASKS["asr"][2]["vocab"])}
    # what HF's Auto* processors read sits beside the weights, as for data2vec 1.0 exports
    image = json.loads((exports.root / "hf-image" / "preprocessor_config.json").read_text())
    assert image["crop_size"] == {"height": 32, "width": 32} and image["resample"] == 3
    speech = json.loads((exports.root / "hf-speech" / "preprocessor_config.json").read_text())
    assert speech["sampling_rate"] == 16000 and speech["return_attention_mask"]
    processor = json.loads((exports.root / "hf-asr" / "processor_config.json").read_text())
    assert processor["processor_class"] == "Wav2Vec2Processor"
    assert processor["feature_extractor"]["sampling_rate"] == 16000
    assert (exports.root / "hf-asr" / "tokenizer_config.json").is_file()
    assert json.loads((exports.root / "hf-text-reg" / "config.json").read_text())[
        "problem_type"] == "regression"
    cfg = load_config("image", "tiny", version=2)  # fine-tuning's drop-path rate travels along
    assert task_config(cfg, "image-cls", {"drop_path": 0.2}, {}, 3)["drop_path"] == 0.2
    assert "drop_path" not in task_config(cfg, "image-cls", {"drop_path": -1.0}, {}, 3)
    for file in REMOTE_FILES:  # shipped verbatim
        assert (exports.root / "hf-image" / file).read_bytes() == (REMOTE_DIR / file).read_bytes()
    # the weights are our student's tensors under our names; teacher and decoder stay behind
    weights = load_file(exports.root / "hf-speech" / "model.safetensors")
    assert "alibi.alibi_scale" in weights and "encoder.blocks.0.attn.qkv.weight" in weights
    assert not any(k.startswith(("teacher.", "decoder.")) or "mask_emb" in k for k in weights)


def test_remote_code_imports_only_torch_and_transformers() -> None:
    for file in REMOTE_FILES:
        tree = ast.parse((REMOTE_DIR / file).read_text())
        roots = {alias.name.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.Import) for alias in node.names}
        roots |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert roots <= {"__future__", "math", "torch", "transformers"}, (file, roots)


def test_hf_task_losses_equal_our_fine_tuning_losses(tmp_path: Path) -> None:
    from data2vec.batch import Batch
    from data2vec.finetune.loop import finetune_config, task_loss

    for seed, name in enumerate(TASKS, start=30):
        modality, task, labels, pooling, _ = TASKS[name]
        cfg, model = _finetuned_model(tmp_path, name, seed)
        ft = finetune_config(task, pooling=pooling, mask_prob=0.0, channel_mask_prob=0.0)
        hf = build_hf_v2_task_model(cfg, model, to_dict(ft), labels)
        if modality == "speech":
            wave, padding = _speech_inputs()
            kwargs = {"input_values": wave, "attention_mask": (~padding).long()}
        elif modality == "image":
            wave, padding = torch.randn(3, 3, 32, 32), None
            kwargs = {"pixel_values": wave}
        else:
            wave, padding = _text_inputs(cfg.model.frontend.vocab_size, 1), None
            wave[1, 14:] = 5  # no padding: our text-cls batches carry no <pad> here
            kwargs = {"input_ids": wave}
        if task == "asr":
            target = torch.tensor([[2, 3, 3, 4], [4, 2, 0, 0], [3, 0, 0, 0]])
            lengths = torch.tensor([4, 2, 1])
            batch = Batch(wave, padding, target=target, target_lengths=lengths)
            hf_labels = target.masked_fill(torch.arange(4) >= lengths[:, None], -100)
        elif task == "audio-cls":
            target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
            batch, hf_labels = Batch(wave, padding, target=target), target
        elif labels["classes"]:
            target = torch.tensor([1, 0, 1]) if task == "text-cls" else torch.tensor([7, 2, 5])
            batch, hf_labels = Batch(wave, padding, target=target), target
        else:
            target = torch.tensor([0.5, 3.0, 1.5])
            batch, hf_labels = Batch(wave, padding, target=target), target
        with torch.no_grad():
            outputs = len(labels["vocab"]) if "vocab" in labels else max(1, len(labels["classes"]))
            ours = task_loss(model, batch, ft, outputs, torch.Generator().manual_seed(0))
            theirs = hf(**kwargs, labels=hf_labels).loss
        assert abs(float(ours) - float(theirs)) <= 1e-5 * max(1.0, abs(float(ours))), name


@pytest.mark.parametrize(("override", "option"), [
    ("model.encoder.relative_position_bias=shared", "relative_position_bias=shared"),
    ("model.encoder.relative_position_bias=per_block", "relative_position_bias=per_block"),
])
def test_v2_export_refuses_what_the_remote_code_cannot_express(tmp_path: Path, capsys,
                                                               override: str,
                                                               option: str) -> None:
    cfg = load_config("image", "tiny", version=2, overrides=[override])
    write_checkpoint(tmp_path / "ck", cfg, build_model(cfg), ImportReport("test"))
    assert main(["export", "--to", "hf", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("data2vec: error:") and option in err and "\n" not in err
    assert not (tmp_path / "hf").exists()
    with pytest.raises(ConfigError, match=option):
        from data2vec.interop.hf_v2 import remote_config

        remote_config(cfg)


def test_output_attentions_are_probabilities_that_ignore_padding() -> None:
    from data2vec.interop.hf_v2 import build_hf_v2_model

    cfg = load_config("text", "tiny", version=2)
    model = build_model(cfg).eval()
    _perturb(model, 6)
    hf = build_hf_v2_model(cfg, model)
    ids = _text_inputs(cfg.model.frontend.vocab_size, cfg.model.frontend.pad_index)
    with torch.no_grad():
        out = hf(ids, output_attentions=True)  # the explicit softmax path instead of SDPA
        ours, _ = model.encode(ids)
    assert float((out.last_hidden_state - ours.x).abs().max()) <= TOL
    assert len(out.attentions) == cfg.model.encoder.depth
    for probs in out.attentions:  # (B, H, L, L)
        assert probs.shape == (3, cfg.model.encoder.num_heads, 20, 20)
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)
        assert float(probs[1, :, :, 14:].abs().max()) == 0.0  # row 1's <pad> keys get nothing


def test_exported_task_model_trains_in_hf(tmp_path: Path) -> None:
    """Train mode (dropout, layer drop, drop-path on) gives a finite loss and gradients reach
    the waveform projection, the ALiBi scales and the head."""
    cfg, model = _finetuned_model(tmp_path, "asr", 40)
    ft = {"task": "asr", "pooling": "mean", "dropout": 0.1}
    hf = build_hf_v2_task_model(cfg, model, ft, TASKS["asr"][2])
    hf.data2vec2.encoder.layerdrop = 0.25
    hf.train()
    wave, padding = _speech_inputs()
    labels = torch.tensor([[2, 3, 3, 4], [4, 2, -100, -100], [3, -100, -100, -100]])
    loss = hf(wave, attention_mask=(~padding).long(), labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    params = dict(hf.named_parameters())
    for name in ("data2vec2.frontend.feature_proj.weight", "data2vec2.alibi.alibi_scale",
                 "head.1.weight"):
        assert params[name].grad is not None and float(params[name].grad.abs().sum()) > 0, name
