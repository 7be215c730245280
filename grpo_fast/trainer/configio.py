"""Frozen config dataclasses from YAML files and ``--key value`` command-line overrides.

One rule everywhere: an unknown key is a ConfigError (a ValueError) that suggests the closest known
name (a typo in a config file must never be silently ignored), and every value is coerced to the
field's declared type (so ``learning_rate: 1e-4``, which YAML 1.1 reads as a string, still becomes a
float).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .trl_keys import TRL_ONLY_KEYS

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """A config file or command-line override the user can fix (the CLI prints it without a traceback)."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping stored in a YAML file (an empty file is an empty mapping).

    ``yaml.safe_load``: plain scalars, lists and mappings only. A tag that would build a Python object
    (``!!python/object/apply:os.system``) is a ConfigError, never a call, as is malformed YAML, and so is
    a key given twice in one mapping (YAML would silently keep the last), naming both lines.
    """
    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}; give the path of a YAML file")
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # safe_load that refuses a key given twice
        except _DuplicateKey as duplicate:
            raise ConfigError(f"{path}: {duplicate}; keep one") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not a plain YAML config (scalars, lists and mappings only): {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of key: value, got {type(data).__name__}")
    return data


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader whose mappings refuse a key given twice."""

    def construct_mapping(self, node, deep=False):
        lines: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in lines:
                raise _DuplicateKey(f"key {key!r} is given twice (lines {lines[key]} and {line})")
            if isinstance(key, typing.Hashable):
                lines[key] = line
        return super().construct_mapping(node, deep=deep)


def expand_path(path: str, name: str) -> str:
    """``path`` with ``~`` and ``$VAR`` / ``${VAR}`` expanded; ValueError naming ``name`` for an unset variable."""
    expanded = os.path.expandvars(os.path.expanduser(path))
    unset = re.search(r"\$\{?(\w+)", expanded)
    if unset:
        raise ValueError(f"{name} {path!r} uses ${unset.group(1)}, which is not set; set it or write the path out")
    return expanded


def unknown_key_error(key: str, known: typing.Iterable[str], source: str) -> ConfigError:
    """ConfigError for an unknown config key: a TRL option we lack is said to be one (never matched to a
    different key of ours); anything else gets the closest known key as a suggestion."""
    if key in TRL_ONLY_KEYS:
        return ConfigError(f"unknown config key {key!r} in {source}: {key!r} is a TRL option grpo_fast does not "
                           "have; remove it (grpo-fast train --help lists the keys grpo_fast has)")  # fmt: skip
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r} in {source}{hint}")


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """Resolved type hints of a dataclass' init fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls, data: dict[str, Any], source: str = "config"):
    """``cls(**data)`` with unknown keys rejected and values coerced to the field types."""
    types_ = field_types(cls)
    for key in data:
        if key not in types_:
            raise unknown_key_error(key, types_, source)
    values = {k: coerce(v, types_[k], k) for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:  # the dataclass' own validation
        raise ConfigError(f"{source}: {error}") from error


def check_field_types(config) -> None:
    """Every field of a config dataclass has its declared type (bool, int, float, str, ``X | None``,
    ``tuple[X, ...]``; ints are accepted as floats, bools never as numbers) and every float is finite.

    Raises:
        TypeError naming the field, the expected type and what was given; ValueError for NaN or inf.
    """
    for name, annotation in field_types(type(config)).items():
        _check_value(getattr(config, name), annotation, name)


def _check_value(value: Any, annotation: Any, name: str) -> None:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        (inner,) = [a for a in args if a is not type(None)]
        _check_value(value, inner, name)
        return
    if typing.get_origin(annotation) is tuple:
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{name} must be a tuple of {args[0].__name__}, got {type(value).__name__} {value!r}")
        for item in value:
            _check_value(item, args[0], name)
        return
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = {
        bool: isinstance(value, bool),
        int: number and isinstance(value, numbers.Integral),
        float: number,
        str: isinstance(value, str),
    }
    if annotation in ok and not ok[annotation]:
        raise TypeError(f"{name} must be {annotation.__name__}, got {type(value).__name__} {value!r}")
    if annotation is float and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def to_dict(config) -> dict[str, Any]:
    """Plain (YAML-safe) dict of a config dataclass; tuples become lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` (from YAML or a command-line string) as ``annotation``: bool, int, float, str,
    ``X | None`` and ``tuple[X, ...]`` are supported."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, name)
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return tuple(coerce(v, args[0], name) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{name} must be {annotation.__name__}, got {type(value).__name__} {value!r}")
        try:
            number = float(value) if annotation is float else int(str(value), 10)
        except ValueError:
            raise ConfigError(f"{name} must be {annotation.__name__}, got {value!r}") from None
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"config field {name} has a type the loader does not handle: {annotation}")


def parse_overrides(argv: list[str], known: typing.Iterable[str], source: str = "the command line") -> dict[str, str]:
    """``["--key", "value", "--flag=x", ...]`` -> {"key": "value", "flag": "x"}; dashes in keys become
    underscores. Values stay strings (``from_dict`` coerces them)."""
    known = list(known)
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value on {source}, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        if key not in known:
            raise unknown_key_error(key, known, source)
        out[key] = value
        i += 1
    return out
