"""The malformed-input corpus (tests/data/make_bad.py) through the real command line: each case
exits with its code, says what is wrong in one line naming the file or config key, prints no
traceback, and writes nothing half-way: its inputs are untouched, no temporary or lock file is
left, every checkpoint written is complete and finite, and a command that fails before its run
starts creates nothing at all."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from data2vec.cli import main
from data2vec.train import checkpoint as ckpt

_spec = importlib.util.spec_from_file_location(
    "make_bad", Path(__file__).with_name("data") / "make_bad.py")
make_bad = importlib.util.module_from_spec(_spec)
sys.modules["make_bad"] = make_bad  # dataclasses look their module up there
_spec.loader.exec_module(make_bad)

NAMES = sorted(make_bad.BUILDERS)


def test_the_corpus_covers_every_kind_of_input() -> None:
    kinds = Counter(kind for kind, _ in make_bad.BUILDERS.values())
    assert len(NAMES) >= 40
    assert set(kinds) == {"audio", "manifest", "image", "text", "config", "checkpoint",
                          "interop"}
    assert min(kinds.values()) >= 5, kinds


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("bad")
    return root, make_bad.Shared(root / "_shared")


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _check_written(directory: Path, new: set[str]) -> None:
    """What a command created is whole: no dot-files (temporaries, locks), every checkpoint
    complete, loadable and finite."""
    hidden = [n for n in new if any(part.startswith(".") for part in n.split("/"))]
    assert not hidden, hidden
    for state in [directory / n for n in new if n.endswith(ckpt.STATE)]:
        folder = state.parent
        assert (folder / ckpt.WEIGHTS).is_file(), folder
        assert not ckpt.nonfinite_tensors(ckpt.load_weights(folder)), folder
        assert not ckpt.nonfinite_tensors(ckpt.load_state(folder)), folder


@pytest.mark.parametrize("name", NAMES)
def test_malformed_input(name: str, corpus: tuple[Path, object], capsys: pytest.CaptureFixture,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    root, shared = corpus
    monkeypatch.setenv("DATA2VEC_HOME", str(root / "_home"))  # never the user's demo cache
    case = make_bad.build_case(name, root, shared)
    directory = root / name
    shared_before = _snapshot(shared.root) if shared.root.exists() else {}
    before = _snapshot(directory)
    capsys.readouterr()
    code = main(case.argv)
    err = capsys.readouterr().err
    assert code == case.code, err[-3000:]
    assert "Traceback" not in err, err
    if case.code:
        lines = [line for line in err.splitlines() if line.startswith("data2vec: error:")]
        assert len(lines) == 1, err
        message = lines[0]
    else:
        message = err
    for expected in case.expect:
        assert expected in message, f"{expected!r} not in {message!r}"
    after = _snapshot(directory)
    changed = [n for n, digest in before.items() if after.get(n) != digest]
    assert not changed, f"inputs changed: {changed}"
    new = set(after) - set(before)
    if not case.new_files:
        assert not new, f"created {sorted(new)}"
    _check_written(directory, new)
    assert (_snapshot(shared.root) if shared.root.exists() else {}) == shared_before
    if case.metrics:
        records = (directory / "out" / "metrics.jsonl").read_text().splitlines()
        last = json.loads(records[-1])
        for key, value in case.metrics.items():
            assert last.get(key) == value, (key, last)


def test_skipped_text_never_reaches_the_tokenizer(corpus: tuple[Path, object],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--skip-bad: the BPE is trained without the skipped file, and retrained once it is fixed."""
    root, shared = corpus
    monkeypatch.setenv("DATA2VEC_HOME", str(root / "_home"))
    name = "text_skip_bad_keeps_the_file_out_of_the_tokenizer"
    case = make_bad.build_case(name, root / "tokenizer", shared)
    assert main(case.argv) == 0
    tokenizer = root / "tokenizer" / name / "corpus" / "tokenizer"
    record = json.loads((tokenizer / "corpus.json").read_text())
    assert [Path(p).name for p in record["used"]] == ["a.txt"]
    vocab = json.loads((tokenizer / "vocab.json").read_text())
    assert not [t for t in vocab if "zqx" in t]  # the skipped file's only word
    bad = root / "tokenizer" / name / "corpus" / "latin1.txt"
    bad.write_text(("zqxjvw " * 40 + "\n") * 20, encoding="utf-8")  # fixed: corpus text now
    assert main([*case.argv[:case.argv.index("--out") + 1], str(bad.parent.parent / "out2"),
                 *case.argv[case.argv.index("--out") + 2:]]) == 0
    record = json.loads((tokenizer / "corpus.json").read_text())
    assert sorted(Path(p).name for p in record["used"]) == ["a.txt", "latin1.txt"]
    assert [t for t in json.loads((tokenizer / "vocab.json").read_text()) if "zqx" in t]
