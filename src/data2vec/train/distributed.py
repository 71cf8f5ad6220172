"""torchrun / DDP setup: gloo on CPU, NCCL on GPU. The only module that talks to
``torch.distributed``; model code never does."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from data2vec.errors import ConfigError


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(choice: str) -> torch.device:
    """'auto' = CUDA when available, else CPU; 'cpu', 'cuda' (or 'cuda:N') and 'mps' are taken
    as asked, and one that this machine lacks is a one-line :class:`ConfigError`."""
    kind = choice.split(":")[0]
    if kind not in DEVICES:
        raise ConfigError(f"device {choice!r} is not one of {', '.join(DEVICES)}")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CUDA build" if torch.backends.cuda.is_built() else "a CPU-only build"
        raise ConfigError(f"device {choice!r} is not available: torch {torch.__version__} is "
                          f"{build} and sees no CUDA GPU (use --device cpu or auto)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {choice!r} is not available: no Apple Metal (MPS) device in "
                          "this torch build or machine (use --device cpu or auto)")
    return torch.device(choice)


def init_distributed(device_choice: str = "auto") -> DistInfo:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (or run alone)."""
    device = pick_device(device_choice)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused: bool = False) -> nn.Module:
    """DDP over the student; the teacher's parameters do not require grad and are not reduced."""
    if info.world_size == 1:
        return model
    ids = [info.local_rank] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                               find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity when running alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True when `flag` is set on any rank (a collective: every rank must call it)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    return bool(all_reduce_sum(torch.tensor(float(flag), device=device)).item() > 0)


def barrier() -> None:
    """Wait for every rank (no-op alone)."""
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------ FSDP2 (sharded) state
def is_sharded(model: nn.Module) -> bool:
    """True when `model`'s parameters are FSDP2 shards (DTensors)."""
    return any(hasattr(p, "to_local") for p in model.parameters())


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's whole state dict on CPU (a collective: every rank calls it; rank 0 gets
    the tensors, the others an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A sharded run's optimizer state dict in torch's plain layout (parameters numbered in
    group order, as ``optimizer.state_dict()`` numbers them), so any run can resume it; a
    collective like :func:`full_model_state`."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not named:
        return {}
    number: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        for name in group["params"]:
            number[name] = len(number)
        groups.append({**group, "params": [number[n] for n in group["params"]]})
    return {"state": {number[n]: v for n, v in named["state"].items()}, "param_groups": groups}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                    weights: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Load whole (unsharded) weights and a plain optimizer state dict into a sharded model and
    its optimizer: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, weights, options=_full_options())
    names = [n for g in optimizer.param_groups for n in g["names"]]
    groups = [{**g, "params": [names[i] for i in g["params"]]}
              for g in optimizer_state["param_groups"]]
    state = {names[i]: v for i, v in optimizer_state["state"].items()}
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=_full_options())
