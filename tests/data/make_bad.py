"""The malformed-input corpus (issue 11): every case is a few small files made here (no blobs),
the command that reads them, and what must happen: its exit code, the one error line naming the
file or config key at fault, and nothing half-written (see tests/test_bad_inputs.py).

    python tests/data/make_bad.py [OUT]    # build every case into OUT (default tests/data/bad/)

Each case lives in ``OUT/<case>/``; its ``case.json`` holds the command line and the
expectations. Shared inputs (good images, audio, text and one short pre-training run) are built
once in ``OUT/_shared/`` and never changed by a case.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FAST = ["run.progress=false", "run.tensorboard=false", "run.log_every=1", "run.threads=1"]
SMALL = ["data.batch_size=2", *FAST]
TEXT_SMALL = [*SMALL, "data.vocab_size=300", "data.tokens_per_sample=32"]


@dataclass
class Case:
    """One malformed input and the behaviour it must get."""

    argv: list[str]
    expect: list[str]
    """Substrings of the error line (code 2) or of stderr (code 0): the file or key at fault."""
    code: int = 2
    new_files: bool = False
    """Whether the command may create files (a run that starts, then fails or succeeds)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Code 0: values the last metrics.jsonl record of ``out`` must hold (skipped counts)."""
    kind: str = ""
    name: str = ""


Builder = Callable[[Path, "Shared"], Case]
BUILDERS: dict[str, tuple[str, Builder]] = {}


def case(kind: str) -> Callable[[Builder], Builder]:
    """Register a builder under its function name (its kind: audio, manifest, image, ...)."""
    def register(builder: Builder) -> Builder:
        BUILDERS[builder.__name__] = (kind, builder)
        return builder
    return register


# ------------------------------------------------------------------------------ file makers --


def tone(path: Path, seconds: float = 1.0, rate: int = 16_000, fmt: str | None = None) -> Path:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 220.0 * t) * (1 + 0.1 * np.cos(7 * t))).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, rate, format=fmt)
    return path


def cut_flac(path: Path) -> Path:
    """A FLAC whose header is intact but whose frames stop half-way (fails only on decode)."""
    tone(path, 1.0, fmt="FLAC")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def png(path: Path, seed: int = 0, side: int = 32) -> Path:
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((side, side, 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def undecodable_png(path: Path) -> Path:
    """Valid chunks and CRCs (Pillow's verify() passes) around a corrupt zlib stream."""
    png(path, seed=99)
    data = path.read_bytes()
    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start:start + 4])
    payload = bytes(b ^ 0x5A for b in data[start + 8:start + 8 + length])
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + payload) & 0xFFFFFFFF)
    path.write_bytes(data[:start + 8] + payload + crc + data[start + 12 + length:])
    return path


def prose(path: Path, words: int = 1200, seed: int = 0, extra: str = "") -> Path:
    rng = np.random.default_rng(seed)
    vocab = ["the", "data", "model", "teacher", "student", "masked", "target", "layer",
             "speech", "image", "text", "token", "average", "block", "learning", "rate",
             "update", "encoder", "decoder"]
    lines = []
    for i in range(words // 12):
        lines.append(" ".join(rng.choice(vocab, 12)) + (f" {extra}" if extra else ""))
        if i % 5 == 4:
            lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def hf_text_config(**changes: object) -> dict[str, object]:
    config: dict[str, object] = {
        "model_type": "data2vec-text", "architectures": ["Data2VecTextModel"],
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 60, "max_position_embeddings": 40,
        "pad_token_id": 1, "layer_norm_eps": 1e-5, "type_vocab_size": 1, "hidden_act": "gelu"}
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


class _Forbidden:
    """Unpickling this would call os.system: the reader must refuse it by name."""

    def __reduce__(self):
        import os

        return os.system, ("true",)


# ---------------------------------------------------------------------------- shared inputs --


class Shared:
    """Good inputs the cases start from, built once on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _once(self, name: str, build: Callable[[Path], None]) -> Path:
        path = self.root / name
        if not path.exists():
            tmp = self.root / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            build(tmp)
            tmp.rename(path)
        return path

    def audio(self) -> Path:
        return self._once("audio", lambda d: [tone(d / f"clip{i}.wav", 1.0 + 0.1 * i)
                                              for i in range(3)])

    def images(self) -> Path:
        return self._once("images", lambda d: [png(d / f"img{i}.png", i) for i in range(3)])

    def image_run(self) -> Path:
        """A one-update image pre-training run (a real checkpoint)."""
        from data2vec.cli import main

        def build(d: Path) -> None:
            code = main(["pretrain", "--modality", "image", "--data", str(self.images()),
                         "--out", str(d / "run"), "--max-steps", "1", *SMALL])
            assert code == 0, "the shared image run failed"
        return self._once("image_run", build) / "run"


def copy_run(shared: Shared, to: Path) -> Path:
    shutil.copytree(shared.image_run(), to)
    return to


def speech(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--modality", "speech", "--data", str(data), "--out", str(out),
            "--max-steps", "3", *SMALL, "data.min_sample_size=4000", *extra]


def image(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--modality", "image", "--data", str(data), "--out", str(out),
            "--max-steps", "2", *SMALL, *extra]


def text(data: Path | str, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--modality", "text", "--data", str(data), "--out", str(out),
            "--max-steps", "2", *TEXT_SMALL, *extra]


def good_audio(d: Path, shared: Shared) -> Path:
    shutil.copytree(shared.audio(), d / "audio")
    return d / "audio"


def good_images(d: Path, shared: Shared) -> Path:
    shutil.copytree(shared.images(), d / "images")
    return d / "images"


# ------------------------------------------------------------------------------------ audio --


@case("audio")
def audio_not_audio(d: Path, shared: Shared) -> Case:
    bad = good_audio(d, shared) / "bad.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(200)))
    return Case(speech(bad.parent, d / "out"), [str(bad), "unreadable audio"])


@case("audio")
def audio_empty_file(d: Path, shared: Shared) -> Case:
    bad = good_audio(d, shared) / "empty.wav"
    bad.write_bytes(b"")
    return Case(speech(bad.parent, d / "out"), [str(bad), "empty"])


@case("audio")
def audio_no_samples(d: Path, shared: Shared) -> Case:
    import soundfile as sf

    bad = good_audio(d, shared) / "silent.wav"
    sf.write(bad, np.zeros(0, dtype=np.float32), 16_000)
    return Case(speech(bad.parent, d / "out"), [str(bad), "0 samples"])


@case("audio")
def audio_wrong_rate(d: Path, shared: Shared) -> Case:
    bad = tone(good_audio(d, shared) / "slow.wav", 1.0, rate=8_000)
    return Case(speech(bad.parent, d / "out"), [str(bad), "8000", "data.resample"])


@case("audio")
def audio_junk_flac(d: Path, shared: Shared) -> Case:
    bad = good_audio(d, shared) / "junk.flac"
    bad.write_bytes(b"fLaC" + bytes(64))
    return Case(speech(bad.parent, d / "out"), [str(bad)])


@case("audio")
def audio_frames_cut_mid_run(d: Path, shared: Shared) -> Case:
    bad = cut_flac(good_audio(d, shared) / "cut.flac")  # header fine: found when decoded
    return Case(speech(bad.parent, d / "out"), [str(bad), "--skip-bad"], new_files=True)


@case("audio")
def audio_no_files(d: Path, shared: Shared) -> Case:
    (d / "audio").mkdir()
    (d / "audio" / "notes.txt").write_text("no audio here\n")
    return Case(speech(d / "audio", d / "out"), [str(d / "audio"), "no audio files"])


@case("audio")
def audio_all_bad_skipped(d: Path, shared: Shared) -> Case:
    (d / "audio").mkdir()
    for i in range(2):
        (d / "audio" / f"bad{i}.wav").write_bytes(b"garbage" * 10)
    return Case(speech(d / "audio", d / "out", "--skip-bad"), [str(d / "audio"), "unreadable"])


@case("audio")
def audio_skip_bad_counts_up_front_and_mid_run(d: Path, shared: Shared) -> Case:
    folder = good_audio(d, shared)
    bad = folder / "bad.wav"
    bad.write_bytes(b"not audio")
    cut = cut_flac(folder / "cut.flac")
    return Case(speech(folder, d / "out", "--skip-bad", "--max-steps", "4"),
                [str(bad), str(cut), "skipped"], code=0, new_files=True,
                metrics={"skipped_unreadable": 2})


# --------------------------------------------------------------------------------- manifests --


def manifest(d: Path, shared: Shared, body: str | bytes, name: str = "train.tsv") -> Path:
    folder = good_audio(d, shared)
    path = d / name
    head = f"{folder}\n".encode()
    path.write_bytes(head + (body.encode() if isinstance(body, str) else body))
    return path


@case("manifest")
def manifest_empty(d: Path, shared: Shared) -> Case:
    path = d / "train.tsv"
    path.write_text("")
    return Case(speech(path, d / "out"), [str(path), "empty manifest"])


@case("manifest")
def manifest_only_root(d: Path, shared: Shared) -> Case:
    path = manifest(d, shared, "")
    return Case(speech(path, d / "out"), [str(path), "lists no audio file"])


@case("manifest")
def manifest_line_without_tab(d: Path, shared: Shared) -> Case:
    path = manifest(d, shared, "clip0.wav 16000\n")
    return Case(speech(path, d / "out"), [f"{path}:2", "relative_path<TAB>num_samples"])


@case("manifest")
def manifest_count_not_a_number(d: Path, shared: Shared) -> Case:
    path = manifest(d, shared, "clip0.wav\t16000\nclip1.wav\tmany\n")
    return Case(speech(path, d / "out"), [f"{path}:3"])


@case("manifest")
def manifest_negative_count(d: Path, shared: Shared) -> Case:
    path = manifest(d, shared, "clip0.wav\t-16000\n")
    return Case(speech(path, d / "out"), [f"{path}:2"])


@case("manifest")
def manifest_missing_file(d: Path, shared: Shared) -> Case:
    path = manifest(d, shared, "clip0.wav\t16000\ngone.wav\t16000\n")
    return Case(speech(path, d / "out"), [str(path), str(d / "audio" / "gone.wav")])


@case("manifest")
def manifest_count_disagrees_with_file(d: Path, shared: Shared) -> Case:
    path = manifest(d, shared, "clip0.wav\t16000\nclip1.wav\t99999\n")
    return Case(speech(path, d / "out"), [str(path), "clip1.wav", "99999", "17600"])


@case("manifest")
def manifest_not_utf8(d: Path, shared: Shared) -> Case:
    path = manifest(d, shared, b"clip0.wav\t16000\ncaf\xe9.wav\t16000\n")
    return Case(speech(path, d / "out"), [str(path), "UTF-8"])


@case("manifest")
def manifest_transcripts_disagree(d: Path, shared: Shared) -> Case:
    path = manifest(d, shared, "clip0.wav\t16000\nclip1.wav\t17600\n")
    (d / "train.ltr").write_text("O N E |\n")
    return Case(speech(path, d / "out"), [str(d / "train.ltr"), "1 lines", "2 files"])


@case("manifest")
def manifest_root_missing(d: Path, shared: Shared) -> Case:
    path = d / "train.tsv"
    path.write_text(f"{d / 'nowhere'}\nclip0.wav\t16000\n")
    return Case(speech(path, d / "out"), [str(d / "nowhere" / "clip0.wav")])


@case("manifest")
def manifest_skip_bad_skips_missing_and_wrong_counts(d: Path, shared: Shared) -> Case:
    path = manifest(d, shared, "clip0.wav\t16000\nclip1.wav\t1\nclip2.wav\t19200\ngone.wav\t9\n")
    return Case(speech(path, d / "out", "--skip-bad"), ["gone.wav", "clip1.wav", "skipped"],
                code=0, new_files=True, metrics={"skipped_missing": 1,
                                                 "skipped_size_mismatch": 1})


# ------------------------------------------------------------------------------------ images --


@case("image")
def image_corrupt_header(d: Path, shared: Shared) -> Case:
    bad = good_images(d, shared) / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    return Case(image(bad.parent, d / "out"), [str(bad), "unreadable image"], new_files=True)


@case("image")
def image_empty_file(d: Path, shared: Shared) -> Case:
    bad = good_images(d, shared) / "empty.jpg"
    bad.write_bytes(b"")
    return Case(image(bad.parent, d / "out"), [str(bad), "empty"])


@case("image")
def image_text_named_png(d: Path, shared: Shared) -> Case:
    bad = good_images(d, shared) / "notes.png"
    bad.write_text("this is not an image\n")
    return Case(image(bad.parent, d / "out"), [str(bad)], new_files=True)


@case("image")
def image_pixels_do_not_decode(d: Path, shared: Shared) -> Case:
    bad = undecodable_png(good_images(d, shared) / "broken.png")
    return Case(image(bad.parent, d / "out"), [str(bad), "--skip-bad"], new_files=True)


@case("image")
def image_truncated(d: Path, shared: Shared) -> Case:
    bad = png(good_images(d, shared) / "half.png", seed=7)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return Case(image(bad.parent, d / "out"), [str(bad)], new_files=True)


@case("image")
def image_no_files(d: Path, shared: Shared) -> Case:
    (d / "images").mkdir()
    (d / "images" / "readme.txt").write_text("nothing\n")
    return Case(image(d / "images", d / "out"), [str(d / "images"), "no image files"])


@case("image")
def image_folder_missing(d: Path, shared: Shared) -> Case:
    return Case(image(d / "nowhere", d / "out"), [str(d / "nowhere"), "not found"])


@case("image")
def image_all_bad_skipped(d: Path, shared: Shared) -> Case:
    (d / "images").mkdir()
    for i in range(2):
        (d / "images" / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    return Case(image(d / "images", d / "out", "--skip-bad"), [str(d / "images"), "no readable"])


@case("image")
def image_skip_bad_counts_a_decode_error_mid_run(d: Path, shared: Shared) -> Case:
    folder = good_images(d, shared)
    bad = undecodable_png(folder / "broken.png")  # passes the up-front probe
    return Case(image(folder, d / "out", "--skip-bad"), [str(bad), "skipped"], code=0,
                new_files=True, metrics={"skipped_unreadable": 1})


# -------------------------------------------------------------------------------------- text --


@case("text")
def text_not_utf8(d: Path, shared: Shared) -> Case:
    prose(d / "corpus" / "a.txt")
    bad = d / "corpus" / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 20)
    return Case(text(d / "corpus", d / "out"), [str(bad), "UTF-8"])


@case("text")
def text_blank_file(d: Path, shared: Shared) -> Case:
    prose(d / "corpus" / "a.txt")
    bad = d / "corpus" / "blank.txt"
    bad.write_text("\n   \n\t\n")
    return Case(text(d / "corpus", d / "out"), [str(bad), "empty"])


@case("text")
def text_binary_file(d: Path, shared: Shared) -> Case:
    prose(d / "corpus" / "a.txt")
    bad = d / "corpus" / "binary.txt"
    bad.write_bytes(bytes(np.random.default_rng(0).integers(128, 256, 300, dtype=np.uint8)))
    return Case(text(d / "corpus", d / "out"), [str(bad)])


@case("text")
def text_no_files(d: Path, shared: Shared) -> Case:
    (d / "corpus").mkdir()
    (d / "corpus" / "data.csv").write_text("a,b\n")
    return Case(text(d / "corpus", d / "out"), [str(d / "corpus"), "no .txt files"])


@case("text")
def text_listed_file_missing(d: Path, shared: Shared) -> Case:
    good = prose(d / "a.txt")
    return Case(text(f"{good},{d / 'gone.txt'}", d / "out"), [str(d / "gone.txt")])


@case("text")
def text_all_bad_skipped(d: Path, shared: Shared) -> Case:
    (d / "corpus").mkdir()
    (d / "corpus" / "a.txt").write_bytes(b"\xff\xfe\xfd" * 10)
    (d / "corpus" / "b.txt").write_text("\n\n")
    return Case(text(d / "corpus", d / "out", "--skip-bad"),
                [str(d / "corpus"), "no readable text file"])


@case("text")
def text_skip_bad_keeps_the_file_out_of_the_tokenizer(d: Path, shared: Shared) -> Case:
    prose(d / "corpus" / "a.txt")
    bad = d / "corpus" / "latin1.txt"
    bad.write_bytes(("zqxjvw " * 40 + "\xe9\n").encode("latin-1") * 20)
    return Case(text(d / "corpus", d / "out", "--skip-bad"), [str(bad), "skipped"], code=0,
                new_files=True, metrics={"skipped_not_utf8": 1})


def tokenizer_dir(d: Path, vocab: bytes | str, merges: bytes | str) -> Path:
    directory = d / "tok"
    directory.mkdir()
    for name, content in (("vocab.json", vocab), ("merges.txt", merges)):
        data = content if isinstance(content, bytes) else content.encode()
        (directory / name).write_bytes(data)
    return directory


def specials(extra: dict[str, int] | None = None, mask: bool = True) -> str:
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **({"<mask>": 4} if mask else {}),
             "a": 5, "b": 6, "ab": 7, **(extra or {})}
    return json.dumps(vocab)


@case("text")
def tokenizer_vocab_not_json(d: Path, shared: Shared) -> Case:
    prose(d / "corpus" / "a.txt")
    tok = tokenizer_dir(d, "{not json", "#version: 0.2\na b\n")
    return Case(text(d / "corpus", d / "out", f"data.tokenizer={tok}"),
                [str(tok / "vocab.json"), "JSON"])


@case("text")
def tokenizer_vocab_not_utf8(d: Path, shared: Shared) -> Case:
    prose(d / "corpus" / "a.txt")
    tok = tokenizer_dir(d, b'{"\xff": 1}', "a b\n")
    return Case(text(d / "corpus", d / "out", f"data.tokenizer={tok}"),
                [str(tok / "vocab.json"), "UTF-8"])


@case("text")
def tokenizer_merges_malformed(d: Path, shared: Shared) -> Case:
    prose(d / "corpus" / "a.txt")
    tok = tokenizer_dir(d, specials(), "#version: 0.2\na b c\n")
    return Case(text(d / "corpus", d / "out", f"data.tokenizer={tok}"),
                [f"{tok / 'merges.txt'}:2", "two space-separated tokens"])


@case("text")
def tokenizer_lacks_mask_token(d: Path, shared: Shared) -> Case:
    prose(d / "corpus" / "a.txt")
    tok = tokenizer_dir(d, specials(mask=False), "a b\n")
    return Case(text(d / "corpus", d / "out", f"data.tokenizer={tok}"),
                [str(tok / "vocab.json"), "<mask>"])


@case("text")
def tokenizer_folder_missing(d: Path, shared: Shared) -> Case:
    prose(d / "corpus" / "a.txt")
    return Case(text(d / "corpus", d / "out", f"data.tokenizer={d / 'nowhere'}"),
                [str(d / "nowhere" / "vocab.json"), "not found"])


# ----------------------------------------------------------------------------------- configs --


def config_file(d: Path, content: bytes | str) -> Path:
    path = d / "my.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def with_config(d: Path, path: Path | str) -> list[str]:
    return ["pretrain", "--modality", "image", "--out", str(d / "out"), "--config", str(path),
            *FAST]


def with_overrides(d: Path, *overrides: str, modality: str = "image") -> list[str]:
    return ["pretrain", "--modality", modality, "--out", str(d / "out"), *FAST, *overrides]


@case("config")
def config_unknown_key(d: Path, shared: Shared) -> Case:
    path = config_file(d, "model:\n  encoder:\n    detph: 4\n")
    return Case(with_config(d, path), ["model.encoder.detph", "did you mean 'depth'"])


@case("config")
def config_yaml_syntax(d: Path, shared: Shared) -> Case:
    path = config_file(d, "model: [1, 2\n")
    return Case(with_config(d, path), [str(path), "not valid YAML"])


@case("config")
def config_top_level_list(d: Path, shared: Shared) -> Case:
    path = config_file(d, "- 1\n- 2\n")
    return Case(with_config(d, path), [str(path), "mapping"])


@case("config")
def config_not_utf8(d: Path, shared: Shared) -> Case:
    path = config_file(d, b"optim:\n  lr: \xff\xfe\n")
    return Case(with_config(d, path), [str(path), "UTF-8"])


@case("config")
def config_file_missing(d: Path, shared: Shared) -> Case:
    return Case(with_config(d, d / "gone.yaml"), [str(d / "gone.yaml"), "not found"])


@case("config")
def config_wrong_type(d: Path, shared: Shared) -> Case:
    path = config_file(d, "optim:\n  lr: fast\n")
    return Case(with_config(d, path), ["optim.lr", "expected a number"])


BAD_VALUES: dict[str, tuple[str, str, str]] = {
    # case name: (override, key named in the error, modality)
    "config_lr_zero": ("optim.lr=0", "optim.lr", "image"),
    "config_lr_negative": ("optim.lr=-1e-3", "optim.lr", "image"),
    "config_lr_nan": ("optim.lr=nan", "optim.lr", "image"),
    "config_depth_zero": ("model.encoder.depth=0", "model.encoder.depth", "image"),
    "config_batch_size_zero": ("data.batch_size=0", "data.batch_size", "image"),
    "config_mask_ratio_above_one": ("model.masking.mask_ratio=1.5", "model.masking.mask_ratio",
                                    "image"),
    "config_checkpoint_every_zero": ("run.checkpoint_every=0", "run.checkpoint_every", "image"),
    "config_log_every_negative": ("run.log_every=-1", "run.log_every", "image"),
    "config_dropout_nan": ("model.encoder.dropout=.nan", "model.encoder.dropout", "image"),
    "config_dropout_one": ("model.encoder.dropout=1.0", "model.encoder.dropout", "image"),
    "config_dim_not_divisible": ("model.encoder.dim=30", "model.encoder.num_heads", "image"),
    "config_crop_scale_reversed": ("data.crop_scale=[0.9, 0.1]", "data.crop_scale", "image"),
    "config_beta_above_one": ("optim.betas=[0.9, 1.5]", "optim.betas[1]", "image"),
    "config_ema_above_one": ("model.objective.ema_start=2", "model.objective.ema_start",
                             "image"),
    "config_weight_decay_infinite": ("optim.weight_decay=.inf", "optim.weight_decay", "image"),
    "config_vocab_too_small": ("data.vocab_size=100", "data.vocab_size", "text"),
    "config_text_mask_prob_zero": ("model.masking.mask_prob=0", "model.masking.mask_prob",
                                   "text"),
    "config_min_sample_size_above_max": ("data.min_sample_size=90000", "data.min_sample_size",
                                         "speech"),
    "config_tri_stage_over_one": ("optim.tri_stage=[0.5, 0.5, 0.5]", "optim.tri_stage",
                                  "speech"),
    "config_max_steps_zero": ("run.max_steps=0", "run.max_steps", "image"),
    "config_keep_last_negative": ("run.keep_last=-2", "run.keep_last", "image"),
    "config_nonfinite_mode_unknown": ("run.nonfinite=ignore", "run.nonfinite", "image"),
}


def _bad_value(name: str, override: str, key: str, modality: str) -> Builder:
    def build(d: Path, shared: Shared) -> Case:
        return Case(with_overrides(d, override, modality=modality), [f"{key}"])
    build.__name__ = name
    return build


for _name, (_override, _key, _modality) in BAD_VALUES.items():
    case("config")(_bad_value(_name, _override, _key, _modality))


# ------------------------------------------------------------------------------- checkpoints --


def resume(run: Path, *extra: str, modality: str = "image") -> list[str]:
    return ["pretrain", "--modality", modality, "--out", str(run), "--resume", *SMALL, *extra]


@case("checkpoint")
def resume_without_checkpoint(d: Path, shared: Shared) -> Case:
    (d / "run").mkdir()
    return Case(resume(d / "run"), [str(d / "run" / "checkpoints"), "no checkpoint"])


@case("checkpoint")
def resume_truncated_weights(d: Path, shared: Shared) -> Case:
    run = copy_run(shared, d / "run")
    weights = run / "checkpoints" / "step-0000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return Case(resume(run), [str(weights), "truncated or corrupt"])


@case("checkpoint")
def resume_truncated_state(d: Path, shared: Shared) -> Case:
    run = copy_run(shared, d / "run")
    state = run / "checkpoints" / "step-0000001" / "state.pt"
    state.write_bytes(state.read_bytes()[:300])
    return Case(resume(run), [str(state)])


@case("checkpoint")
def resume_state_with_code(d: Path, shared: Shared) -> Case:
    import torch

    run = copy_run(shared, d / "run")
    state = run / "checkpoints" / "step-0000001" / "state.pt"
    torch.save({"step": 1, "x": _Forbidden()}, state)
    return Case(resume(run), [str(state), "refused to unpickle"])


@case("checkpoint")
def resume_another_modality(d: Path, shared: Shared) -> Case:
    run = copy_run(shared, d / "run")
    return Case(resume(run, modality="text"), [str(run / "config.yaml"), "image", "text"])


@case("checkpoint")
def resume_another_modality_without_config(d: Path, shared: Shared) -> Case:
    run = copy_run(shared, d / "run")
    (run / "config.yaml").unlink()
    prose(d / "corpus" / "a.txt")
    return Case(resume(run, "--data", str(d / "corpus"), *TEXT_SMALL[len(SMALL):],
                       modality="text"),
                [str(run / "checkpoints" / "step-0000001"), "holds a image v1 run"])


@case("checkpoint")
def resume_another_architecture(d: Path, shared: Shared) -> Case:
    run = copy_run(shared, d / "run")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("depth: 4", "depth: 5", 1))
    return Case(resume(run), [str(run / "checkpoints" / "step-0000001"), "does not fit"])


@case("checkpoint")
def resume_config_yaml_broken(d: Path, shared: Shared) -> Case:
    run = copy_run(shared, d / "run")
    (run / "config.yaml").write_text("model: [1, 2\n")
    return Case(resume(run), [str(run / "config.yaml"), "not valid YAML"])


@case("checkpoint")
def init_not_a_checkpoint(d: Path, shared: Shared) -> Case:
    (d / "empty").mkdir()
    return Case(image(shared.images(), d / "out", "--init", str(d / "empty")),
                [str(d / "empty"), "no checkpoint"])


@case("checkpoint")
def init_another_modality(d: Path, shared: Shared) -> Case:
    prose(d / "corpus" / "a.txt")
    run = shared.image_run()
    return Case(text(d / "corpus", d / "out", "--init", str(run)),
                [str(run), "image v1", "text v1"])


@case("checkpoint")
def init_truncated_weights(d: Path, shared: Shared) -> Case:
    run = copy_run(shared, d / "run")
    weights = run / "checkpoints" / "step-0000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return Case(image(shared.images(), d / "out", "--init", str(run)), [str(weights)])


@case("checkpoint")
def run_directory_already_holds_a_run(d: Path, shared: Shared) -> Case:
    run = copy_run(shared, d / "run")
    return Case(image(shared.images(), run), [str(run), "--resume", "--overwrite"])


@case("checkpoint")
def run_directory_is_a_file(d: Path, shared: Shared) -> Case:
    (d / "out").write_text("a file, not a directory\n")
    return Case(image(shared.images(), d / "out"), [str(d / "out"), "not a directory"])


@case("checkpoint")
def finetune_out_already_holds_a_run(d: Path, shared: Shared) -> Case:
    run = copy_run(shared, d / "run")
    return Case(["finetune", "--task", "image-cls", "--init", str(shared.image_run()),
                 "--out", str(run)], [str(run), "--overwrite"])


# ----------------------------------------------------------------------------------- interop --


def hf_dir(d: Path, config: object | bytes | None = None) -> Path:
    directory = d / "hf"
    directory.mkdir()
    if config is not None:
        data = config if isinstance(config, bytes) else json.dumps(config).encode()
        (directory / "config.json").write_bytes(data)
    return directory


def import_hf(d: Path, directory: Path) -> list[str]:
    return ["import", "--from", "hf", str(directory), "--out", str(d / "out")]


@case("interop")
def hf_without_config(d: Path, shared: Shared) -> Case:
    directory = hf_dir(d)
    (directory / "model.safetensors").write_bytes(b"")
    return Case(import_hf(d, directory), [str(directory), "no config.json"])


@case("interop")
def hf_config_not_json(d: Path, shared: Shared) -> Case:
    directory = hf_dir(d, b'{"model_type": "data2vec-text",')
    return Case(import_hf(d, directory), [str(directory / "config.json"), "not valid JSON"])


@case("interop")
def hf_config_is_a_list(d: Path, shared: Shared) -> Case:
    directory = hf_dir(d, [1, 2, 3])
    return Case(import_hf(d, directory), [str(directory / "config.json"), "JSON object"])


@case("interop")
def hf_config_missing_key(d: Path, shared: Shared) -> Case:
    directory = hf_dir(d, hf_text_config(num_hidden_layers=None))
    return Case(import_hf(d, directory), [str(directory / "config.json"), "num_hidden_layers"])


@case("interop")
def hf_config_wrong_type(d: Path, shared: Shared) -> Case:
    directory = hf_dir(d, hf_text_config(hidden_size="big"))
    return Case(import_hf(d, directory), [str(directory / "config.json"), "big"])


@case("interop")
def hf_config_not_utf8(d: Path, shared: Shared) -> Case:
    directory = hf_dir(d, b'{"model_type": "\xff"}')
    return Case(import_hf(d, directory), [str(directory / "config.json"), "UTF-8"])


@case("interop")
def hf_config_unknown_model_type(d: Path, shared: Shared) -> Case:
    directory = hf_dir(d, hf_text_config(model_type="bert"))
    return Case(import_hf(d, directory), [str(directory / "config.json"), "model_type"])


@case("interop")
def hf_without_weights(d: Path, shared: Shared) -> Case:
    directory = hf_dir(d, hf_text_config())
    return Case(import_hf(d, directory), [str(directory), "no model.safetensors"])


@case("interop")
def hf_truncated_weights(d: Path, shared: Shared) -> Case:
    import torch
    from safetensors.torch import save_file

    directory = hf_dir(d, hf_text_config())
    weights = directory / "model.safetensors"
    save_file({"embeddings.word_embeddings.weight": torch.zeros(60, 32)}, weights)
    weights.write_bytes(weights.read_bytes()[:120])
    return Case(import_hf(d, directory), [str(weights)])


def import_fairseq(d: Path, path: Path) -> list[str]:
    return ["import", "--from", "fairseq", str(path), "--out", str(d / "out")]


@case("interop")
def fairseq_file_missing(d: Path, shared: Shared) -> Case:
    return Case(import_fairseq(d, d / "gone.pt"), [str(d / "gone.pt")])


@case("interop")
def fairseq_truncated(d: Path, shared: Shared) -> Case:
    import torch

    path = d / "model.pt"
    torch.save({"model": {"w": torch.zeros(100)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    return Case(import_fairseq(d, path), [str(path)])


@case("interop")
def fairseq_pickle_with_code(d: Path, shared: Shared) -> Case:
    path = d / "model.pt"
    path.write_bytes(pickle.dumps({"model": _Forbidden()}))
    return Case(import_fairseq(d, path), [str(path), "system"])


@case("interop")
def fairseq_not_a_data2vec_checkpoint(d: Path, shared: Shared) -> Case:
    import torch

    path = d / "model.pt"
    torch.save({"model": {"conv.weight": torch.zeros(2, 2)}}, path)
    return Case(import_fairseq(d, path), [str(path), "conv.weight"])


@case("interop")
def import_out_not_empty(d: Path, shared: Shared) -> Case:
    (d / "out").mkdir()
    (d / "out" / "keep.txt").write_text("someone's work\n")
    return Case(import_hf(d, hf_dir(d, hf_text_config())), [str(d / "out"), "--overwrite"])


@case("interop")
def export_not_a_checkpoint(d: Path, shared: Shared) -> Case:
    (d / "empty").mkdir()
    return Case(["export", "--to", "hf", str(d / "empty"), str(d / "out")],
                [str(d / "empty"), "no checkpoint"])


@case("interop")
def export_out_not_empty(d: Path, shared: Shared) -> Case:
    (d / "out").mkdir()
    (d / "out" / "config.json").write_text("{}\n")
    return Case(["export", "--to", "hf", str(shared.image_run()), str(d / "out")],
                [str(d / "out"), "--overwrite"])


# ------------------------------------------------------------------------------------- build --


def build_case(name: str, root: Path, shared: Shared) -> Case:
    """Build case `name` in ``root/name`` (made fresh) and return it."""
    kind, builder = BUILDERS[name]
    directory = root / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    built = builder(directory, shared)
    built.kind, built.name = kind, name
    (directory / "case.json").write_text(json.dumps(asdict(built), indent=1) + "\n")
    return built


def build_all(root: Path) -> list[Case]:
    shared = Shared(root / "_shared")
    return [build_case(name, root, shared) for name in BUILDERS]


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).with_name("bad")
    cases = build_all(root)
    kinds: dict[str, int] = {}
    for built in cases:
        kinds[built.kind] = kinds.get(built.kind, 0) + 1
    print(f"{len(cases)} cases in {root}: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
