"""Frozen dataclass configs saved as JSON beside each artifact; unknown keys are rejected."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from brainrecon.errors import ConfigError
from brainrecon.io import read_json, write_json

T = TypeVar("T")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown keys for {cls.__name__}: {', '.join(unknown)} (expected a subset of {sorted(names)})"
        )
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            v = data[f.name]
            # JSON has no tuples; restore them where the dataclass default is a tuple.
            if isinstance(v, list) and isinstance(f.default, tuple):
                v = tuple(v)
            values[f.name] = v
    return cls(**values)


def save_config(cfg: Any, path: str | Path) -> None:
    write_json(path, {"type": type(cfg).__name__, **config_to_dict(cfg)})


def load_config(cls: type[T], path: str | Path) -> T:
    data = dict(read_json(path, f"{cls.__name__} config"))
    found_type = data.pop("type", cls.__name__)
    if found_type != cls.__name__:
        raise ConfigError(f"{path}: expected a {cls.__name__} config, found {found_type}")
    return config_from_dict(cls, data, source=str(path))


def changed_fields(saved: Any, current: Any, ignore: tuple[str, ...] = ()) -> list[str]:
    """Names of the dataclass fields whose values differ between two configs (e.g. a checkpoint's and a resume's)."""
    return [
        f.name
        for f in dataclasses.fields(current)
        if f.name not in ignore and getattr(saved, f.name) != getattr(current, f.name)
    ]
