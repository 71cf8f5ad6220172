"""The v1-vs-v2 and ablation benchmarks (benchmarks/v1_vs_v2.py, ablations.py, budget.py): the
matched presets differ only in the method, the per-phase step split adds up, the analysis
helpers, and the quick (v1 vs v2, one modality) and smoke (ablations) modes end to end with
their JSON schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_demo_home

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import ablations  # noqa: E402
import budget  # noqa: E402
from budget import PHASES, ArmSpec, lr_factor, relative_spread, time_to_reach  # noqa: E402


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_home(tmp_path_factory.mktemp("home"), speech_size=12)


@pytest.mark.parametrize("modality", ["speech", "image", "text"])
def test_matched_presets_differ_only_in_the_method(modality: str, home: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA2VEC_HOME", str(home))
    overrides = [f"data.path={home / 'speech'}"] if modality == "speech" else []
    v1, v2 = (budget.load_matched(modality, v, overrides) for v in (1, 2))
    assert v1.model.encoder == v2.model.encoder
    assert v1.data == v2.data  # the same examples per batch, crops, blocks, tokenizer
    fe1, fe2 = vars(v1.model.frontend).copy(), vars(v2.model.frontend).copy()
    fe1.pop("mask_token", None), fe2.pop("mask_token", None)  # v2 drops masked steps instead
    assert fe1 == fe2
    for key in ("ema_start", "ema_end", "init_std"):
        assert getattr(v1.model.objective, key) == getattr(v2.model.objective, key)
    assert not v2.model.v2.alibi  # ALiBi would be an encoder difference
    assert v1.run.seed == v2.run.seed == 1


@pytest.mark.parametrize("version", [1, 2])
def test_step_split_adds_up_and_schedules_follow_the_budget(version: int, home: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv("DATA2VEC_HOME", str(home))
    cfg = budget.load_matched("image", version, ["model.encoder.depth=2", "model.objective.top_k=2",
                                                "data.batch_size=4"])
    torch.set_num_threads(1)
    arm = budget.run_arm(cfg, ArmSpec(budget=0.6, fractions=(0.5, 1.0), probe_at_start=False),
                         probe=None, log=lambda _: None)
    split = arm["step_split"]
    assert set(split) == set(PHASES)
    assert all(split[k] > 0 for k in ("teacher", "student", "decoder", "optimizer"))
    # every phase of an update is timed once: the parts add up to the whole
    assert sum(split.values()) == pytest.approx(arm["s_per_step"], rel=1e-6)
    assert arm["seconds"] >= 0.6 and arm["steps"] > 1
    flops = [p["flops"] for p in arm["curve"]]
    assert flops[0] > 0 and flops[1] > flops[0]
    assert arm["flops"] == pytest.approx(arm["flops_per_step"] * arm["steps"])


def test_schedules_and_analysis_helpers() -> None:
    assert lr_factor(0.0) == pytest.approx(0.01) and lr_factor(0.05) == pytest.approx(1.0)
    assert lr_factor(1.0) == pytest.approx(0.0) and 0 < lr_factor(0.5) < 1
    assert budget.ema_tau(0.0, 0.99, 0.999) == 0.99 and budget.ema_tau(2.0, 0.99, 0.999) == 0.999
    curve = [{"seconds": 0.0, "score": 0.5}, {"seconds": 10.0, "score": 0.7},
             {"seconds": 20.0, "score": 0.9}]
    assert time_to_reach(curve, 0.8) == pytest.approx(15.0)
    assert time_to_reach(curve, 0.4) == 0.0
    assert time_to_reach(curve, 0.95) is None
    # a scale-free collapse measure: constant positions give 0 at any scale
    assert relative_spread(torch.full((2, 5, 8), 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert relative_spread(1e-3 * torch.randn(4, 50, 16)) == pytest.approx(1.0, abs=0.1)


def _fake_run(key: str, score: float) -> dict:
    final = {"score": score, "score_last": score, "target_std": 0.5, "pred_std": 0.4,
             "target_spread": 0.9, "loss": 1.0}
    return {"key": key, "overrides": [], "final": final, "steps": 10, "s_per_step": 0.1,
            "collapse_alarms": 0, "first_alarm_step": None}


def test_ablation_verdicts_compare_with_the_papers_setting() -> None:
    scores = {"K=1": [0.80, 0.81, 0.79], "K=2": [0.90, 0.91, 0.89],
              "K=4": [0.905, 0.90, 0.895], "K=all (6)": [0.90, 0.91, 0.90]}
    runs = [_fake_run(f"top_k/{s}/{i + 1}", v) for s, vs in scores.items()
            for i, v in enumerate(vs)]
    rows = {r["setting"]: r for r in ablations.build_rows(runs, [1, 2, 3])}
    assert rows["K=1"]["verdict"] == "clearly worse"
    assert rows["K=1"]["vs_paper_setting"] == pytest.approx(-0.1033, abs=1e-3)
    assert rows["K=2"]["verdict"] == "within noise"
    assert rows["K=all (6)"]["verdict"] == "the paper's setting"


def run_study(script: str, args: list[str], stem: str, home: Path, out: Path) -> dict:
    """Run one benchmark script in one worker process; its JSON record (the PNG beside it)."""
    env = {**os.environ, "DATA2VEC_HOME": str(home)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--workers", "1",
                    "--out", str(out)], check=True, env=env, capture_output=True, text=True,
                   timeout=600)
    assert (out / f"{stem}.png").stat().st_size > 0
    return json.loads((out / f"{stem}.json").read_text())


def test_v1_vs_v2_quick_mode_of_one_modality_writes_the_documented_json(home: Path,
                                                                        tmp_path: Path) -> None:
    record = run_study("v1_vs_v2.py", ["--quick", "--modalities", "image"], "v1_vs_v2_quick",
                       home, tmp_path)
    assert "--quick" in record["command"] and record["mode"] == "quick"
    assert record["seeds"] == [1] and record["budget_cpu_seconds"]["image"] > 0
    assert "loadavg_at_write" in record["machine"]
    assert record["measured_by"]["image"]["load"]["samples"]
    assert list(record["results"]) == ["image"]
    res = record["results"]["image"]
    for key in ("metric", "goal_fraction", "v1_final", "v2_final", "v2_time_fraction",
                "v2_flops_fraction", "verdict", "goal_met", "v1_beats_untrained"):
        assert key in res
    for version in ("v1", "v2"):
        arm = res[version]
        assert set(arm["step_split"]) == set(PHASES)
        assert arm["steps"]["mean"] > 0 and 0.0 <= arm["final"]["mean"] <= 1.0
        run = arm["runs"][0]
        assert run["version"] == int(version[1]) and run["seed"] == 1
        assert [p["seconds"] for p in run["curve"]] == sorted(p["seconds"] for p in run["curve"])
        assert run["curve"][-1]["seconds"] >= record["budget_cpu_seconds"]["image"]
        assert run["curve"][-1]["flops"] > 0
    assert {r["version"] for r in record["table"]} == {"v1", "v2"}


def test_ablations_smoke_writes_the_documented_json(home: Path, tmp_path: Path) -> None:
    record = run_study("ablations.py", ["--smoke", "--groups", "target_norm"], "ablations_smoke",
                       home, tmp_path)
    assert "--smoke" in record["command"] and record["mode"] == "smoke"
    assert record["seeds"] == [1] and record["budget_cpu_seconds"] > 0
    assert "cpu" in record["machine"]
    assert record["measured_by"]["target_norm"]["load"]["samples"]
    assert record["paper"]["target_norm"]["setting"] == "layer"
    rows = {r["setting"]: r for r in record["rows"]}
    assert set(rows) == {"none", "layer"}  # the first setting and the paper's
    assert rows["layer"]["verdict"] == "the paper's setting"
    assert rows["none"]["verdict"] == "one seed: no verdict"
    for row in rows.values():
        assert row["group"] == "target_norm" and row["reading"]
        assert 0.0 <= row["probe"]["mean"] <= 1.0 and row["steps"]["mean"] > 0
        assert row["collapse_alarm_runs"] in (0, 1)
        assert row["target_spread"]["mean"] >= 0.0 and row["target_std"]["mean"] >= 0.0
    assert "model.objective.layer_norm=none" in rows["none"]["overrides"]
    assert all(r["budget"] == record["budget_cpu_seconds"] and r["seconds"] >= r["budget"]
               for r in record["runs"])
