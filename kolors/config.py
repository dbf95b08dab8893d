"""Read a component's diffusers `config.json` into its frozen dataclass.

Each component (text encoder, UNet, VAE, scheduler) declares the fields it uses as a frozen dataclass;
this module fills one from the JSON file and ignores the keys the component does not use, so the same
code runs the tiny test models and the full model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from kolors.errors import KolorsError

T = TypeVar("T")


class ConfigError(KolorsError):
    """A config file that is missing, unreadable or lacks a field the component needs."""


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON ({e}); re-download the model") from None


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build dataclass `cls` from `data`, keeping only its fields; lists become tuples (frozen, hashable).
    Every value is checked against its field's type hint here, and its range by the class's __post_init__;
    either failure is one ConfigError naming `source` and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data and data[f.name] is not None:
            value = data[f.name]
            value = tuple(value) if isinstance(value, list) else value
            if not _matches(value, hints[f.name]):
                raise ConfigError(f"{source}: {f.name} must be {_describe(hints[f.name])}, not {value!r}")
            kwargs[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source} lacks the field '{f.name}' that {cls.__name__} needs")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def check_positive(config, *names: str) -> None:
    """Each named field (or each entry of a tuple field) is a finite number > 0, else a ConfigError naming it."""
    for name in names:
        value = getattr(config, name)
        for v in value if isinstance(value, tuple) else (value,):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name}={value!r} must be greater than 0")


def check_groups(config, channels: str, groups: str) -> None:
    """Group norm: every entry of `channels` divisible by `groups`."""
    for c in getattr(config, channels):
        if c % getattr(config, groups):
            raise ConfigError(
                f"{groups}={getattr(config, groups)} must divide every {channels} {getattr(config, channels)}"
            )


def _matches(value, hint) -> bool:
    """Whether a JSON value fits a type hint: int, float, bool, str, None, tuples and unions of them."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is tuple or origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return True
    return True


def _describe(hint) -> str:
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "text", type(None): "null"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is tuple or typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        plural = {int: "whole numbers", float: "numbers", bool: "true/false values", str: "texts"}
        return f"a list of {plural.get(args[0], _describe(args[0]))}" if args else "a list"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def load_config(cls: type[T], path: str | Path) -> T:
    """Read `path` (a config.json) into dataclass `cls`."""
    return from_dict(cls, read_json(path), source=str(path))
