"""``data2vec extract MODEL INPUTS --layer N|all --out DIR``: layer-wise features to disk.

Inputs are audio files, images, or text files whose every non-empty line is one input (folders
are searched recursively for the modality's files). Items are read as the model reads them (see
:meth:`data2vec.loading.LoadedModel.read_input`), batched by similar length and padded; a padded
item's features equal the item run alone (see ``LoadedModel.hidden_states``).

Output directory::

    DIR/extract.json        model, modality, version, layers, width, item count, format
    DIR/index.jsonl         one line per input, in input order: {"index", "input", "file",
                            "key" (safetensors), "shape": [layers, positions, width]}
    DIR/000000.npy …        --format npy: one float32 array (layers, positions, width) per input
    DIR/features-00000.safetensors …   --format safetensors: one file per batch, one tensor per
                            input named by its 6-digit index

Example::

    data2vec extract runs/speech-v1-tiny clips/ --layer all --out feats
    np.load("feats/000000.npy").shape      # (depth + 1, frames, D)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from data2vec.errors import DataError
from data2vec.loading import Layers, LoadedModel
from data2vec.runtime import honour_umask

Format = Literal["npy", "safetensors"]


@dataclass
class Item:
    """One input: its display name (path, or path:line for text) and the raw value to read."""

    name: str
    value: Any


def _files(paths: Sequence[str | Path], extensions: set[str]) -> Iterator[Path]:
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                raise DataError(f"{path}: no files with extension {sorted(extensions)}")
            yield from found
        elif path.is_file():
            yield path
        else:
            raise DataError(f"input not found: {path}")


def collect_inputs(modality: str, paths: Sequence[str | Path]) -> list[Item]:
    """Every input named by `paths` (files or folders), in order."""
    if modality == "text":
        items = []
        for file in _files(paths, {".txt"}):
            try:
                lines = file.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise DataError(f"{file}: not UTF-8 text ({e})") from None
            items += [Item(f"{file}:{n}", line) for n, line in enumerate(lines, start=1)
                      if line.strip()]
    else:
        if modality == "speech":
            import soundfile

            extensions = {"." + f.lower() for f in soundfile.available_formats()}
        else:
            from data2vec.data.images import image_extensions

            extensions = set(image_extensions())
        items = [Item(str(f), f) for f in _files(paths, extensions)]
    if not items:
        raise DataError(f"no inputs in {', '.join(map(str, paths))}")
    return items


def _plan(model: LoadedModel, rows: list[torch.Tensor], batch_size: int) -> list[list[int]]:
    """Batches of item indices: similar lengths together (less padding). A speech front-end that
    normalises over time (group_norm) is not padding-safe, so it batches equal lengths only."""
    lengths = [int(r.shape[-1]) if r.dim() == 1 else 1 for r in rows]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    exact = model.modality == "speech" and model.cfg.model.frontend.extractor_mode == "group_norm"
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        if last is None or len(last) >= batch_size or (exact and lengths[last[0]] != lengths[i]):
            batches.append([i])
        else:
            last.append(i)
    return batches


def extract(model: LoadedModel, items: Sequence[Item], out_dir: str | Path,
            layers: Layers = "all", fmt: Format = "npy", batch_size: int = 8,
            progress: bool = True) -> Path:
    """Write the features of `items` at `layers` into `out_dir`; returns the index file."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = model.layer_indices(layers)
    rows = [model.read_input(item.value) for item in items]  # errors name the file first
    records: list[dict[str, Any] | None] = [None] * len(items)
    bar = tqdm(total=len(items), unit="item", desc="extract", disable=not progress,
               dynamic_ncols=True)
    try:
        for number, batch in enumerate(_plan(model, rows, batch_size)):
            source, padding = model.preprocess([rows[i] for i in batch])
            features = model.extract_features(source, wanted, padding)
            shard = f"features-{number:05d}.safetensors"
            tensors = {}
            for row, index in enumerate(batch):
                array = features.stacked(row).float().cpu()  # (layers, T, D)
                record = {"index": index, "input": items[index].name,
                          "shape": list(array.shape)}
                if fmt == "npy":
                    record["file"] = f"{index:06d}.npy"
                    np.save(out / record["file"], array.numpy())
                else:
                    record.update(file=shard, key=f"{index:06d}")
                    tensors[record["key"]] = array.contiguous()
                records[index] = record
            if tensors:
                save_file(tensors, out / shard)
                honour_umask(out / shard)  # safetensors writes 0600
            bar.update(len(batch))
    finally:
        bar.close()
    index_file = out / "index.jsonl"
    index_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = {"model": model.source, "modality": model.modality, "version": model.version,
            "task": model.task, "layers": wanted, "dim": int(model.frontend.dim),
            "count": len(items), "format": fmt,
            "layer_meaning": "0 = transformer input, i = output of block i"}
    (out / "extract.json").write_text(json.dumps(meta, indent=2) + "\n")
    return index_file


def read_features(out_dir: str | Path) -> list[np.ndarray]:
    """Every item's (layers, positions, width) array from an extraction directory, in order."""
    from safetensors.numpy import load_file

    out = Path(out_dir)
    records = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    shards: dict[str, dict[str, np.ndarray]] = {}
    arrays = []
    for record in records:
        if record["file"].endswith(".npy"):
            arrays.append(np.load(out / record["file"]))
        else:
            if record["file"] not in shards:
                shards[record["file"]] = load_file(out / record["file"])
            arrays.append(shards[record["file"]][record["key"]])
    return arrays


__all__ = ["Item", "collect_inputs", "extract", "read_features"]
