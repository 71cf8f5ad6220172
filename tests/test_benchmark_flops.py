"""benchmarks/flops.py counts an update's FLOPs by formula; where torch's own counter is right
(no grouped convolutions, eager attention), the two agree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_demo_home
from data2vec.build import build_model
from data2vec.config import load_config
from data2vec.data.loader import build_pretrain_loader
from data2vec.train.pretrain import prepare_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from flops import update_flops  # noqa: E402

# torch 2.13's counter over-counts grouped-conv gradients by the group count and misses the CPU
# SDPA kernels: compare with groups 1 and eager attention, where it is exact
COUNTABLE = ["model.encoder.attention_impl=eager", "model.frontend.pos_conv_groups=1",
             "model.v2.decoder_groups=1"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_home(tmp_path_factory.mktemp("home"), speech_size=12)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("modality", ["speech", "image", "text"])
def test_formula_matches_torch_counter(modality: str, version: int, home: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA2VEC_HOME", str(home))
    overrides = [o for o in COUNTABLE if modality == "speech" or "pos_conv" not in o]
    if modality == "speech":
        overrides += [f"data.path={home / 'speech'}", "data.max_sample_size=6000"]
    cfg = load_config(modality, "tiny", version, overrides=overrides)
    prepare_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = next(build_pretrain_loader(cfg))
    with FlopCounterMode(display=False) as counter:
        model(batch).loss_sum.backward()
    formula = update_flops(cfg, batch)["total"]
    # the formula also counts the first speech conv's input gradient, which torch skips
    assert formula == pytest.approx(counter.get_total_flops(), rel=0.01)
