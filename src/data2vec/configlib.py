"""Typed dataclass configs from dicts / YAML, dotted overrides, errors that name the key.

The schema *is* the dataclasses: a key that is not a field fails with the closest field names,
a value of the wrong type fails naming the key, the expected type and the value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from data2vec.errors import ConfigError
from data2vec.files import read_text

T = TypeVar("T")

# A field whose type depends on another value (the modality) names a resolver in its metadata:
# ``field(metadata={"resolve": fn})`` where ``fn(parent_dict, root_dict) -> dataclass type``.
Resolver = Callable[[Mapping[str, Any], Mapping[str, Any]], type]


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; allowed: {', '.join(sorted(allowed))}"


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, root: Mapping[str, Any], resolved: type | None) -> Any:
    """Check and convert one value to the annotated type `tp`."""
    if resolved is not None:
        tp = resolved
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key, root, None)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # `X | None`: X's own error names the key at fault
            raise ConfigError(errors[0])
        raise ConfigError(f"config key '{key}': {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"config key '{key}': {value!r} is not one of {allowed}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}': expected {len(args)} items, got {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]", root, None) for i, (v, a) in
                         enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]", root, None) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping for {tp.__name__}, "
                              f"got {value!r}")
        return _build(tp, value, key, root)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp!r}")


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, root: Mapping[str, Any]) -> T:
    hints = get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in by_name:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key '{full}'{_suggest(str(key), list(by_name))}")
    kwargs = {}
    for name, f in by_name.items():
        full = f"{prefix}.{name}" if prefix else name
        resolver = f.metadata.get("resolve")
        resolved = resolver(data, root) if resolver else None
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], full, root, resolved)
        elif resolved is not None:
            kwargs[name] = _build(resolved, {}, full, root)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"config section '{prefix or '<root>'}': {e}") from None
    return obj


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build dataclass `cls` from a nested mapping, validating every key and type."""
    return _build(cls, data, "", data)


def to_dict(obj: Any) -> Any:
    """Nested plain-Python form of a config dataclass (tuples become lists), for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing, undecodable or malformed file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = read_text(path, ConfigError, "YAML config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return dict(data)


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    """One dataclass field as written in the source: name, type, default and docstring."""

    name: str
    type: str
    default: str
    doc: str


def field_docs(source: str | Path, class_name: str) -> list[FieldDoc]:
    """The fields of dataclass `class_name` in the Python file `source`, read with ``ast``
    (without importing it): attribute docstrings exist only in the source, and help text built
    this way costs no import of the module's dependencies."""
    import ast

    tree = ast.parse(Path(source).read_text(encoding="utf-8"))
    cls = next((n for n in ast.walk(tree)
                if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if cls is None:
        raise ConfigError(f"{source}: no class {class_name}")
    out: list[FieldDoc] = []
    body = cls.body
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        following = body[i + 1] if i + 1 < len(body) else None
        doc = ""
        if (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            doc = " ".join(following.value.value.split())
        default = ast.unparse(node.value) if node.value is not None else ""
        out.append(FieldDoc(node.target.id, ast.unparse(node.annotation), default, doc))
    return out


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def field_type(schema: type, keys: list[str], root: Mapping[str, Any]) -> Any:
    """The annotated type of the dotted field `keys` in dataclass `schema`, or None if unknown."""
    tp: Any = schema
    for key in keys:
        options = [a for a in get_args(tp) if a is not type(None)]
        if get_origin(tp) in (typing.Union, types.UnionType) and len(options) == 1:
            tp = options[0]  # an optional section (`X | None`): X's fields
        if not dataclasses.is_dataclass(tp):
            return None
        by_name = {f.name: f for f in dataclasses.fields(tp)}
        if key not in by_name:
            return None
        resolver = by_name[key].metadata.get("resolve")
        try:
            tp = resolver({}, root) if resolver else get_type_hints(tp)[key]
        except ConfigError:
            return None
    return tp


def parse_overrides(items: list[str], schema: type | None = None,
                    root: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``["model.encoder.depth=6", "optim.lr=1e-3"]`` -> nested dict (values read as YAML).

    With `schema` (a config dataclass), a value for a ``str`` field is taken literally, never
    parsed as YAML: ``data.path=ok #2`` is the folder ``ok #2`` and ``data.path=2024`` the
    folder ``2024``. `root` holds what resolves modality-dependent sections (``modality``).
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override '{item}': empty key in '{path}'")
        if schema is not None and field_type(schema, keys, root or {}) is str:
            value: Any = raw
        else:
            value = _yaml_value(raw)
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{key}' is set twice")
        node[keys[-1]] = value
    return out


def _yaml_value(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = float(value)
    return value
