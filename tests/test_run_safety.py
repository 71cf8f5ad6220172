"""Never lose or poison a run (issue 11): non-finite updates are caught before the optimizer,
checkpoints hold only finite weights, a run directory is locked and never silently overwritten,
SIGTERM / SIGINT / SIGKILL / a full disk / a divergence all leave a finite, resumable checkpoint.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data2vec.cli import main
from data2vec.data.demo import prepare_demo
from data2vec.train import checkpoint as ckpt
from data2vec.train.loop import Trainer, TrainingError
from test_train_loop import make_trainer

FAST = ["run.progress=false", "run.tensorboard=false", "run.log_every=1", "run.threads=1"]
IMAGE = ["pretrain", "--modality", "image", *FAST]


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    prepare_demo("image", home / "demo" / "image")
    return home


@pytest.fixture(autouse=True)
def _home(demo_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA2VEC_HOME", str(demo_home))


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("data2vec: error:")]
    assert len(lines) == 1, err
    return lines[0]


def assert_finite_and_loadable(checkpoint: Path) -> None:
    assert not ckpt.nonfinite_tensors(ckpt.load_weights(checkpoint))
    assert not ckpt.nonfinite_tensors(ckpt.load_state(checkpoint))


def no_temporaries(run: Path) -> bool:
    root = run / "checkpoints"
    return not root.is_dir() or not [p for p in root.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ non-finite loss or gradient


def test_nonfinite_gradient_is_caught_before_the_optimizer_applies_it(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    stream = iter(trainer.batches)
    assert not trainer.train_step([next(stream)]).skipped and trainer.step == 1
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}  # teacher too
    moments = copy.deepcopy(trainer.optimizer.state_dict()["state"])
    param = next(p for n, p in trainer.model.named_parameters() if n.startswith("encoder."))
    handle = param.register_hook(lambda grad: grad * float("nan"))
    result = trainer.train_step([next(stream)])
    handle.remove()
    assert result.skipped and math.isfinite(result.loss) and not math.isfinite(result.grad_norm)
    assert trainer.step == 1  # the step counter stays, the batch is consumed
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    after = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(after[i]["exp_avg"], moments[i]["exp_avg"]) for i in moments)
    assert all(p.grad is None for p in trainer.model.parameters())
    assert not trainer.train_step([next(stream)]).skipped and trainer.step == 2


def test_skip_mode_counts_skips_and_keeps_training(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=4)
    original, poisoned = trainer.model.forward, {"left": 2}

    def forward(batch):
        out = original(batch)
        if trainer.step == 2 and poisoned["left"]:
            poisoned["left"] -= 1
            out.loss_sum = out.loss_sum * float("inf")
        return out

    trainer.model.forward = forward
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["skipped_nonfinite_updates"] == 2 and trainer.nonfinite_skips == 2
    final = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert_finite_and_loadable(final)
    assert ckpt.load_state(final)["nonfinite_skips"] == 2


def test_stop_mode_saves_the_last_finite_update_and_prunes_nothing(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=8, nonfinite="stop")
    trainer.cfg.run.checkpoint_every, trainer.cfg.run.keep_last = 2, 1
    original, good = trainer.model.forward, {}

    def forward(batch):
        out = original(batch)
        if trainer.step == 3:
            good.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
            out.loss_sum = out.loss_sum * float("nan")
        return out

    trainer.model.forward = forward
    with pytest.raises(TrainingError, match=r"non-finite loss at step 4 \(run.nonfinite=stop\)"):
        trainer.run()
    kept = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert kept == ["step-0000002", "step-0000003"]  # keep_last=1 pruned nothing for the stop
    saved = ckpt.load_weights(tmp_path / "checkpoints" / "step-0000003")
    assert all(torch.equal(saved[k], v) for k, v in good.items())


def test_a_checkpoint_is_never_written_from_nonfinite_weights(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.run()
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("nan")
    trainer.step = 4
    with pytest.raises(TrainingError, match=r"non-finite values in .*newest finite checkpoint "
                                            r"is .*step-0000003"):
        trainer.save()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-0000003"]
    assert no_temporaries(tmp_path)


def test_a_diverged_run_leaves_finite_checkpoints_and_resumes(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    args = [*IMAGE, "--out", str(run), "--max-steps", "20", "run.keep_last=1"]
    assert main([*args, "run.stop_at=2"]) == 0
    # the learning rate explodes: update 3 blows the weights up, update 4's loss is not finite
    assert main([*args, "--resume", "optim.lr=1e6"]) == 2
    line = error_line(capsys)
    stop, before = run / "checkpoints" / "step-0000003", run / "checkpoints" / "step-0000002"
    assert "non-finite loss at step 4" in line and str(stop) in line and str(before) in line
    kept = ckpt.list_checkpoints(run / "checkpoints")
    assert kept == [before, stop]  # keep_last=1, yet the stop pruned nothing
    for checkpoint in kept:
        assert_finite_and_loadable(checkpoint)
    assert main([*args, "--resume", "optim.lr=1e-4", "run.stop_at=4"]) == 2  # still diverging
    capsys.readouterr()
    shutil.rmtree(stop)  # as the message says: continue from the checkpoint before it
    assert main([*args, "--resume", "optim.lr=1e-4", "run.stop_at=4"]) == 0
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in losses(run).values())


# --------------------------------------------------------------------------------- full disk


def test_full_disk_is_one_line_and_the_previous_checkpoint_stays_loadable(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = ckpt.save_file, []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) < 2:
            return real(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(b"half a tensor")  # the disk fills up mid-file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(ckpt, "save_file", save_file)
    run = tmp_path / "run"
    args = [*IMAGE, "--out", str(run), "--max-steps", "4", "run.checkpoint_every=2"]
    assert main(args) == 2
    line = error_line(capsys)
    assert "step-0000004" in line and "no space left" in line and "step-0000002" in line
    assert ckpt.latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step-0000002"
    assert_finite_and_loadable(run / "checkpoints" / "step-0000002")
    assert no_temporaries(run) and not (run / ".lock").exists()
    monkeypatch.setattr(ckpt, "save_file", real)  # space freed: the run continues
    assert main([*args, "--resume"]) == 0
    assert sorted(losses(run)) == [1, 2, 3, 4]


# ------------------------------------------------------------------------ the run directory


def test_a_run_is_never_overwritten_without_resume_or_overwrite(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    args = [*IMAGE, "--out", str(run), "--max-steps", "2"]
    assert main(args) == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert main(args) == 2
    line = error_line(capsys)
    assert str(run) in line and "--resume" in line and "--overwrite" in line
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert main([*args, "--resume", "--overwrite"]) == 2
    assert "contradict" in error_line(capsys)
    assert main([*args, "--overwrite", "--max-steps", "1"]) == 0
    assert sorted(losses(run)) == [1]  # metrics replaced, not appended to
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step-0000001"]


def test_a_live_lock_refuses_and_names_the_holder(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from data2vec.train.rundir import RunLock; "
         f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main([*IMAGE, "--out", str(run), "--max-steps", "1"]) == 2
        line = error_line(capsys)
        assert f"process {holder.pid}" in line and str(run / ".lock") in line
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (run / ".lock").exists()  # left by the killed holder: stale, taken over
    assert main([*IMAGE, "--out", str(run), "--max-steps", "1"]) == 0


# ------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_a_signal_finishes_the_update_and_writes_a_checkpoint(
        signum: int, code: int, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    original = Trainer.train_step

    def train_step(self: Trainer, micro_batches):
        if self.step == 2:
            os.kill(os.getpid(), signum)  # arrives during update 3
        return original(self, micro_batches)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    run = tmp_path / "run"
    # as in a terminal, also when the tests run as a background job (SIGINT ignored there)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main([*IMAGE, "--out", str(run), "--max-steps", "50"]) == code
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, outer)
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert f"stopped by {name} after step 3" in err and "--resume" in err
    assert f"checkpoint {run / 'checkpoints' / 'step-0000003'}" in err
    assert_finite_and_loadable(run / "checkpoints" / "step-0000003")


def test_an_ignored_sigint_stays_ignored_and_sigterm_is_still_caught(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with trainer._signals_handled():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == trainer._on_signal
            os.kill(os.getpid(), signal.SIGINT)  # ignored: no stop requested
            assert trainer.signal_received is None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)


def _spawn(args: list[str], home: Path) -> subprocess.Popen:
    env = {**os.environ, "DATA2VEC_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "data2vec.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc: subprocess.Popen, run: Path, steps: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run}: fewer than {steps} steps after {timeout} s")


def test_sigterm_to_a_real_run_then_resume_equals_an_uninterrupted_run(
        tmp_path: Path, demo_home: Path) -> None:
    cut, full = tmp_path / "cut", tmp_path / "full"
    args = [*IMAGE, "--max-steps", "200", "run.checkpoint_every=1000"]
    proc = _spawn([*args, "--out", str(cut)], demo_home)
    _wait_for_steps(proc, cut, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    stopped = max(losses(cut))
    assert stopped >= 2
    where = cut / "checkpoints" / f"step-{stopped:07d}"
    assert f"stopped by SIGTERM after step {stopped}: checkpoint {where}" in err
    assert f"--out {cut} --resume" in err
    end = stopped + 2
    assert main([*args, "--out", str(cut), "--resume", f"run.stop_at={end}"]) == 0
    assert main([*args, "--out", str(full), f"run.stop_at={end}"]) == 0
    a, b = losses(full), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, end + 1))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, step


def test_sigkill_leaves_a_resumable_run(tmp_path: Path, demo_home: Path) -> None:
    run = tmp_path / "run"
    args = [*IMAGE, "--out", str(run), "--max-steps", "200", "run.checkpoint_every=2"]
    proc = _spawn(args, demo_home)
    _wait_for_steps(proc, run, 3)
    proc.kill()
    proc.communicate(timeout=60)
    assert (run / ".lock").exists()  # a dead holder's lock
    leaked = run / "checkpoints" / ".step-0000099.x1y2z3"  # as if killed while writing
    leaked.mkdir()
    (leaked / ckpt.WEIGHTS).write_bytes(b"partial")
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 99, "lo')  # a line cut short by the kill
    newest = ckpt.latest_checkpoint(run / "checkpoints")
    assert_finite_and_loadable(newest)
    step = int(newest.name.removeprefix("step-"))
    assert main([*args, "--resume", f"run.stop_at={step + 1}"]) == 0
    assert not leaked.exists() and not (run / ".lock").exists()
    assert sorted(losses(run)) == list(range(1, step + 2))
