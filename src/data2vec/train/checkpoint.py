"""Atomic, resumable checkpoints: weights as safetensors, the rest as a weights-only torch file.

Layout of one checkpoint directory ``RUN/checkpoints/step-000100/``::

    model.safetensors   student and EMA teacher weights (the model's state dict)
    state.pt            optimizer, step, RNG states, data position, config (torch.load weights_only)

It is written under a temporary name and renamed into place, so a killed run never leaves a
half-written checkpoint behind; ``RUN/checkpoints/latest`` names the newest complete one.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from data2vec.errors import CheckpointError
from data2vec.interop.safe_unpickle import refuse_code_archive
from data2vec.runtime import honour_umask

WEIGHTS = "model.safetensors"
STATE = "state.pt"


def rng_state() -> dict[str, Any]:
    """Every global RNG a training step may touch (dropout, layer-drop)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """Flush a written file (or a directory entry) to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the data is still written
        pass
    finally:
        os.close(fd)


def nonfinite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested dict / list holding NaN or infinity."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            return [prefix or "<tensor>"]
        return []
    if isinstance(tree, dict):
        items: Any = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return []
    return [name for key, value in items
            for name in nonfinite_tensors(value, f"{prefix}.{key}" if prefix else str(key))]


def _disk_message(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device (free some space, then --resume)"
    return error.strerror or str(error)


def write_checkpoint_dir(final: Path, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write one checkpoint directory (weights + state) under a temporary name, then rename it
    into place, so a killed process never leaves a half-written checkpoint.

    Refused (CheckpointError, nothing written) when a weight or a state tensor is NaN or
    infinite; a failed write (full disk, ...) removes the temporary directory and leaves every
    earlier checkpoint as it was.
    """
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = nonfinite_tensors(weights) + nonfinite_tensors(state, "state")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"refused to write {final}: non-finite values in "
                              f"{', '.join(bad[:3])}{more}")
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is not
        _save_weights(weights, tmp / WEIGHTS)
        _save_state(state, tmp / STATE)
        for name in (WEIGHTS, STATE):
            _fsync(tmp / name)
        honour_umask(tmp / WEIGHTS)  # safetensors writes 0600; a checkpoint is not private
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(final.parent)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {_disk_message(e)}; earlier "
                              "checkpoints are untouched") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(weights, path)
    except SafetensorError as e:  # the Rust writer reports I/O errors as its own type
        raise OSError(_errno_of(str(e)), str(e), str(path)) from None


def _save_state(state: dict[str, Any], path: Path) -> None:
    try:
        torch.save(state, path)
    except RuntimeError as e:  # torch's zip writer reports I/O errors as RuntimeError
        if "write" not in str(e).lower():
            raise
        raise OSError(_errno_of(str(e)), str(e).splitlines()[0], str(path)) from None


def _errno_of(message: str) -> int:
    lower = message.lower()
    return errno.ENOSPC if "no space" in lower or "file write failed" in lower else errno.EIO


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, state: dict[str, Any],
                    keep_last: int = 0) -> Path:
    """Write checkpoint `step` atomically; keep only the newest `keep_last` (0 = all).

    Pruning runs only after the new checkpoint is complete and never removes it, so the newest
    finite checkpoint always survives (non-finite weights are never written).
    """
    final = write_checkpoint_dir(ckpt_root / f"step-{step:07d}", model, state)
    try:
        _write_atomic(ckpt_root / "latest", final.name + "\n")
    except OSError as e:  # the checkpoint itself is complete; 'latest' falls back to the listing
        raise CheckpointError(f"wrote {final} but not {ckpt_root / 'latest'}: "
                              f"{_disk_message(e)}") from None
    if keep_last > 0:
        others = [p for p in list_checkpoints(ckpt_root) if p != final]
        for old in others[:max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def clean_temporary(ckpt_root: Path) -> list[Path]:
    """Remove what an interrupted writer left behind (``.step-*`` folders, ``.latest.tmp``).

    Call only while holding the run directory's lock: another writer's temporaries look alike.
    """
    if not ckpt_root.is_dir():
        return []
    leaked = [p for p in ckpt_root.iterdir() if p.name.startswith((".step-", ".latest"))]
    for path in leaked:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leaked


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step-*")
                  if p.is_dir() and (p / STATE).is_file() and (p / WEIGHTS).is_file())


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        candidate = ckpt_root / name
        if name.startswith("step-") and "/" not in name and (candidate / STATE).is_file() \
                and (candidate / WEIGHTS).is_file():
            return candidate
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def find_checkpoint(path: Path) -> Path:
    """Accept a run dir, its checkpoints dir or one checkpoint dir; return the checkpoint dir."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / WEIGHTS).is_file():
            return candidate
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    raise CheckpointError(f"no checkpoint found at {path} (expected {WEIGHTS} and {STATE})")


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in a checkpoint; a truncated or corrupt file is named in the error."""
    path = Path(ckpt) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} (truncated or corrupt?): {e}") from None


def load_state(ckpt: Path) -> dict[str, Any]:
    """Training state of a checkpoint, read with ``weights_only=True`` (no code execution)."""
    path = Path(ckpt) / STATE
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        with open(path, "rb") as handle:
            refuse_code_archive(handle, path)  # TorchScript: refused with a clear message
            return torch.load(handle, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler met a global
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"global '{found.group(1)}'" if found else "an object that is not plain data"
        raise CheckpointError(f"{path}: refused to unpickle {what} (a checkpoint state holds "
                              "only tensors and plain values); nothing of it was run") from None
    except Exception as e:  # torch raises several types for truncated zip archives
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path} (truncated or corrupt?): {first_line}"
                              ) from None


def check_keys(converted: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
               source: str) -> None:
    """Every expected key present with its shape, nothing extra; the error lists the culprits."""
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = sorted(k for k in set(expected) & set(converted)
                   if tuple(expected[k].shape) != tuple(converted[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: {tuple(converted[k].shape)} vs expected {tuple(expected[k].shape)}"
                for k in wrong))
        raise CheckpointError(f"{source}: " + "; ".join(parts))


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor],
                       source: str = "checkpoint") -> None:
    """Strict load that lists missing and unexpected keys in the error."""
    check_keys(weights, model.state_dict(), f"{source} does not fit the model")
    model.load_state_dict(weights)


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any, source: str) -> None:
    """A saved optimizer state must fit `optimizer` (groups, sizes, moment shapes) before it is
    loaded: torch would accept some mismatches and fail only at the next step."""
    groups = optimizer.param_groups
    saved_groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(saved_groups, list) or not isinstance(saved.get("state"), dict):
        raise CheckpointError(f"{source}: the optimizer state is not an optimizer state dict")
    have = [len(g.get("params", [])) for g in saved_groups]
    want = [len(g["params"]) for g in groups]
    if have != want:
        raise CheckpointError(f"{source}: optimizer state has parameter groups of sizes {have}, "
                              f"this model needs {want} (another architecture?)")
    for group, saved_group in zip(groups, saved_groups, strict=True):
        for param, ident in zip(group["params"], saved_group["params"], strict=True):
            for name, value in saved["state"].get(ident, {}).items():
                if (isinstance(value, torch.Tensor) and value.dim() > 0
                        and tuple(value.shape) != tuple(param.shape)):
                    raise CheckpointError(
                        f"{source}: optimizer state '{name}' of parameter {ident} has shape "
                        f"{tuple(value.shape)}, the model's parameter {tuple(param.shape)}")
