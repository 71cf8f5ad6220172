"""data2vec 2.0 tiny presets train: the loss falls on each modality through the real loader, and
`data2vec pretrain --version 2` runs end to end and resumes exactly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data2vec.build import build_model
from data2vec.cli import main
from data2vec.config import load_config
from data2vec.data.audio import write_manifest
from data2vec.data.demo import prepare_demo
from data2vec.data.loader import build_pretrain_loader, load_or_train_tokenizer, sync_text_vocab
from data2vec.train.optim import build_optimizer

FAST = ["run.progress=false", "run.tensorboard=false", "run.log_every=1", "run.threads=1"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # 2 cores shared with other processes: two threads each thrash, one runs ~10x faster
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    speech = root / "speech"
    (speech / "audio").mkdir(parents=True)
    rng = np.random.default_rng(0)
    t = np.arange(16_000) / 16_000
    for i in range(16):  # tone sweeps in noise: structure a student can learn to predict
        f0 = rng.uniform(150, 600)
        wave = np.sin(2 * np.pi * f0 * t * (1 + 0.5 * t)) + 0.1 * rng.standard_normal(t.size)
        sf.write(speech / "audio" / f"{i:02d}.wav", 0.3 * wave, 16_000, subtype="PCM_16")
    write_manifest(speech / "audio", speech)
    return {"speech": speech, "image": prepare_demo("image", root / "image"),
            "text": prepare_demo("text", root / "text", vocab_size=512)}


@pytest.mark.parametrize("modality", ["speech", "image", "text"])
def test_v2_tiny_lowers_the_loss(modality: str, data: dict[str, Path]) -> None:
    overrides = [f"data.path={data[modality]}", "run.max_steps=40"]
    if modality == "text":
        overrides.append("data.tokens_per_sample=64")
    if modality == "speech":
        overrides.append("data.max_sample_size=8000")
    cfg = load_config(modality, "tiny", 2, overrides=overrides)
    if modality == "text":
        sync_text_vocab(cfg, load_or_train_tokenizer(cfg))
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    for group in optimizer.param_groups:
        group["lr"] = cfg.optim.lr  # constant lr: no warm-up in a short test
    loader = iter(build_pretrain_loader(cfg))
    losses = []
    for step in range(30 if modality == "text" else 20):
        out = model(next(loader))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.ema_step(step)
        losses.append(float(out.loss.detach()))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses


def test_pretrain_cli_version_2_runs_and_resumes(tmp_path: Path, data: dict[str, Path]) -> None:
    args = ["pretrain", "--modality", "image", "--version", "2", "--data", str(data["image"]),
            *FAST, "run.checkpoint_every=2", "model.v2.clone_batch=2"]
    assert main([*args, "--out", str(tmp_path / "full"), "--max-steps", "4"]) == 0
    assert main([*args, "--out", str(tmp_path / "cut"), "--max-steps", "4", "run.stop_at=2"]) == 0
    assert main([*args, "--out", str(tmp_path / "cut"), "--max-steps", "4", "--resume"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in cut] == [1, 2, 3, 4]
    for a, b in zip(rows, cut, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6
        assert abs(a["masked_fraction"] - 52 / 64) < 1e-6
