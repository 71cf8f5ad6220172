"""The command line is complete and says what it does: --version, --device with a one-line error,
--print-config, every option's help with its default, the finetune settings in --help, the
README synopsis naming every verb and flag, rank-0-only output, the default thread count, and one
run layout for every import."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from data2vec import __version__
from data2vec.cli import build_parser, main
from data2vec.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _verbs() -> dict[str, argparse.ArgumentParser]:
    """'pretrain', 'prepare demo', … -> their parsers."""
    def children(parser: argparse.ArgumentParser, prefix: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    path = f"{prefix} {name}".strip()
                    nested = [a for a in sub._actions
                              if isinstance(a, argparse._SubParsersAction)]
                    if nested:
                        yield from children(sub, path)
                    else:
                        yield path, sub
    return dict(children(build_parser(), ""))


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"data2vec {__version__} (torch ") and "Python" in out


@pytest.mark.parametrize("args", [["--device", "cuda"], ["run.device=cuda"]])
def test_unavailable_device_is_one_line(tmp_path: Path, capsys, args: list[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(["pretrain", "--modality", "image", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("data2vec: error: device 'cuda' is not available")
    assert not (tmp_path / "r").exists()  # nothing ran
    assert main(["extract", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o"),
                 "--device", "mps"]) == 2
    assert "device 'mps' is not available" in capsys.readouterr().err


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path: Path,
                                                                   capsys) -> None:
    args = ["pretrain", "--modality", "text", "--version", "2", "--out", str(tmp_path / "r"),
            "--max-steps", "7", "model.encoder.depth=5", "--print-config"]
    assert main(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = dataclasses.asdict(load_config("text", "tiny", 2, None,
                                              ["model.encoder.depth=5", "run.max_steps=7"]))
    assert yaml.safe_load(yaml.safe_dump(expected)) == printed
    assert not (tmp_path / "r").exists()
    assert main(["finetune", "--task", "asr", "--init", "scratch", "lr=3e-4", "model.x=1",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["finetune"]["lr"] == 3e-4 and printed["finetune"]["schedule"] == "tri_stage"
    assert printed["model_overrides"] == ["model.x=1"]


def test_every_option_has_help_that_shows_its_default() -> None:
    for verb, parser in _verbs().items():
        for action in parser._actions:
            if not action.option_strings or action.dest in ("help",):
                continue
            text = parser._get_formatter()._expand_help(action) if action.help else ""
            shown = parser.formatter_class(verb)._get_help_string(action) % vars(action) \
                if action.help else ""
            assert text, f"{verb} {action.option_strings} has no help"
            assert "default" in shown or action.required, \
                f"{verb} {action.option_strings}: help does not show the default"


def test_finetune_help_lists_every_setting(capsys) -> None:
    from data2vec.finetune.loop import FinetuneConfig

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(FinetuneConfig):
        assert re.search(rf"^  {field.name}=", text, re.M), field.name
    assert "lr=0.001" in text  # the asr task default, listed too


def test_readme_synopsis_has_every_verb_and_flag() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1]
    entries = re.split(r"^data2vec ", block, flags=re.M)[1:]
    synopsis = {}
    for entry in entries:
        words = entry.split()
        verb = " ".join(words[:2]) if words[0] == "prepare" else words[0]
        synopsis[verb] = set(re.findall(r"--[a-z][a-z-]*", entry))
    verbs = _verbs()
    assert set(synopsis) == set(verbs)
    for verb, parser in verbs.items():
        flags = {s for a in parser._actions for s in a.option_strings
                 if s.startswith("--") and s != "--help"}
        assert synopsis[verb] == flags, verb


def test_only_rank_zero_prints(monkeypatch, capsys) -> None:
    from data2vec.runtime import say

    monkeypatch.setenv("RANK", "1")
    say("summary")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    say("summary")
    assert capsys.readouterr().out == "summary\n"


@pytest.mark.parametrize(("load", "expected"), [(0.0, 2), (0.6, 1), (1.4, 1), (5.0, 1)])
def test_default_threads_leave_busy_cores_alone(monkeypatch, load: float,
                                                 expected: int) -> None:
    import os

    from data2vec import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert runtime.default_threads() == expected


def test_an_imported_base_model_and_task_model_share_the_run_layout(tmp_path: Path) -> None:
    import torch
    import transformers

    from data2vec.interop.hf import import_hf

    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, image_size=16, patch_size=4, use_mean_pooling=True)
    torch.manual_seed(0)
    transformers.Data2VecVisionModel(transformers.Data2VecVisionConfig(**config)) \
        .save_pretrained(tmp_path / "base")
    task = transformers.Data2VecVisionForImageClassification(
        transformers.Data2VecVisionConfig(**config, num_labels=3))
    task.save_pretrained(tmp_path / "task")
    layouts = []
    for name in ("base", "task"):
        checkpoint, _ = import_hf(tmp_path / name, tmp_path / f"run-{name}")
        run = tmp_path / f"run-{name}"
        assert checkpoint == run / "checkpoints" / "step-0000000"
        layouts.append(sorted(p.relative_to(run).as_posix() for p in run.rglob("*")))
    assert layouts[0] == layouts[1]
    assert "config.yaml" in layouts[0] and "checkpoints/latest" in layouts[0]
