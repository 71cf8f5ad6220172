"""Typed configs: unknown keys and wrong types fail naming the key; overrides; presets load."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from data2vec.config import MODALITIES, Config, load_config, preset_path
from data2vec.configlib import from_dict, parse_overrides, to_dict
from data2vec.errors import ConfigError


@dataclass
class Inner:
    depth: int = 2
    rate: float = 0.1
    mode: str = "a"


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    pair: tuple[float, float] = (0.9, 0.98)
    name: str | None = None


def test_unknown_key_names_itself_and_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"key 'inner.dpeth'.*did you mean 'depth'"):
        from_dict(Outer, {"inner": {"dpeth": 3}})


@pytest.mark.parametrize("data,key", [({"inner": {"depth": "six"}}, "inner.depth"),
                                      ({"inner": {"depth": 2.5}}, "inner.depth"),
                                      ({"pair": [1, 2, 3]}, "pair"),
                                      ({"inner": {"rate": True}}, "inner.rate")])
def test_wrong_type_names_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        from_dict(Outer, data)


def test_values_convert_and_round_trip() -> None:
    obj = from_dict(Outer, {"inner": {"depth": 4, "rate": 1}, "pair": [0.5, 0.6], "name": None})
    assert obj.inner.depth == 4 and obj.inner.rate == 1.0 and isinstance(obj.inner.rate, float)
    assert obj.pair == (0.5, 0.6)
    assert from_dict(Outer, to_dict(obj)) == obj


def test_dotted_overrides_parse_yaml_values() -> None:
    assert parse_overrides(["a.b.c=3", "a.d=1e-3", "e=true", "f=[1, 2]", "g=hello"]) == {
        "a": {"b": {"c": 3}, "d": 1e-3}, "e": True, "f": [1, 2], "g": "hello"}
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["model.depth"])


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("size", ["tiny", "base", "large"])
def test_presets_load_and_round_trip(modality: str, size: str) -> None:
    cfg = load_config(modality, size)
    assert cfg.modality == modality and cfg.preset == f"{modality}_v1_{size}"
    assert from_dict(Config, to_dict(cfg)) == cfg


def test_paper_values_in_base_presets() -> None:
    speech = load_config("speech", "base")
    assert (speech.model.encoder.depth, speech.model.encoder.dim) == (12, 768)
    assert speech.model.objective.top_k == 8 and speech.model.objective.loss_beta == 0.0
    text = load_config("text", "base")
    assert text.model.objective.top_k == 10 and text.model.objective.loss_beta == 4.0
    image = load_config("image", "base")
    assert image.model.objective.top_k == 6 and image.model.encoder.layer_norm_first
    assert load_config("speech", "large").model.encoder.dim == 1024


def test_override_typo_and_bad_value_in_load_config() -> None:
    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        load_config("speech", "tiny", overrides=["model.encoder.depht=3"])
    with pytest.raises(ConfigError, match="'optim.lr'"):
        load_config("speech", "tiny", overrides=["optim.lr=fast"])
    with pytest.raises(ConfigError, match="top_k"):
        load_config("speech", "tiny", overrides=["model.objective.top_k=99"])
    assert load_config("speech", "tiny", overrides=["model.encoder.depth=6"]).model.encoder.depth \
        == 6
    with pytest.raises(ConfigError, match="needs a CLS token"):
        load_config("image", "base", overrides=["model.frontend.cls_token=false"])


def test_unknown_preset_lists_available(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="speech_v1_tiny"):
        preset_path("speech", "huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config("speech", "tiny", config_file=bad)


# ------------------------------------------------------------------- every field range-checked

ANY_INTEGER = {"run.seed"}  # every integer is a valid seed


def _numeric_leaves(cfg: Config) -> list[tuple[str, object]]:
    from data2vec.config import _leaves

    return [(key, value) for key, value in _leaves(cfg, "")
            if isinstance(value, int | float) and not isinstance(value, bool)
            and key != "version"]


def _override(cfg: Config, key: str, bad: str) -> str:
    """`key=bad`, or for one item of a tuple field the whole tuple with that item replaced."""
    if "[" not in key:
        return f"{key}={bad}"
    name, index = key[:-1].split("[")
    from data2vec.config import _leaves

    items = [str(v) for k, v in _leaves(cfg, "") if k.startswith(f"{name}[")]
    items[int(index)] = bad
    return f"{name}=[{', '.join(items)}]"


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("modality", MODALITIES)
def test_every_numeric_field_refuses_nan_and_absurd_values(modality: str, version: int) -> None:
    """No numeric field accepts NaN, infinity or -10⁹ (a rate, size, count, interval,
    probability or lr out of range): the error names the key, when the config is loaded."""
    cfg = load_config(modality, "tiny", version)
    leaves = _numeric_leaves(cfg)
    assert len(leaves) > 50
    for key, value in leaves:
        short = key.split(".")[-1].split("[")[0]
        candidates = [".nan", "-.inf", "-1000000000"] if isinstance(value, float) else [
            "-1000000000"]
        if key in ANY_INTEGER:
            continue
        for bad in candidates:
            with pytest.raises(ConfigError, match=short) as error:
                load_config(modality, "tiny", version, overrides=[_override(cfg, key, bad)])
            assert "\n" not in str(error.value)


@pytest.mark.parametrize("override,key", [
    ("optim.lr=0", "optim.lr"), ("optim.lr=-1e-3", "optim.lr"), ("optim.lr=nan", "optim.lr"),
    ("model.encoder.dropout=1.0", "model.encoder.dropout"),
    ("model.masking.mask_ratio=1.5", "model.masking.mask_ratio"),
    ("data.batch_size=0", "data.batch_size"), ("run.checkpoint_every=0", "run.checkpoint_every"),
    ("optim.warmup_fraction=2", "optim.warmup_fraction"),
    ("optim.final_lr_scale=0", "optim.final_lr_scale"),
    ("data.crop_scale=[0.5, 0.2]", "data.crop_scale"), ("optim.min_lr=1", "optim.min_lr")])
def test_values_out_of_range_fail_at_load_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config("image", "tiny", overrides=[override])


def test_string_fields_take_override_values_literally() -> None:
    cfg = load_config("image", "tiny", overrides=["data.path=ok #2", "data.tokenizer=2024",
                                                  "data.demo_dir=[a, b]"])
    assert (cfg.data.path, cfg.data.tokenizer, cfg.data.demo_dir) == ("ok #2", "2024", "[a, b]")
    assert parse_overrides(["data.path=ok #2"]) == {"data": {"path": "ok"}}  # plain YAML
