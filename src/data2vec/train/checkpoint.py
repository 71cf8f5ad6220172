"""Atomic, resumable checkpoints: weights as safetensors, the rest as a weights-only torch file.

Layout of one checkpoint directory ``RUN/checkpoints/step-000100/``::

    model.safetensors   student and EMA teacher weights (the model's state dict)
    state.pt            optimizer, step, RNG states, data position, config (torch.load weights_only)

It is written under a temporary name and renamed into place, so a killed run never leaves a
half-written checkpoint behind; ``RUN/checkpoints/latest`` names the newest complete one.
"""

from __future__ import annotations

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
    tmp.write_text(text)
    os.replace(tmp, path)


def write_checkpoint_dir(final: Path, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write one checkpoint directory (weights + state) under a temporary name, then rename it
    into place, so a killed process never leaves a half-written checkpoint."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, state: dict[str, Any],
                    keep_last: int = 0) -> Path:
    """Write checkpoint `step` atomically; keep only the newest `keep_last` (0 = all)."""
    final = write_checkpoint_dir(ckpt_root / f"step-{step:07d}", model, state)
    _write_atomic(ckpt_root / "latest", final.name + "\n")
    if keep_last > 0:
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and (p / STATE).exists())


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        candidate = ckpt_root / pointer.read_text().strip()
        if (candidate / STATE).exists():
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
