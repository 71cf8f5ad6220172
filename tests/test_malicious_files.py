"""No code from a file, ever: every loader of user or external files refuses a file that carries
code *before* any of it runs. Each malicious file creates a sentinel file when its payload runs;
the tests prove the sentinel never appears.

Kinds: a raw pickle with ``__reduce__``, torch's legacy (non-zip) format, the legacy tar format,
the zip format, and a TorchScript archive whose ``__setstate__`` creates a file (``torch.load``
hands such an archive to ``torch.jit.load``, which runs it).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from data2vec.cli import main
from data2vec.errors import CheckpointError
from data2vec.interop.safe_unpickle import load_checkpoint_file
from data2vec.train.checkpoint import load_state


class _Payload:
    """Unpickling this calls ``open(sentinel, "w")``: the file appears iff the payload ran."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return open, (self.sentinel, "w")


class _ScriptedPayload(torch.nn.Module):
    """TorchScript module whose ``__setstate__`` (run by torch.jit.load) creates a file."""

    def __init__(self, sentinel: str) -> None:
        super().__init__()
        self.sentinel = sentinel
        self.w = torch.zeros(1)

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.sentinel, self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.sentinel = state[0]
        self.w = torch.from_file(state[0], shared=True, size=4)  # creates the file
        self.training = state[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w


def _raw(path: Path, sentinel: Path) -> None:
    path.write_bytes(pickle.dumps({"model": _Payload(sentinel)}))


def _legacy(path: Path, sentinel: Path) -> None:
    torch.save({"model": _Payload(sentinel)}, path, _use_new_zipfile_serialization=False)


def _tar(path: Path, sentinel: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("sys_info", pickle.dumps({})),
                           ("storages", pickle.dumps(_Payload(sentinel)))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _zip(path: Path, sentinel: Path) -> None:
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Payload(sentinel)}, path)


def _torchscript(path: Path, sentinel: Path) -> None:
    torch.jit.script(_ScriptedPayload(str(sentinel))).save(str(path))


KINDS: dict[str, Callable[[Path, Path], None]] = {
    "raw-pickle": _raw, "legacy": _legacy, "legacy-tar": _tar, "zip": _zip,
    "torchscript": _torchscript}


@pytest.fixture(scope="module")
def scripted_payload_runs(tmp_path_factory: pytest.TempPathFactory) -> bool:
    """The TorchScript payload is real: torch.load of it creates the sentinel."""
    tmp = tmp_path_factory.mktemp("proof")
    _torchscript(tmp / "ts.pt", tmp / "sentinel")
    with pytest.warns(UserWarning, match="TorchScript"):
        torch.load(tmp / "ts.pt", weights_only=False)
    return (tmp / "sentinel").exists()


def test_the_payloads_run_when_loaded_naively(tmp_path: Path, scripted_payload_runs: bool
                                              ) -> None:
    assert scripted_payload_runs
    for kind in ("raw-pickle", "legacy", "zip"):
        sentinel = tmp_path / f"{kind}.sentinel"
        KINDS[kind](tmp_path / f"{kind}.pt", sentinel)
        if kind == "raw-pickle":
            pickle.loads((tmp_path / f"{kind}.pt").read_bytes())
        else:
            torch.load(tmp_path / f"{kind}.pt", weights_only=False)
        assert sentinel.exists(), kind


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fairseq_and_bin_reader_refuses_before_running(kind: str, tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel"
    KINDS[kind](tmp_path / "x.pt", sentinel)
    with pytest.raises(CheckpointError, match="x.pt"):
        load_checkpoint_file(tmp_path / "x.pt")
    assert not sentinel.exists()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_checkpoint_state_reader_refuses_before_running(kind: str, tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel"
    KINDS[kind](tmp_path / "state.pt", sentinel)
    with pytest.raises(CheckpointError, match="state.pt"):
        load_state(tmp_path)
    assert not sentinel.exists()


def _checkpoint_dir(ckpt: Path, kind: str, sentinel: Path) -> Path:
    """A checkpoint directory whose state.pt is malicious (weights are a valid empty file)."""
    ckpt.mkdir(parents=True)
    save_file({}, ckpt / "model.safetensors")
    KINDS[kind](ckpt / "state.pt", sentinel)
    return ckpt


def _hf_dir(directory: Path, kind: str, sentinel: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    transformers.Data2VecTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, vocab_size=50, type_vocab_size=1
                                    ).save_pretrained(directory)
    KINDS[kind](directory / "pytorch_model.bin", sentinel)
    return directory


def _command(loader: str, tmp: Path, kind: str, sentinel: Path) -> list[str]:
    out = str(tmp / "out")
    if loader == "import-fairseq":
        KINDS[kind](tmp / "model.pt", sentinel)
        return ["import", "--from", "fairseq", str(tmp / "model.pt"), "--out", out]
    if loader == "import-hf":
        return ["import", "--from", "hf", str(_hf_dir(tmp / "hf", kind, sentinel)), "--out", out]
    if loader == "resume":
        _checkpoint_dir(tmp / "run" / "checkpoints" / "step-0000001", kind, sentinel)
        return ["pretrain", "--modality", "text", "--out", str(tmp / "run"), "--resume",
                "run.progress=false", "run.tensorboard=false"]
    ckpt = str(_checkpoint_dir(tmp / "ckpt", kind, sentinel))
    if loader == "pretrain-init":
        return ["pretrain", "--modality", "text", "--init", ckpt, "--out", out]
    if loader == "finetune-init":
        return ["finetune", "--task", "text-cls", "--init", ckpt, "--out", out]
    return ["export", "--to", "hf", ckpt, out]


LOADERS = ["import-fairseq", "import-hf", "pretrain-init", "resume", "finetune-init", "export"]


@pytest.mark.parametrize("kind", ["zip", "torchscript"])
@pytest.mark.parametrize("loader", LOADERS)
def test_every_command_that_reads_a_file_refuses_it_in_one_line(
        loader: str, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA2VEC_HOME", str(tmp_path / "home"))
    sentinel = tmp_path / "sentinel"
    argv = _command(loader, tmp_path, kind, sentinel)
    if loader == "resume":  # resume reads the demo corpus first; a tiny one is enough
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        (corpus / "a.txt").write_text("a few words of text to train a vocabulary on\n" * 50)
        argv += ["--data", str(corpus)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("data2vec: error:") and "\n" not in err, err
    assert not sentinel.exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert not (tmp_path / "out" / "checkpoints").exists()
