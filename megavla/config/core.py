"""The one config system: dataclasses + YAML files + dotted CLI overrides.

A config is a tree of dataclasses. ``build(cls, mapping)`` turns a plain mapping (from YAML or
from overrides) into the tree, checking every key and value *before any work starts*: unknown keys
name the valid ones, ``Literal`` fields name their choices, and each dataclass may check its own
values in ``validate()``. Errors are :class:`ConfigError` with the dotted path of the field.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong. The message names the key, the problem and the fix."""


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"valid keys: {', '.join(sorted(valid))}.{hint}"


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check (and gently convert) one value against a type annotation."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not a valid choice; choose one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {args}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, k_tp, path): _coerce(v, v_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string; accept what float() accepts.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def build(cls: type, mapping: dict | None, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``mapping``; missing keys keep their defaults."""
    mapping = dict(mapping or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in mapping if k not in fields]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"unknown config key '{where}'; {_suggest(unknown[0], list(fields))}")
    kwargs = {}
    for name, value in mapping.items():
        sub = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(value, hints[name], sub)
    # Nested dataclass defaults that were not given still need to exist as objects.
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{path + ': ' if path else ''}{e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """A plain, YAML-safe mapping of a config tree."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a','b','c'], value parsed as YAML, so 0.5 is a float, true a bool)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like dotted.key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key part in '{key}'")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    return key.split("."), value


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(mapping: dict, overrides: list[str]) -> dict:
    out = dict(mapping)
    for text in overrides:
        keys, value = parse_override(text)
        node: dict = {}
        patch = node
        for k in keys[:-1]:
            node[k] = {}
            node = node[k]
        node[keys[-1]] = value
        out = merge(out, patch)
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    # `defaults: [other.yaml, ...]` lets a file build on others (paths relative to this file).
    bases = data.pop("defaults", []) or []
    merged: dict = {}
    for base in bases if isinstance(bases, list) else [bases]:
        merged = merge(merged, read_yaml(path.parent / base))
    return merge(merged, data)


def load(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Dataclass ``cls`` from a YAML file (optional; ``defaults:`` merged) and dotted overrides
    (applied last), keys and values checked by :func:`build`. Every config tree loads through here:
    the run config (megavla.config.load_config) and the experiment specs (megavla.eval.experiments)."""
    mapping = read_yaml(path) if path else {}
    return build(cls, apply_overrides(mapping, list(overrides)))


def write_yaml(obj: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
