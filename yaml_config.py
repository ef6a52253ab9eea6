"""YAML files and `section.key=value` overrides -> nested config dataclasses, checked as they are filled.

train.py declares the dataclasses (every hyperparameter in one field) and the checks across fields; this module
holds the generic part: reading YAML with one-line errors, applying overrides (values parsed as YAML), and
filling the dataclasses with each value checked against the field's annotation (str, int, float, bool, list,
dict, tuple, X | None). Unknown keys name the valid ones.
"""
from __future__ import annotations

import dataclasses
import os
import typing

import yaml


class ConfigError(Exception):
    """A problem with the configuration, reported as one line without a traceback."""


def need(ok, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def coerce(value, tp, key):
    """Check `value` against the annotation `tp` (str, int, float, bool, dict, tuple, X | None)."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-7` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(tp)):
            raise ConfigError(f"{key}: expected a list of {len(typing.get_args(tp))} numbers, got {value!r}")
        return tuple(coerce(v, a, key) for v, a in zip(value, typing.get_args(tp)))
    expected = origin or tp
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def fill(dc, values: dict, prefix: str):
    hints = typing.get_type_hints(type(dc))
    names = [f.name for f in dataclasses.fields(dc)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key '{full}'; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                              f"{', '.join(names)}")
        current = getattr(dc, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a section (mapping), got {value!r}")
            fill(current, value, full + ".")
        else:
            setattr(dc, key, coerce(value, hints[key], full))


def parse_yaml(text, where: str):
    """yaml.safe_load, its multi-line errors turned into a one-line ConfigError."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or str(e).splitlines()[0]}{at}") from None


def read(path: str, overrides: list[str]) -> dict:
    """The YAML mapping of `path` with the overrides applied (each `a.b.c=value`, value parsed as YAML)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, "rb") as f:  # bytes: PyYAML reports bad UTF-8 as a YAMLError with a position
        raw = parse_yaml(f.read(), path)
    raw = {} if raw is None else raw
    need(isinstance(raw, dict), f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
            need(isinstance(node, dict), f"override '{item}': '{p}' is not a section")
        node[leaf] = parse_yaml(value, f"override '{item}'")
    return raw
