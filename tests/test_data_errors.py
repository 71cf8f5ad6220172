"""Bad input: each failure is one DataError line naming the file; skip_bad skips and counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from data2vec.data.audio import AudioDataset, read_manifest, write_manifest
from data2vec.data.images import ImageFolderDataset, open_image
from data2vec.data.text import load_documents
from data2vec.errors import DataError


def tone(path: Path, seconds: float, rate: int = 16_000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, rate, subtype="PCM_16")
    return wave


def one_line_naming(error: pytest.ExceptionInfo[DataError], path: Path) -> bool:
    message = str(error.value)
    return "\n" not in message and str(path) in message


# ---------------------------------------------------------------------------------------- audio --


def test_corrupt_audio_names_the_file(tmp_path: Path) -> None:
    tone(tmp_path / "good.wav", 1.0)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(200)))
    with pytest.raises(DataError) as error:
        AudioDataset.from_path(tmp_path)
    assert one_line_naming(error, bad)


def test_zero_length_audio_names_the_file(tmp_path: Path) -> None:
    tone(tmp_path / "good.wav", 1.0)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as error:
        AudioDataset.from_path(tmp_path)
    assert one_line_naming(error, empty)
    empty.unlink()
    no_frames = tmp_path / "no_frames.wav"
    sf.write(no_frames, np.zeros(0, dtype=np.float32), 16_000)  # a valid header, 0 samples
    with pytest.raises(DataError) as error:
        AudioDataset.from_path(tmp_path)
    assert one_line_naming(error, no_frames) and "empty" in str(error.value)


def test_wrong_sample_rate_fails_unless_resampled(tmp_path: Path) -> None:
    path = tmp_path / "slow.wav"
    source = tone(path, 0.5, rate=8_000, freq=200.0)
    with pytest.raises(DataError) as error:
        AudioDataset.from_path(tmp_path, sample_rate=16_000)
    assert one_line_naming(error, path)
    assert "8000" in str(error.value) and "16000" in str(error.value)
    ds = AudioDataset.from_path(tmp_path, sample_rate=16_000, resample=True, normalize=False)
    wave = ds[0].numpy()
    assert len(wave) == 2 * len(source) and ds.sizes[0] == len(wave)
    # the 200 Hz tone survives resampling: its spectrum peaks at 200 Hz at the new rate
    peak_hz = np.argmax(np.abs(np.fft.rfft(wave))) * 16_000 / len(wave)
    assert abs(peak_hz - 200.0) < 5.0
    assert abs(np.abs(wave).max() - np.abs(source).max()) < 0.02


def test_missing_manifest_entry_names_the_file(tmp_path: Path) -> None:
    tone(tmp_path / "a.wav", 1.0)
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{tmp_path}\na.wav\t16000\nmissing.wav\t16000\n")
    with pytest.raises(DataError) as error:
        read_manifest(manifest)
    assert one_line_naming(error, tmp_path / "missing.wav")
    with pytest.raises(DataError):
        AudioDataset.from_path(tmp_path, "train")


def test_corrupt_file_in_manifest_fails_up_front_or_on_load(tmp_path: Path) -> None:
    tone(tmp_path / "a.wav", 1.0)
    bad = tmp_path / "b.wav"
    bad.write_bytes(b"not audio at all")
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\na.wav\t16000\nb.wav\t16000\n")
    with pytest.raises(DataError) as error:  # every header is read when the manifest is
        AudioDataset.from_path(tmp_path, "train")
    assert one_line_naming(error, bad)
    checked = AudioDataset.from_path(tmp_path, "train", skip_bad=True)
    assert len(checked) == 1 and checked.skipped == {"unreadable": 1}
    # a FLAC whose header is fine but whose frames are cut: found only when it is decoded
    cut = tmp_path / "c.flac"
    sf.write(cut, np.random.default_rng(0).normal(0, 0.1, 16_000).astype(np.float32), 16_000)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\na.wav\t16000\nc.flac\t16000\n")
    ds = AudioDataset.from_path(tmp_path, "train")
    assert ds[0].shape == (16_000,)
    with pytest.raises(DataError) as error:
        ds[1]
    assert one_line_naming(error, cut) and error.value.reason == "unreadable"


def test_manifest_sample_counts_are_checked_against_the_files(tmp_path: Path) -> None:
    tone(tmp_path / "a.wav", 1.0)
    tone(tmp_path / "b.wav", 0.5)
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{tmp_path}\na.wav\t16000\nb.wav\t16000\n")  # b has 8000
    with pytest.raises(DataError) as error:
        AudioDataset.from_path(tmp_path, "train")
    assert one_line_naming(error, manifest) and "b.wav" in str(error.value)
    assert "8000" in str(error.value) and "16000" in str(error.value)
    ds = AudioDataset.from_path(tmp_path, "train", skip_bad=True)
    assert len(ds) == 1 and ds.skipped == {"size_mismatch": 1}
    manifest.write_bytes(f"{tmp_path}\na.wav\t16000\n".encode() + b"\xff\xfe.wav\t1\n")
    with pytest.raises(DataError) as error:
        AudioDataset.from_path(tmp_path, "train")
    assert one_line_naming(error, manifest) and "UTF-8" in str(error.value)


def test_skip_bad_audio_skips_and_counts(tmp_path: Path) -> None:
    for i in range(3):
        tone(tmp_path / f"ok{i}.wav", 1.0 + i)
    tone(tmp_path / "short.wav", 0.1)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.flac").write_bytes(b"fLaC" + bytes(64))
    ds = AudioDataset.from_path(tmp_path, skip_bad=True, min_sample_size=8_000)
    assert len(ds) == 3 and ds.skipped == {"empty": 1, "unreadable": 1, "short": 1}
    assert sorted(ds.sizes.tolist()) == [16_000, 32_000, 48_000]
    written = write_manifest(tmp_path, tmp_path / "manifests", skip_bad=True)
    root, entries = read_manifest(written[0])
    assert root == tmp_path and len(entries) == 4  # short files stay in a manifest
    with pytest.raises(DataError):
        write_manifest(tmp_path, tmp_path / "strict")


def test_multichannel_audio_is_averaged(tmp_path: Path) -> None:
    left = np.full(16_000, 0.5, dtype=np.float32)
    stereo = np.stack([left, -0.25 * np.ones_like(left)], axis=1)
    sf.write(tmp_path / "stereo.wav", stereo, 16_000, subtype="FLOAT")
    ds = AudioDataset.from_path(tmp_path, normalize=False)
    assert np.allclose(ds[0].numpy(), 0.125, atol=1e-6)


# --------------------------------------------------------------------------------------- images --


def write_png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), (value, value // 2, 255 - value)).save(path)


def test_corrupt_image_names_the_file_or_is_skipped(tmp_path: Path) -> None:
    write_png(tmp_path / "cat" / "a.png")
    write_png(tmp_path / "dog" / "b.png")
    bad = tmp_path / "dog" / "c.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 1, 1]
    with pytest.raises(DataError) as error:
        ds.load(2)
    assert one_line_naming(error, bad)
    skipping = ImageFolderDataset(tmp_path, skip_bad=True)
    assert len(skipping) == 2 and skipping.skipped == {"unreadable": 1}


def test_zero_length_image_names_the_file(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png")
    empty = tmp_path / "b.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as error:
        ImageFolderDataset(tmp_path)
    assert one_line_naming(error, empty)
    ds = ImageFolderDataset(tmp_path, skip_bad=True)
    assert len(ds) == 1 and ds.targets == [-1] and ds.skipped == {"empty": 1}


def test_cmyk_palette_alpha_and_16_bit_images_are_converted(tmp_path: Path) -> None:
    rgb = Image.new("RGB", (16, 16), (200, 100, 50))
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    rgb.convert("P").save(tmp_path / "palette.png")
    Image.new("LA", (16, 16), (90, 10)).save(tmp_path / "grey_alpha.png")
    deep = np.full((16, 16), 32768, dtype=np.uint16)  # half of the 16-bit range
    Image.fromarray(deep).save(tmp_path / "deep.png")
    cmyk = open_image(tmp_path / "cmyk.jpg", 3)
    assert cmyk.mode == "RGB"
    assert np.abs(np.asarray(cmyk, dtype=float).mean((0, 1)) - [200, 100, 50]).max() < 8
    assert np.asarray(open_image(tmp_path / "palette.png", 3)).shape == (16, 16, 3)
    assert np.asarray(open_image(tmp_path / "grey_alpha.png", 3))[0, 0].tolist() == [90, 90, 90]
    assert abs(float(np.asarray(open_image(tmp_path / "deep.png", 1)).mean()) - 128) <= 1


# ----------------------------------------------------------------------------------------- text --


def test_empty_text_file_names_the_file_or_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("First document line.\nSecond line.\n\nAnother doc.\n")
    empty = tmp_path / "b.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError) as error:
        load_documents(tmp_path)
    assert one_line_naming(error, empty)
    docs, skipped = load_documents(tmp_path, skip_bad=True)
    assert docs == [["First document line.", "Second line."], ["Another doc."]]
    assert skipped == {"empty": 1}


def test_non_utf8_text_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(DataError) as error:
        load_documents(bad)
    assert one_line_naming(error, bad)
