"""Joint multi-modal pre-training (`--modality speech,image,text`): the config takes each
modality's preset and one encoder, the model shares one transformer and one EMA teacher, the
batches interleave by exact weights, a run resumes exactly, 2 gloo processes equal 1, per-modality
metrics and collapse alarms are logged, and a joint checkpoint loads as each modality's model for
fine-tuning and HF export."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import make_demo_home
from data2vec.build import build_model
from data2vec.cli import main
from data2vec.config import config_from_dict, load_config, to_dict
from data2vec.configlib import load_yaml
from data2vec.data.joint import modality_schedule
from data2vec.data.loader import build_pretrain_loader
from data2vec.errors import ConfigError
from data2vec.joint_config import JointConfig
from data2vec.objective.joint import JointData2Vec
from data2vec.train import checkpoint as ckpt
from data2vec.train.joint import load_modality
from data2vec.train.optim import build_optimizer
from data2vec.train.pretrain import prepare_data

FAST = ["run.progress=false", "run.tensorboard=false", "run.log_every=1", "run.threads=1"]
MODALITIES = ("speech", "image", "text")


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_home(tmp_path_factory.mktemp("home"), speech_size=40)


@pytest.fixture(autouse=True)
def _home(demo_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA2VEC_HOME", str(demo_home))


def speech_data(home: Path) -> str:
    return f"speech.data.path={home / 'speech'}"


def joint_config(home: Path, version: int = 1, overrides: tuple[str, ...] = ()) -> JointConfig:
    cfg = load_config("speech,image,text", "tiny", version,
                      overrides=[speech_data(home), "run.threads=1", *overrides])
    prepare_data(cfg)
    return cfg


def metrics(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def joint_run(demo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short joint data2vec 1.0 run, shared by the tests that read a joint checkpoint."""
    run = tmp_path_factory.mktemp("joint") / "run"
    os.environ["DATA2VEC_HOME"] = str(demo_home)
    assert main(["pretrain", "--modality", "speech,image,text", "--out", str(run),
                 "--max-steps", "6", speech_data(demo_home), *FAST]) == 0
    return run


# ------------------------------------------------------------------------------------ config


def test_each_part_is_its_modality_preset_around_one_encoder(demo_home: Path) -> None:
    cfg = joint_config(demo_home)
    joint_preset = load_yaml(Path(__file__).parents[1] / "src/data2vec/presets/joint_v1_tiny.yaml")
    for modality in MODALITIES:
        single = load_config(modality, "tiny", 1)
        view = cfg.view(modality)
        assert view.model.encoder is cfg.model.encoder  # one architecture, the joint preset's
        assert view.model.masking == single.model.masking
        for key in ("top_k", "layer_norm", "final_norm", "target_source", "loss_beta",
                    "loss_scale", "head_layers", "ema_scope"):
            assert getattr(view.model.objective, key) == getattr(single.model.objective, key)
        assert view.model.objective.ema_anneal_steps == cfg.model.ema_anneal_steps == \
            joint_preset["model"]["ema_anneal_steps"]
        assert view.data.batch_size == single.data.batch_size
    # the conflict the joint preset resolves: pre-LN images (with a grid bias) vs post-LN others
    assert load_config("image", "tiny", 1).model.encoder.layer_norm_first
    assert not cfg.model.encoder.layer_norm_first
    assert cfg.model.encoder.relative_position_bias == "none"
    assert cfg.view("text").model.frontend.vocab_size == 4096  # synced from the tokenizer
    again = config_from_dict(to_dict(cfg))
    assert isinstance(again, JointConfig) and to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize(("overrides", "message"), [
    (["speech.model.objective.ema_end=0.5"], "one teacher"),
    (["data.path=/somewhere"], "speech.data.path=DIR"),
    (["image.model.frontend.pach_size=2"], "did you mean 'patch_size'"),
    (["model.encoder.relative_position_bias=shared"], "cannot be shared"),
    (["text.model.objective.top_k=9"], "text: model.objective.top_k=9"),
    (["sampling.image=0"], "sampling.image=0"),
])
def test_config_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("speech,image,text", "tiny", 1, overrides=overrides)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (
    Path(__file__).parents[1] / "src/data2vec/presets").glob("joint_*.yaml")))
def test_every_joint_preset_loads(preset: str) -> None:
    _, version, size = preset.split("_")
    cfg = load_config("speech,image,text", size, int(version[1]))
    assert cfg.preset == preset and cfg.run.max_steps >= 1
    assert {m: cfg.view(m).model.encoder.depth for m in MODALITIES} == dict.fromkeys(
        MODALITIES, cfg.model.encoder.depth)


def test_data_settings_go_to_every_part_and_unlisted_parts_are_errors() -> None:
    cfg = load_config("image,text", "tiny", 2, overrides=["data.num_workers=1",
                                                          "text.data.path=2024 #2"])
    assert cfg.speech is None and cfg.image.data.num_workers == cfg.text.data.num_workers == 1
    assert cfg.text.data.path == "2024 #2"  # a path, taken literally (not YAML)
    with pytest.raises(ConfigError, match="image: config key 'data.batch_size'"):
        load_config("image,text", "tiny", 1, overrides=["image.data.batch_size=-1"])
    with pytest.raises(ConfigError, match="speech is not one of"):
        load_config("image,text", "tiny", 1, overrides=["speech.data.batch_size=2"])


# --------------------------------------------------------------------------------- schedule


def test_schedule_has_exact_weights_per_block_in_a_seeded_order() -> None:
    weights = {"speech": 2, "image": 1, "text": 1}
    at = modality_schedule(weights, seed=1)
    order = [at(u) for u in range(400)]
    for start in range(0, 400, 4):
        assert Counter(order[start:start + 4]) == weights
    assert order == [modality_schedule(weights, seed=1)(u) for u in range(400)]  # pure
    assert order != [modality_schedule(weights, seed=2)(u) for u in range(400)]
    assert len({tuple(order[s:s + 4]) for s in range(0, 400, 4)}) > 1  # not a fixed cycle


def test_batches_resume_where_they_were_and_accumulate_one_modality(demo_home: Path) -> None:
    cfg = joint_config(demo_home, overrides=("optim.grad_accum=2",))
    first = build_pretrain_loader(cfg)
    seen = [next(first) for _ in range(7)]
    assert all(a.modality == b.modality for a, b in zip(seen[0::2], seen[1::2], strict=False))
    state = first.state_dict()
    after = [next(first) for _ in range(5)]
    resumed = build_pretrain_loader(cfg)
    resumed.load_state_dict(state)
    resumed.restore_bad_files({"text:/data/a:b.txt": "unreadable"})  # --skip-bad counts
    assert resumed.loaders["text"].bad_files == {"/data/a:b.txt": "unreadable"}
    assert resumed.bad_files == {"text:/data/a:b.txt": "unreadable"}
    assert resumed.skipped["unreadable"] == 1
    for a, b in zip(after, [next(resumed) for _ in range(5)], strict=True):
        assert a.modality == b.modality and torch.equal(a.source, b.source)
        assert torch.equal(a.mask, b.mask)


# ------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("version", [1, 2])
def test_one_encoder_one_teacher_and_untouched_idle_parts(demo_home: Path, version: int) -> None:
    cfg = joint_config(demo_home, version, ("model.encoder.dropout=0.0",))
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, JointData2Vec)
    for modality in MODALITIES:  # every part runs through the same transformer tensors
        assert model.view(modality).encoder.blocks[0].attn is model.encoder.blocks[0].attn
    keys = model.state_dict().keys()
    assert sum(k.startswith("teacher.model.encoder.blocks.0.") for k in keys) == \
        sum(k.startswith("encoder.blocks.0.") for k in keys)  # one teacher copy of it
    # the teacher tracks each front-end as its preset's ema_scope says
    tracked = {m: any(k.startswith(f"teacher.model.{m}.frontend.") for k in keys)
               for m in MODALITIES}
    assert tracked == {"speech": version == 2, "image": True, "text": False}
    # a view is exactly a single-modality model: same keys, same loss
    for modality in MODALITIES:
        single = build_model(cfg.view(modality))
        ckpt.load_model_weights(single, model.view(modality).state_dict(), modality)

    optimizer = build_optimizer(model, cfg.optim)
    batches = build_pretrain_loader(cfg)
    batch = next(batches)
    while batch.modality != "image":
        batch = next(batches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(batch).loss.backward()
    optimizer.step()
    model.ema_step(0)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("encoder.blocks.") for k in changed)
    assert any(k.startswith("modalities.image.") for k in changed)
    assert not any(k.startswith(("modalities.speech.", "modalities.text.")) for k in changed)
    assert any(k.startswith("teacher.model.encoder.") for k in changed)  # EMA, every update
    idle = [p for n, p in model.named_parameters() if n.startswith("modalities.text.")]
    assert all(p not in optimizer.state for p in idle)  # no Adam moments, no weight decay


def test_view_of_a_joint_checkpoint_gives_the_joint_loss(joint_run: Path,
                                                          demo_home: Path) -> None:
    cfg = config_from_dict(load_yaml(joint_run / "config.yaml"))
    joint = build_model(cfg)
    where = ckpt.find_checkpoint(joint_run)
    ckpt.load_model_weights(joint, ckpt.load_weights(where), str(where))
    joint.eval()
    batches = build_pretrain_loader(cfg)
    for _ in range(6):
        batch = next(batches)
        _, single = load_modality(joint_run, batch.modality)
        with torch.no_grad():
            assert torch.equal(joint(batch).loss, single(batch).loss)
    with pytest.raises(ConfigError, match="--modality speech"):
        load_modality(joint_run, None)


# ------------------------------------------------------------------------------ the command


@pytest.mark.parametrize("version", [1, 2])
def test_resume_equals_uninterrupted(tmp_path: Path, demo_home: Path, version: int) -> None:
    args = ["pretrain", "--modality", "speech,image,text", "--version", str(version),
            speech_data(demo_home), *FAST, "run.checkpoint_every=3", "--max-steps", "6"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    assert main([*args, "--out", str(tmp_path / "cut"), "run.stop_at=3"]) == 0
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert sorted(full) == sorted(cut) == list(range(1, 7))
    for step in full:
        assert abs(full[step]["loss"] - cut[step]["loss"]) <= 1e-6, step
    seen = Counter(k.split("/")[0] for r in full.values() for k in r if k.endswith("/loss"))
    assert seen == {"speech": 2, "image": 2, "text": 2}  # 1:1:1, exact per block of 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("scale_out", [(), ("run.data_parallel=fsdp",
                                            "run.activation_checkpointing=true")],
                         ids=["ddp", "fsdp+checkpointing"])
def test_two_processes_equal_one_with_same_global_batch(tmp_path: Path, demo_home: Path,
                                                        scale_out: tuple[str, ...]) -> None:
    # images and text: their loaders give 2 ranks x 4 the examples of 1 x 8 (speech buckets by
    # length per rank, in joint runs as alone). FSDP2 shards the shared blocks and teacher, and
    # the idle modality's front-end sits at the root without gradients in that update.
    common = ["pretrain", "--modality", "image,text", "--max-steps", "4", *FAST,
              "model.encoder.dropout=0.0"]
    assert main([*common, "--out", str(tmp_path / "one"), "data.batch_size=8"]) == 0
    env = {**os.environ, "DATA2VEC_HOME": str(demo_home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "data2vec.cli", *common, "--out", str(tmp_path / "two"), "data.batch_size=4",
           *scale_out]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert {k.split("/")[0] for r in one.values() for k in r if "/" in k} == {"image", "text"}
    for step in one:
        assert abs(one[step]["loss"] - two[step]["loss"]) <= 1e-5, step
        assert two[step]["samples"] == one[step]["samples"] == 8
    a = ckpt.load_weights(ckpt.find_checkpoint(tmp_path / "one"))
    b = ckpt.load_weights(ckpt.find_checkpoint(tmp_path / "two"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5  # idle parts untouched too


def test_per_modality_metrics_and_collapse_alarm(joint_run: Path, tmp_path: Path,
                                                 demo_home: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    records = metrics(joint_run)
    for modality in MODALITIES:
        logged = [r for r in records.values() if f"{modality}/loss" in r]
        assert len(logged) == 2
        assert all(r[f"{modality}/target_std"] > 0.1 for r in logged)
    assert main(["plot", str(joint_run)]) == 0
    assert (joint_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    code = main(["pretrain", "--modality", "image,text", "--out", str(tmp_path / "alarm"),
                 "--max-steps", "3", *FAST, "run.collapse_min_target_std=100",
                 "run.abort_on_collapse=true"])
    err = capsys.readouterr().err
    assert code == 2
    line = next(x for x in err.splitlines() if x.startswith("data2vec: error"))
    assert "representation collapse at step 1" in line
    assert ("image: target std" in line) != ("text: target std" in line)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["pretrain", "--modality", "speech,image,speech"])
    assert "speech,image,speech" in capsys.readouterr().err
    assert main(["pretrain", "--modality", "image,text", "--data", str(tmp_path),
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "image.data.path=DIR" in err


# --------------------------------------------------------------------- one modality out of it


def test_finetune_init_takes_the_modality_front_end_and_shared_encoder(
        joint_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    from data2vec.finetune.loop import FinetuneConfig, load_backbone

    saved = ckpt.load_weights(ckpt.find_checkpoint(joint_run))
    for task, modality in (("image-cls", "image"), ("text-cls", "text"), ("asr", "speech")):
        cfg, backbone = load_backbone(FinetuneConfig(task=task, init=str(joint_run)))
        assert cfg.modality == modality and cfg.model.encoder.depth == 4
        weights = backbone.state_dict()
        for key, value in saved.items():
            if key.startswith("encoder."):
                assert torch.equal(weights[key], value), key
            elif key.startswith(f"modalities.{modality}.frontend."):
                assert torch.equal(weights[key.removeprefix(f"modalities.{modality}.")], value)
    assert main(["finetune", "--task", "image-cls", "--init", str(joint_run), "--max-steps", "2",
                 "--batch-size", "4", "threads=1", "--out", str(tmp_path / "ft")]) == 0
    assert "accuracy" in capsys.readouterr().out
    # the fine-tuned post-LN image model: HF's Data2VecVision cannot hold it, our code can
    transformers = pytest.importorskip("transformers")
    import data2vec

    assert main(["export", "--to", "hf", str(tmp_path / "ft"), str(tmp_path / "hf"),
                 "--remote-code"]) == 0
    hf = transformers.AutoModelForImageClassification.from_pretrained(
        tmp_path / "hf", trust_remote_code=True).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = data2vec.load(tmp_path / "ft")(images)
        assert torch.allclose(hf(pixel_values=images).logits, ours, atol=1e-5)


def test_export_and_extract_each_modality(joint_run: Path, tmp_path: Path, monkeypatch,
                                          capsys: pytest.CaptureFixture) -> None:
    transformers = pytest.importorskip("transformers")
    import data2vec

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    g = torch.Generator().manual_seed(0)
    inputs = {"speech": ("input_values", torch.randn(2, 8000, generator=g)),
              "image": ("pixel_values", torch.randn(2, 3, 32, 32, generator=g)),
              "text": ("input_ids", torch.randint(4, 4000, (2, 24), generator=g))}
    assert main(["export", "--to", "hf", str(joint_run), str(tmp_path / "none")]) == 2
    assert "--modality speech" in capsys.readouterr().err
    # HF's Data2VecVision is pre-LN only: our post-LN shared encoder needs our model code
    assert main(["export", "--to", "hf", str(joint_run), str(tmp_path / "refused"),
                 "--modality", "image"]) == 2
    assert "--remote-code" in capsys.readouterr().err
    for modality, (name, source) in inputs.items():
        out = tmp_path / modality
        native = modality == "speech"  # post-LN with an input norm: HF's Data2VecAudio
        assert main(["export", "--to", "hf", str(joint_run), str(out), "--modality", modality,
                     *([] if native else ["--remote-code"])]) == 0
        assert (out / "modeling_data2vec2.py").exists() != native
        hf = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
        ours = data2vec.load(joint_run, modality=modality)
        with torch.no_grad():
            expected = ours.network.encode(source)[0].x
            got = hf(**{name: source}).last_hidden_state
            features = ours.extract_features(source, layers=-1).layers[4]
        assert float((got - expected).abs().max()) <= 1e-5, modality
        assert torch.equal(features, expected)  # post-LN, no final norm: the last block's output
    assert (joint_run / "tokenizer" / "vocab.json").is_file()  # the run alone reads text
    assert ours.tokenizer is not None
    lines = tmp_path / "lines.txt"
    lines.write_text("one line of text\nand another\n")
    assert main(["extract", str(joint_run), str(lines), "--modality", "text", "--layer", "2",
                 "--out", str(tmp_path / "features"), "--threads", "1"]) == 0
    assert len(list((tmp_path / "features").glob("*.npy"))) == 2
