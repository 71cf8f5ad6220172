"""Embedded demo data for each modality, built locally from what the installed packages ship.

No download: speech is synthesised with eSpeak NG (``espeakng-loader``), images are scikit-learn's
8x8 handwritten digits upsampled to 32x32, text is English prose shipped with CPython
(``pydoc_data.topics`` plus standard-library docstrings). Every corpus is a pure function of its
parameters (seed, size), cached under a completion marker and built atomically (a temporary
directory renamed into place), so concurrent callers and interrupted builds are safe.

Layouts (what the real loaders read):

- speech: ``{train,valid,test}/*.wav`` (16 kHz, 16-bit), fairseq manifests ``{split}.tsv`` (root
  line, then ``rel_path<TAB>num_samples``) and transcripts ``{split}.wrd`` / ``{split}.ltr`` in
  manifest order. The words of a clip (digits and a small vocabulary) are the labelled task.
- image: ``{train,valid,test}/<digit>/<index>.png`` (grey 32x32), a stratified 80/10/10 split.
- text: ``{train,valid,test}.txt`` (paragraph per line, blank line between documents),
  ``{split}.labelled.tsv`` (``family<TAB>docstring``: which stdlib package family a docstring comes
  from) and a BPE vocabulary in ``tokenizer/``.

Example::

    root = prepare_demo("image", default_demo_dir("image"))   # ~2 s, then cached
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import numpy as np

from data2vec.errors import DataError

DEMO_FORMAT = 1
"""Bump when a builder's output changes, so stale caches are rebuilt."""
MARKER = ".complete.json"
SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

# ----------------------------------------------------------------------------------- caching --


def default_demo_dir(modality: str | None = None) -> Path:
    """``$DATA2VEC_HOME/demo[/<modality>]``, with ~/.cache/data2vec when the variable is unset."""
    home = Path(os.environ.get("DATA2VEC_HOME") or Path.home() / ".cache" / "data2vec")
    root = home / "demo"
    return root / modality if modality else root


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory lock (POSIX flock), so ranks starting together build a corpus once."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename alone keeps results consistent
        yield
        return
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_atomically(out_dir: Path, params: dict[str, Any], force: bool,
                      build: Callable[[Path, Path], None]) -> Path:
    """Run ``build(tmp_dir, final_dir)`` in a temporary directory, then rename it into place."""
    out_dir = out_dir.expanduser().resolve()
    if not force and _read_marker(out_dir) == params:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir.parent / f".{out_dir.name}.lock"):
        if not force and _read_marker(out_dir) == params:  # built while we waited
            return out_dir
        if out_dir.exists() and _read_marker(out_dir) is None and any(out_dir.iterdir()):
            # Never delete a folder we did not build (a mistyped path must not cost user data).
            raise DataError(f"{out_dir} exists and is not a demo corpus (no {MARKER}); "
                            "choose an empty or new directory")
        return _build_in_temp(out_dir, params, build)


def _build_in_temp(out_dir: Path, params: dict[str, Any],
                   build: Callable[[Path, Path], None]) -> Path:
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        build(tmp, out_dir)
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True))
        if out_dir.exists():  # stale, incomplete or forced: move aside first, then delete
            trash = tmp.with_name(tmp.name + "-old")
            out_dir.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            tmp.rename(out_dir)
        except OSError:
            # Another process finished the same build between our check and rename: use theirs.
            if _read_marker(out_dir) != params:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def prepare_demo(modality: str, out_dir: Path | None = None, seed: int = 0, force: bool = False,
                 size: int | None = None, vocab_size: int = 4096) -> Path:
    """Build (or reuse) the demo corpus of `modality` in `out_dir`; returns its directory.

    `size`: speech = number of utterances (default ~1.2 h of audio), image = ignored (the whole
    digits set), text = ignored. `vocab_size`: text BPE vocabulary size.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_demo_dir(modality)
    params: dict[str, Any] = {"modality": modality, "seed": seed, "format": DEMO_FORMAT}
    if modality == "speech":
        params["utterances"] = DEFAULT_SPEECH_UTTERANCES if size is None else size
        if params["utterances"] < 3:
            raise DataError(f"demo speech size={size}: need at least 3 utterances (one per split)")
        return _build_atomically(out_dir, params, force, lambda tmp, final: build_speech(
            tmp, final, seed, params["utterances"]))
    if modality == "image":
        return _build_atomically(out_dir, params, force, lambda tmp, final: build_image(tmp, seed))
    if modality == "text":
        params["vocab_size"] = vocab_size
        return _build_atomically(out_dir, params, force,
                                 lambda tmp, final: build_text(tmp, seed, vocab_size))
    raise DataError(f"no demo data for modality {modality!r}; choose speech, image or text")


def _split_sizes(n: int) -> tuple[int, int, int]:
    """80/10/10 with at least one valid and one test item when n >= 3."""
    n_valid = max(1, round(n * SPLIT_FRACTIONS[1])) if n >= 3 else 0
    n_test = max(1, round(n * SPLIT_FRACTIONS[2])) if n >= 3 else 0
    return n - n_valid - n_test, n_valid, n_test


def _assign_splits(n: int, rng: np.random.Generator) -> list[str]:
    """A seeded split name for each of n items."""
    n_train, n_valid, _ = _split_sizes(n)
    names = ["train"] * n_train + ["valid"] * n_valid
    names += ["test"] * (n - len(names))
    order = rng.permutation(n)
    out = [""] * n
    for rank, item in enumerate(order):
        out[item] = names[rank]
    return out


# ------------------------------------------------------------------------------------ speech --

SPEECH_RATE = 16_000
VOICES = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland")  # file names: 'en-gb' does not exist
VARIANTS = tuple(f"+f{i}" for i in range(1, 6)) + tuple(f"+m{i}" for i in range(1, 8))
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PHRASE_WORDS = (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "open", "close",
    "start", "red", "green", "blue", "yellow", "black", "white", "cat", "dog", "bird", "house",
    "tree", "water", "light", "small", "large", "fast", "slow", "hello", "good", "morning",
    "night", "please", "thank", "you", "what", "where", "when", "turn", "move", "play", "call",
    "home", "music", "door", "window", "table", "chair", "book", "paper", "number", "letter",
)
DEFAULT_SPEECH_UTTERANCES = 2400
"""About 1.2 hours at the mean clip length (~1.76 s)."""
SPEECH_WORKERS = 2
SPEECH_CHUNK = 50
"""Clips per fresh worker process. eSpeak carries state from one utterance to the next (pitch
flutter phase, echo buffers) even across espeak_Terminate, so a clip is reproducible only as
the n-th utterance of a fresh process: chunks of fixed index ranges, one new process each, make
clip i a function of (seed, i) whatever the corpus size or number of workers."""


def utterance_spec(seed: int, index: int) -> dict[str, Any]:
    """Words, voice, rate, pitch and noise of utterance `index`: a function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    if rng.random() < 0.7:  # spoken digit strings: the labelled task is which digits occur
        words = [DIGITS[d] for d in rng.integers(0, 10, size=int(rng.integers(3, 11)))]
    else:
        words = [PHRASE_WORDS[w] for w in rng.integers(0, len(PHRASE_WORDS),
                                                       size=int(rng.integers(2, 6)))]
    voice = VOICES[rng.integers(len(VOICES))] + VARIANTS[rng.integers(len(VARIANTS))]
    noisy = rng.random() < 0.5
    return {"words": words, "voice": voice, "rate": int(rng.integers(120, 221)),
            "pitch": int(rng.integers(20, 81)), "snr_db": float(rng.uniform(25, 40)) if noisy
            else None, "noise_seed": int(rng.integers(2**31))}


def synthesise(spec: dict[str, Any]) -> np.ndarray:
    """Speak one utterance spec at 16 kHz: float32 (S,) in [-1, 1).

    Bit-exact only as the same n-th call of a fresh process (see ``SPEECH_CHUNK``).
    """
    from scipy.signal import resample_poly

    from data2vec.data.espeak import engine

    tts = engine()
    pcm = tts.synth(" ".join(spec["words"]), spec["voice"], spec["rate"], spec["pitch"],
                    rand_seed=spec["noise_seed"])
    common = math.gcd(tts.sample_rate, SPEECH_RATE)  # 22,050 -> 16,000 Hz is 320 / 441
    wav = resample_poly(pcm.astype(np.float32) / 32768.0, SPEECH_RATE // common,
                        tts.sample_rate // common).astype(np.float32)
    if spec["snr_db"] is not None:  # mild white noise at 25-40 dB SNR
        power = float(np.mean(wav**2)) + 1e-12
        noise = np.random.default_rng(spec["noise_seed"]).standard_normal(wav.shape[0])
        wav = wav + (noise * np.sqrt(power / 10 ** (spec["snr_db"] / 10))).astype(np.float32)
    return np.clip(wav, -1.0, 32767 / 32768)


def _write_utterance(job: tuple[Path, int, int]) -> int:
    """Synthesise utterance `index` into `path`; returns its length in samples."""
    import soundfile as sf

    path, seed, index = job
    wav = synthesise(utterance_spec(seed, index))
    sf.write(path, wav, SPEECH_RATE, subtype="PCM_16")
    return int(wav.shape[0])


def _write_chunk(jobs: list[tuple[Path, int, int]]) -> list[int]:
    """Synthesise consecutive utterances in this (fresh) process; their lengths in samples."""
    return [_write_utterance(job) for job in jobs]


def _fresh_processes() -> BaseContext:
    """forkserver: cheap forks of a clean server that never touched eSpeak nor torch's threads
    (preloaded with the synthesis imports); spawn where forkserver does not exist."""
    if "forkserver" not in get_all_start_methods():
        return get_context("spawn")
    context = get_context("forkserver")
    context.set_forkserver_preload(["data2vec.data.demo", "scipy.signal", "soundfile"])
    return context


def letters(words: list[str]) -> str:
    """fairseq .ltr form: ``T H R E E | O N E |`` (letters spaced, ``|`` ends each word)."""
    return " ".join(" ".join(w.upper()) + " |" for w in words)


def build_speech(tmp: Path, final: Path, seed: int, num_utterances: int) -> None:
    """Synthesise `num_utterances` clips with a pool of processes; manifests name `final`."""
    splits = _assign_splits(num_utterances, np.random.default_rng([seed, 1]))
    for split in SPLITS:
        (tmp / split).mkdir()
    rel = [f"{splits[i]}/{i:06d}.wav" for i in range(num_utterances)]
    jobs = [(tmp / r, seed, i) for i, r in enumerate(rel)]
    chunks = [jobs[i:i + SPEECH_CHUNK] for i in range(0, len(jobs), SPEECH_CHUNK)]
    with ProcessPoolExecutor(min(SPEECH_WORKERS, len(chunks)), mp_context=_fresh_processes(),
                             max_tasks_per_child=1) as pool:  # a new process for every chunk
        sizes = [n for chunk in pool.map(_write_chunk, chunks) for n in chunk]
    for split in SPLITS:
        items = [i for i in range(num_utterances) if splits[i] == split]
        words = [utterance_spec(seed, i)["words"] for i in items]
        with open(tmp / f"{split}.tsv", "w") as tsv:
            tsv.write(f"{final}\n")
            tsv.writelines(f"{rel[i]}\t{sizes[i]}\n" for i in items)
        (tmp / f"{split}.wrd").write_text("".join(" ".join(w).upper() + "\n" for w in words))
        (tmp / f"{split}.ltr").write_text("".join(letters(w) + "\n" for w in words))


# ------------------------------------------------------------------------------------- image --

IMAGE_SIZE = 32


def build_image(tmp: Path, seed: int) -> None:
    """scikit-learn's 1,797 digits, bicubic-upsampled to 32x32 grey PNGs, stratified 80/10/10."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
    labels = digits.target
    rng = np.random.default_rng([seed, 2])
    for label in range(10):
        items = np.flatnonzero(labels == label)
        for index, split in zip(items, _assign_splits(len(items), rng), strict=True):
            folder = tmp / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels[index], mode="L")
            image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC).save(
                folder / f"{index:04d}.png")


# -------------------------------------------------------------------------------------- text --

TEXT_FAMILIES: dict[str, tuple[str, ...]] = {
    "files": ("os", "os.path", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp",
              "stat", "zipfile", "tarfile"),
    "formats": ("json", "csv", "configparser", "tomllib", "plistlib", "base64", "binascii",
                "struct", "pickle", "html", "html.parser", "xml.etree.ElementTree",
                "xml.dom.minidom"),
    "functional": ("collections", "collections.abc", "itertools", "functools", "operator",
                   "heapq", "bisect", "contextlib"),
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "codecs"),
    "numbers": ("math", "cmath", "statistics", "fractions", "decimal", "random", "numbers"),
    "time": ("datetime", "time", "calendar", "zoneinfo", "sched"),
    "concurrency": ("threading", "queue", "multiprocessing", "concurrent.futures", "asyncio",
                    "subprocess", "selectors"),
    "network": ("urllib.parse", "urllib.request", "http.client", "http.server", "http.cookies",
                "socket", "email.message", "ipaddress", "smtplib"),
}
"""Standard-library modules (all free of import side effects) grouped into labelled families."""
TEXT_EXTRA_MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "bz2", "cmd", "code", "codeop", "colorsys", "contextvars",
    "copy", "dataclasses", "dis", "doctest", "email.parser", "enum", "getopt", "gettext",
    "graphlib", "gzip", "hashlib", "hmac", "imaplib", "importlib", "inspect", "io", "logging",
    "lzma", "mailbox", "mimetypes", "optparse", "pdb", "pkgutil", "platform", "poplib", "pprint",
    "pydoc", "reprlib", "secrets", "shlex", "socketserver", "sqlite3", "symtable", "sysconfig",
    "timeit", "tokenize", "trace", "traceback", "tracemalloc", "types", "typing", "unittest",
    "uuid", "warnings", "wave", "weakref", "xmlrpc.client", "zlib",
)
"""Further modules whose docstrings only feed the unlabelled corpus."""
MIN_WORDS = 8  # shorter docstrings ("Return self==value.") carry no prose


def normalise_document(text: str) -> str:
    """Paragraphs (blank-line separated) each on one line, whitespace collapsed, no blank lines."""
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n".join(p for p in paragraphs if p)


def _owned(obj: Any, module: str) -> bool:
    """Whether `obj` is defined by `module` (or its C accelerator / submodules), not re-exported."""
    owner = getattr(obj, "__module__", None) or ""
    base = owner.lstrip("_")
    return base == module or base.startswith(module + ".") or (module == "os" and owner == "posix")


def _docstrings(module_name: str) -> Iterator[str]:
    """Module, public function, class and own-method docstrings of one module, in name order."""
    module = importlib.import_module(module_name)
    yield inspect.getdoc(module) or ""
    for name in sorted(dir(module)):
        with warnings.catch_warnings():  # deprecated aliases (typing.io) warn on access
            warnings.simplefilter("ignore")
            obj = getattr(module, name, None)
        if name.startswith("_") or not (inspect.isclass(obj) or callable(obj)):
            continue
        if not _owned(obj, module_name):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            doc = inspect.getdoc(obj) or ""
        yield doc
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                doc = getattr(member, "__doc__", None)
                if not member_name.startswith("_") and callable(member) and isinstance(doc, str):
                    yield inspect.cleandoc(doc)


def collect_text_documents() -> tuple[list[str], list[tuple[str, str]]]:
    """(unlabelled documents, [(family, docstring)]): pydoc topics and docstrings, de-duplicated."""
    from pydoc_data.topics import topics

    seen: set[str] = set()

    def keep(doc: str) -> bool:
        if len(doc.split()) < MIN_WORDS or doc in seen:
            return False
        seen.add(doc)
        return True

    topic_docs = [d for d in (normalise_document(topics[k]) for k in sorted(topics)) if keep(d)]
    unlabelled = topic_docs + [d for m in TEXT_EXTRA_MODULES
                               for d in map(normalise_document, _docstrings(m)) if keep(d)]
    family_of: dict[str, set[str]] = {}
    ordered: list[str] = []
    for family, modules in TEXT_FAMILIES.items():
        for module_name in modules:
            for doc in map(normalise_document, _docstrings(module_name)):
                if doc not in family_of:
                    ordered.append(doc)
                family_of.setdefault(doc, set()).add(family)
    # A docstring found in two families (shared helpers) would be an ambiguous label: drop it.
    labelled = [(next(iter(family_of[d])), d) for d in ordered
                if len(family_of[d]) == 1 and keep(d)]
    # Extra-module docstrings were seen first, so a family docstring equal to one is dropped.
    return unlabelled, labelled


def build_text(tmp: Path, seed: int, vocab_size: int) -> None:
    """Document-split LM corpus, the labelled family task and a BPE vocabulary on train.txt."""
    from data2vec.data.tokenizer import BPETokenizer

    unlabelled, labelled = collect_text_documents()
    rng = np.random.default_rng([seed, 3])
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    rows: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for doc, split in zip(unlabelled, _assign_splits(len(unlabelled), rng), strict=True):
        by_split[split].append(doc)
    for family in TEXT_FAMILIES:  # stratified: every family in every split
        members = [doc for fam, doc in labelled if fam == family]
        for doc, split in zip(members, _assign_splits(len(members), rng), strict=True):
            by_split[split].append(doc)
            rows[split].append((family, doc))
    for split in SPLITS:
        docs = [by_split[split][i] for i in rng.permutation(len(by_split[split]))]
        (tmp / f"{split}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        order = rng.permutation(len(rows[split]))
        lines = (f"{rows[split][i][0]}\t{' '.join(rows[split][i][1].split())}\n" for i in order)
        (tmp / f"{split}.labelled.tsv").write_text("".join(lines), encoding="utf-8")
    BPETokenizer.train([tmp / "train.txt"], vocab_size, tmp / "tokenizer")


__all__ = ["DEFAULT_SPEECH_UTTERANCES", "SPEECH_RATE", "TEXT_FAMILIES", "collect_text_documents",
           "default_demo_dir", "letters", "normalise_document", "prepare_demo", "synthesise",
           "utterance_spec"]
