"""One way to load any model: ``data2vec.load(path)`` -> :class:`LoadedModel`.

``path`` may be

- a run directory of ``data2vec pretrain`` / ``finetune`` / ``import`` (its newest checkpoint),
- one checkpoint directory (``model.safetensors`` + ``state.pt``),
- a HuggingFace data2vec directory, base or task model (or a hub id already in the local HF cache),
- a released fairseq data2vec 1.0 / 2.0 or BEiT ``.pt`` file (read without running its code),

pre-trained or fine-tuned, data2vec 1.0 or 2.0; of a joint multi-modal run
(``--modality speech,image,text``) the `modality` asked for: its front-end with the shared
transformer, as a single-modality model. The result is in eval mode and holds the network
(``Data2Vec`` / ``Data2VecV2`` with its EMA teacher, or a fine-tuned ``FineTuneModel``), its
:class:`~data2vec.config.Config`, and for a fine-tuned model the task settings and labels; for
text, the tokenizer found beside it.

Layers are numbered as HuggingFace's ``hidden_states``: 0 = the transformer's input (after the
post-LN input norm), i = the output of block i (1..depth), before any final norm. Features keep
every position the transformer sees: the CLS token of images (position 0), ``<s>``/``</s>`` of text.

Example::

    import data2vec
    model = data2vec.load("runs/speech-v1-tiny")
    features = model.extract_features(["a.wav", "b.wav"], layers=[4, 8])
    features.item(0)[8]       # (frames of a.wav, D): padding removed, equal to a.wav alone
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from data2vec.config import Config, config_from_dict, to_dict
from data2vec.errors import CheckpointError, DataError

Layers = int | str | Sequence[int]
"""'all', one layer index, or several (negative counts from the top: -1 = the last block)."""


@dataclass
class Features:
    """Hidden states of a batch: ``layers[i]`` (B, T, D) for each requested layer i, and the
    padding mask (B, T) True = padding (None: no row is padded)."""

    layers: dict[int, Tensor]
    padding_mask: Tensor | None

    def lengths(self) -> list[int]:
        """Real positions per row."""
        first = next(iter(self.layers.values()))
        if self.padding_mask is None:
            return [first.shape[1]] * first.shape[0]
        return (~self.padding_mask).sum(1).tolist()

    def item(self, index: int) -> dict[int, Tensor]:
        """Row `index` without its padding: layer -> (T_real, D)."""
        length = self.lengths()[index]
        return {layer: x[index, :length] for layer, x in self.layers.items()}

    def stacked(self, index: int) -> Tensor:
        """Row `index` without padding, the layers stacked: (num_layers, T_real, D)."""
        return torch.stack(list(self.item(index).values()))


class LoadedModel(nn.Module):
    """A model read by :func:`load`: the network in eval mode with what it needs to be used.

    ``network`` is ``Data2Vec`` / ``Data2VecV2`` (pre-trained: student, head and EMA teacher) or
    ``FineTuneModel`` (fine-tuned: front-end, transformer, task head). ``task`` is None for a
    pre-trained model; ``finetune`` holds a fine-tuned model's settings (a ``FinetuneConfig``),
    ``labels`` its label set (``{"vocab": Vocabulary}`` or ``{"classes": [...]}``).
    """

    def __init__(self, network: nn.Module, cfg: Config, *, source: str = "",
                 state: dict[str, Any] | None = None, finetune: Any = None,
                 labels: dict[str, Any] | None = None, tokenizer: Any = None) -> None:
        super().__init__()
        self.network = network.eval()
        self.cfg, self.source, self.finetune = cfg, source, finetune
        self.state = dict(state or {})
        self.labels = dict(labels or {})
        self.tokenizer = tokenizer
        self.eval()

    # ------------------------------------------------------------------------- what it is
    @property
    def task(self) -> str | None:
        """The fine-tuning task ('asr', 'image-cls', 'text-cls', 'audio-cls'); None: pre-trained."""
        return None if self.finetune is None else self.finetune.task

    @property
    def modality(self) -> str:
        return self.cfg.modality

    @property
    def version(self) -> int:
        return self.cfg.version

    @property
    def frontend(self) -> nn.Module:
        return self.network.frontend

    @property
    def encoder(self) -> nn.Module:
        return self.network.encoder

    @property
    def alibi(self) -> nn.Module | None:
        return getattr(self.network, "alibi", None)

    @property
    def depth(self) -> int:
        return len(self.encoder.blocks)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def layer_indices(self, layers: Layers = "all") -> list[int]:
        """Validated layer numbers (0..depth) for 'all', an int or a list of ints."""
        if isinstance(layers, str):
            if layers != "all":
                try:
                    layers = int(layers)
                except ValueError:
                    raise DataError(f"layers={layers!r}: expected 'all' or layer numbers "
                                    f"0..{self.depth}") from None
            else:
                return list(range(self.depth + 1))
        wanted = [layers] if isinstance(layers, int) else list(layers)
        out = []
        for layer in wanted:
            index = layer + self.depth + 1 if layer < 0 else layer
            if not 0 <= index <= self.depth:
                raise DataError(f"layer {layer} does not exist: this model has layers "
                                f"0..{self.depth} (0 = transformer input, {self.depth} = last "
                                "block)")
            out.append(index)
        return out

    # ------------------------------------------------------------------------- features
    def hidden_states(self, source: Tensor,
                      padding_mask: Tensor | None = None) -> tuple[list[Tensor], Tensor | None]:
        """Every layer's output [(B, T, D)] * (depth + 1) and the padding mask (B, T).

        Padding-safe: a padded row's real positions equal the row run alone (speech runs the
        positional conv with padding zeroed before every layer, whatever the model's
        ``pos_conv_padding``; alone, a row has no padding, so the setting does not matter).
        """
        frontend = self.frontend
        local, padding = frontend.local_features(source, padding_mask)
        if padding is not None and self.modality == "speech":
            x, padding = frontend.contextualize(local, padding, None,
                                                pos_conv_padding="every_layer")
        else:
            x, padding = frontend.contextualize(local, padding, None)
        bias = None
        if self.alibi is not None:
            steps = torch.arange(local.shape[1], device=x.device).unsqueeze(0)  # (1, T)
            bias = self.alibi(steps, frontend.num_extra_tokens)
        out = self.encoder(x, padding, bias, collect_layers=self.depth, target_source="block")
        first = self.encoder.input_norm(x)  # what block 1 reads (eval: no input dropout)
        return [first, *out.layer_results], padding

    def extract_features(self, inputs: Tensor | Sequence[Any], layers: Layers = "all",
                         padding_mask: Tensor | None = None) -> Features:
        """Features of `inputs` at `layers` (no gradient, eval mode).

        `inputs`: a ready batch tensor (speech (B, S) waveforms, images (B, C, H, W), text (B, L)
        ids) with its `padding_mask`, or a list of raw items that :meth:`preprocess` reads
        (file paths; waveform arrays; PIL images; strings of text).
        """
        if not isinstance(inputs, Tensor):
            inputs, padding_mask = self.preprocess(inputs)
        device = self.device
        source = inputs.to(device)
        padding = padding_mask.to(device) if padding_mask is not None else None
        wanted = self.layer_indices(layers)
        with torch.no_grad():
            states, padding = self.hidden_states(source, padding)
        return Features({i: states[i] for i in wanted}, padding)

    # ------------------------------------------------------------------------- raw input
    def preprocess(self, items: Iterable[Any]) -> tuple[Tensor, Tensor | None]:
        """Raw items -> (batch, padding mask): speech and text padded at the end."""
        from data2vec.data.collate import pad_right

        rows = [self.read_input(item) for item in items]
        if not rows:
            raise DataError("no inputs given")
        if self.modality == "image":
            return torch.stack(rows), None
        pad = self.cfg.model.frontend.pad_index if self.modality == "text" else 0.0
        return pad_right(rows, pad)

    def read_input(self, item: Any) -> Tensor:
        """One raw item as the model reads it: speech (S,) waveform at the model's rate
        (normalised when the model was trained so), image (C, H, W) evaluation transform, text
        (L,) ids ``<s> … </s>`` truncated to the model's positions."""
        if isinstance(item, Tensor):
            return item
        reader = {"speech": self._read_speech, "image": self._read_image,
                  "text": self._read_text}[self.modality]
        return reader(item)

    def _read_speech(self, item: Any) -> Tensor:
        from data2vec.data.audio import AudioDataset, normalize_wave

        data = self.cfg.data
        if isinstance(item, np.ndarray):
            wave = np.ascontiguousarray(item, dtype=np.float32)
            if wave.ndim != 1:
                raise DataError(f"a waveform must be 1-D (samples), got shape {wave.shape}")
            return torch.from_numpy(normalize_wave(wave) if data.normalize else wave)
        path = Path(item)
        if not path.is_file():
            raise DataError(f"audio file not found: {path}")
        one = AudioDataset(path.parent, [(path.name, 0)], sample_rate=data.sample_rate,
                           resample=data.resample, normalize=data.normalize)
        return one[0]

    def _read_image(self, item: Any) -> Tensor:
        from PIL import Image

        from data2vec.data.images import NORM_STATS, eval_transform, open_image

        fe = self.cfg.model.frontend
        if isinstance(item, Image.Image):
            image = item.convert("L" if fe.in_channels == 1 else "RGB")
        else:
            path = Path(item)
            if not path.is_file():
                raise DataError(f"image file not found: {path}")
            image = open_image(path, fe.in_channels)
        return eval_transform(image, fe.image_size, NORM_STATS[self.cfg.data.image_norm])

    def _read_text(self, item: Any) -> Tensor:
        if not isinstance(item, str):
            return torch.as_tensor(item, dtype=torch.long)
        if self.tokenizer is None:
            raise DataError(f"{self.source}: no tokenizer found beside this text model (expected "
                            "RUN/tokenizer/ with vocab.json + merges.txt); pass tokenizer=DIR")
        ids = self.tokenizer.encode_sentence(item)
        limit = self.cfg.model.frontend.max_positions
        if len(ids) > limit:  # keep </s>: the model always saw one at the end
            ids = [*ids[:limit - 1], self.tokenizer.eos_id]
        return torch.tensor(ids, dtype=torch.long)

    # ------------------------------------------------------------------------- task output
    def forward(self, source: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Fine-tuned: the task logits ((B, T, V) per frame for asr, else (B, C)); a
        pre-trained model has no task head: use :meth:`extract_features`."""
        if self.task is None:
            raise TypeError(f"{self.source} is a pre-trained model without a task head; use "
                            "extract_features()")
        return self.network(source, padding_mask)[0]


# ----------------------------------------------------------------------------- loading


def num_outputs(task: str, labels: dict[str, Any]) -> int:
    """Size of a task head: CTC letters, or classes (STS-B regression: no classes, one)."""
    if task == "asr":
        return len(labels["vocab"])
    return max(1, len(labels.get("classes") or []))


def _labels(saved: dict[str, Any]) -> dict[str, Any]:
    from data2vec.finetune.ctc import Vocabulary

    if "vocab" in saved:
        return {"vocab": Vocabulary(list(saved["vocab"]))}
    return {"classes": list(saved.get("classes") or [])}


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/step-N`` -> RUN)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def find_tokenizer(cfg: Config, places: Sequence[Path], trained_here: bool = False) -> Any:
    """Text: the BPE in the first of `places` that holds ``vocab.json`` + ``merges.txt``; for a
    model trained here (`trained_here`) also ``data.tokenizer`` or its data directory's (an
    imported model's config names the preset's data, not its own), if its ids fit the model's
    vocabulary. Never trains one; None when there is none."""
    from data2vec.data.tokenizer import MERGES_FILE, VOCAB_FILE, BPETokenizer

    if cfg.modality != "text":
        return None
    def found(directory: Path) -> bool:
        return (directory / VOCAB_FILE).is_file() and (directory / MERGES_FILE).is_file()

    for directory in places:  # the model's own: trusted
        if found(Path(directory)):
            return BPETokenizer.load(directory)
    for directory in _data_tokenizer_dirs(cfg) if trained_here else []:
        if found(directory):
            tokenizer = BPETokenizer.load(directory)
            if tokenizer.vocab_size <= cfg.model.frontend.vocab_size:  # else not the model's
                return tokenizer
    return None


def _data_tokenizer_dirs(cfg: Config) -> list[Path]:
    """Where pre-training put the tokenizer: ``data.tokenizer``, else beside the data."""
    from data2vec.data.demo import default_demo_dir

    if cfg.data.tokenizer:
        return [Path(cfg.data.tokenizer).expanduser()]
    if cfg.data.path:
        first = Path(cfg.data.path.split(",")[0]).expanduser()
        return [(first if first.is_dir() else first.parent) / "tokenizer"]
    demo = (Path(cfg.data.demo_dir).expanduser() / "text" if cfg.data.demo_dir
            else default_demo_dir("text"))
    return [demo / "tokenizer"]


def load_checkpoint(path: str | Path, tokenizer: str | Path | None = None,
                    overrides: Sequence[str] = (), modality: str | None = None) -> LoadedModel:
    """Our run or checkpoint directory (pre-trained, fine-tuned or imported); `overrides`:
    dotted ``model.*`` settings applied to the saved config before building (e.g.
    ``model.encoder.dropout=0.1``); `modality`: which modality of a joint run (ignored for a
    single-modality checkpoint)."""
    from data2vec.build import build_model, build_task_model
    from data2vec.configlib import from_dict, merge, parse_overrides
    from data2vec.finetune.loop import FinetuneConfig
    from data2vec.train import checkpoint as ckpt

    where = ckpt.find_checkpoint(Path(path))
    state = ckpt.load_state(where)
    if "config" not in state:
        raise CheckpointError(f"{where / ckpt.STATE} has no 'config': not a data2vec checkpoint")
    finetune, labels = None, {}
    if "," in str(state["config"].get("modality", "")):  # joint: one modality's model out of it
        from data2vec.train.joint import load_modality

        cfg, network = load_modality(where, modality, list(overrides))
        state = {**state, "config": to_dict(cfg), "joint_config": state["config"]}
    else:
        cfg = config_from_dict(merge(state["config"], parse_overrides(list(overrides))))
        if "finetune" in state:
            finetune = from_dict(FinetuneConfig, state["finetune"])
            labels = _labels(state.get("labels") or {})
            network = build_task_model(cfg, finetune.task, num_outputs(finetune.task, labels),
                                       finetune.pooling, finetune.dropout,
                                       state.get("final_norm", True))  # absent: older runs
        else:
            network = build_model(cfg)
        ckpt.load_model_weights(network, ckpt.load_weights(where), str(where))
    places = [Path(tokenizer)] if tokenizer else []
    places += [run_dir_of(where) / "tokenizer", where / "tokenizer"]
    found = find_tokenizer(cfg, places, trained_here="imported_from" not in state)
    if tokenizer and found is None:
        raise DataError(f"tokenizer={tokenizer}: no vocab.json + merges.txt there")
    return LoadedModel(network, cfg, source=str(where), state=state, finetune=finetune,
                       labels=labels, tokenizer=found)


def _load_hf(directory: Path, tokenizer: str | Path | None) -> LoadedModel:
    from data2vec.interop.hf import task_model_from_hf_dir

    cfg, network, ft, labels, report = task_model_from_hf_dir(directory)
    places = [Path(tokenizer)] if tokenizer else []
    found = find_tokenizer(cfg, [*places, directory])
    state = {"imported_from": report.source, "notes": list(report.notes)}
    return LoadedModel(network, cfg, source=str(directory), state=state, finetune=ft,
                       labels=_labels(labels) if labels else {}, tokenizer=found)


def _load_fairseq(file: Path, tokenizer: str | Path | None) -> LoadedModel:
    from data2vec.interop.fairseq import model_from_fairseq

    cfg, network, report = model_from_fairseq(file)
    found = find_tokenizer(cfg, [Path(tokenizer)] if tokenizer else [])
    state = {"imported_from": report.source, "notes": list(report.notes)}
    return LoadedModel(network, cfg, source=str(file), state=state, tokenizer=found)


def load(path: str | Path, *, tokenizer: str | Path | None = None,
         device: str | torch.device | None = None, modality: str | None = None) -> LoadedModel:
    """Load any data2vec model (see the module docstring) in eval mode, on `device` (default
    CPU); `tokenizer`: a directory with vocab.json + merges.txt for a text model that has none
    beside it; `modality`: which modality of a joint multi-modal run (required there; elsewhere,
    a check)."""
    from data2vec.train import checkpoint as ckpt

    path = Path(path).expanduser()
    if path.is_file():
        model = _load_fairseq(path, tokenizer)
    elif path.is_dir() and (path / "config.json").is_file() and not (path / ckpt.STATE).is_file():
        model = _load_hf(path, tokenizer)
    elif not path.exists() and str(path).count("/") == 1:  # maybe a hub id in the local cache
        from data2vec.interop.hf import resolve_hf_dir

        model = _load_hf(resolve_hf_dir(str(path)), tokenizer)
    else:
        model = load_checkpoint(path, tokenizer, modality=modality)
    if modality is not None and model.modality != modality:
        raise DataError(f"{path} holds a {model.modality} model, not {modality}")
    if device is not None:
        from data2vec.train.distributed import pick_device

        model.to(pick_device(str(device)))
    return model


__all__ = ["Features", "LoadedModel", "find_tokenizer", "load", "load_checkpoint", "num_outputs",
           "run_dir_of"]
