"""Read fairseq / BEiT ``.pt`` checkpoints without executing code from the file.

A checkpoint written by ``torch.save`` is a pickle, and unpickling can call any importable
function. Released fairseq checkpoints also carry OmegaConf ``DictConfig`` objects and argparse
``Namespace``s, which ``torch.load(weights_only=True)`` refuses. :func:`load_checkpoint_file`
therefore runs ``torch.load`` with a restricted unpickler that admits only:

- torch's tensor rebuild functions (``torch._utils._rebuild_*``) and storage types,
- plain containers (``collections.OrderedDict``, ``builtins.set`` …),
- inert stand-ins for the classes of ``omegaconf``, ``argparse``, ``fairseq``, ``enum``,
  ``typing`` and ``numpy``: a stand-in records the arguments and state it is given and runs no code
  (converted back to plain dicts / lists / values by :func:`plain`).

Any other global (``os.system``, ``builtins.eval`` …) stops the load with a
:class:`~data2vec.errors.CheckpointError` naming it.

A zip archive is inspected *before* ``torch.load`` sees it, with torch's own zip reader: it may
hold only what ``torch.save`` writes (``data.pkl``, ``data/<n>``, version records). ``torch.load``
hands a TorchScript archive (``code/``, ``constants.pkl``) to ``torch.jit.load``, which runs the
archive's code (its ``__setstate__``) before any unpickler is involved, so such an archive, or
any zip with another record, is refused unread.
"""

from __future__ import annotations

import collections
import pickle
import re
import types
from pathlib import Path
from typing import Any, BinaryIO

import torch

from data2vec.errors import CheckpointError

# Modules whose classes become inert stand-ins (their values are configs and bookkeeping).
STAND_IN_PREFIXES = ("omegaconf", "argparse", "fairseq", "examples", "enum", "typing", "numpy",
                     "pathlib", "data2vec_vision", "beit")

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("torch", "Size"): torch.Size,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "device"): torch.device,
}
ALLOWED_GLOBALS.update({("torch", str(dt).removeprefix("torch.")): dt for dt in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)})


class StandIn:
    """An inert placeholder for a class of a config library: keeps args and state, runs nothing."""

    module = ""
    name = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.module}.{self.name} stand-in>"


_stand_ins: dict[tuple[str, str], type[StandIn]] = {}


def stand_in(module: str, name: str) -> type[StandIn]:
    """The stand-in class for ``module.name`` (one per name, so isinstance checks work)."""
    key = (module, name)
    if key not in _stand_ins:
        _stand_ins[key] = type(name, (StandIn,), {"module": module, "name": name})
    return _stand_ins[key]


def _reconstructor(cls: type, base: type, state: Any = None) -> Any:
    """copyreg._reconstructor for stand-ins only (protocol 0/1 pickles)."""
    if not (isinstance(cls, type) and issubclass(cls, StandIn)):
        raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r} is not allowed")
    obj = cls()
    if state is not None:
        obj.__setstate__(state)
    return obj


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose ``find_class`` admits only the allow-list above."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstructor
        if module.split(".")[0] in STAND_IN_PREFIXES:
            return stand_in(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a checkpoint")


# torch.load(pickle_module=...) takes a module-like object with Unpickler and load.
_PICKLE_MODULE = types.SimpleNamespace(
    Unpickler=RestrictedUnpickler,
    load=lambda f, **kw: RestrictedUnpickler(f, **kw).load(),
    __name__="data2vec_restricted_pickle",
)


# The records torch.save writes into its zip format (names as torch's reader gives them, without
# the archive's top-level folder).
_DATA_RECORD = re.compile(r"data\.pkl|byteorder|version|\.format_version|\.storage_alignment"
                          r"|\.data/version|\.data/serialization_id|data/\d+")


def check_archive_records(records: list[str], path: Path) -> None:
    """Refuse a zip whose records are not all of those a ``torch.save`` data archive holds."""
    foreign = sorted(r for r in records if not _DATA_RECORD.fullmatch(r))
    if foreign:
        kind = ("a TorchScript archive, which carries code"
                if any(r == "constants.pkl" or r.startswith("code/") for r in foreign)
                else "an archive with records torch.save does not write")
        raise CheckpointError(f"{path}: {kind} ({', '.join(foreign[:3])}); refused without "
                              "loading anything from it")
    if "data.pkl" not in records:
        raise CheckpointError(f"{path}: a zip archive without data.pkl, not a torch.save file")


def refuse_code_archive(handle: BinaryIO, path: Path) -> None:
    """If `handle` is a zip, check its records (as torch's own reader lists them) before any
    loader sees it; the position of `handle` is left where it was."""
    start = handle.tell()
    try:
        if torch.serialization._is_zipfile(handle):
            handle.seek(start)
            check_archive_records(list(torch._C.PyTorchFileReader(handle).get_all_records()),
                                  path)
    finally:
        handle.seek(start)


def load_checkpoint_file(path: str | Path) -> Any:
    """``torch.load`` of `path` on CPU through :class:`RestrictedUnpickler` (no code execution).

    The file is opened once: the records checked are the records loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    try:
        with open(path, "rb") as handle:
            refuse_code_archive(handle, path)
            return torch.load(handle, map_location="cpu", pickle_module=_PICKLE_MODULE,
                              weights_only=False)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to unpickle: {e}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} (truncated or not a torch file?): {e}") from None


def plain(obj: Any) -> Any:
    """Stand-ins turned back into plain Python: DictConfig/Namespace -> dict, ListConfig -> list,
    OmegaConf value nodes -> their value, enums -> their value; containers recursively."""
    if isinstance(obj, StandIn):
        state = obj.state
        if isinstance(state, dict) and "_content" in state:  # omegaconf containers and nodes
            return plain(state["_content"])
        if isinstance(state, dict) and "_val" in state:  # omegaconf value nodes
            return plain(state["_val"])
        if obj.name == "Namespace" and isinstance(state, dict):
            return {k: plain(v) for k, v in state.items()}
        if obj.args:  # an enum member pickled as EnumClass(value)
            return plain(obj.args[0])
        return plain(state)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


__all__ = ["RestrictedUnpickler", "StandIn", "load_checkpoint_file", "plain",
           "refuse_code_archive"]
