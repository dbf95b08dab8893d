"""Read a component's diffusers `config.json` into its frozen dataclass.

Each component (text encoder, UNet, VAE, scheduler) declares the fields it uses as a frozen dataclass;
this module fills one from the JSON file and ignores the keys the component does not use, so the same
code runs the tiny test models and the full model.
"""

from __future__ import annotations

import dataclasses
import json
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
    """Build dataclass `cls` from `data`, keeping only its fields; lists become tuples (frozen, hashable)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data and data[f.name] is not None:
            value = data[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source} lacks the field '{f.name}' that {cls.__name__} needs")
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path) -> T:
    """Read `path` (a config.json) into dataclass `cls`."""
    return from_dict(cls, read_json(path), source=str(path))
