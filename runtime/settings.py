"""Dataclass settings from YAML mappings, with errors that name the offending key.

Both daemons read YAML into nested dataclasses; this is the one place that does the checking, so
``edge.yaml`` and ``cloud.yaml`` report a typo the same way: ``limits.max_sesions: unknown key``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class SettingsError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names it."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path``."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SettingsError(f"config {path}: {exc.strerror}") from exc
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise SettingsError(f"config {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses and lists of them."""
    if not isinstance(data, Mapping):
        raise SettingsError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise SettingsError(f"{path}: unknown key (expected one of {', '.join(sorted(fields))})")
        kwargs[key] = _convert(hints[key], value, path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a required field is missing, or the dataclass's own checks failed
        raise SettingsError(f"{where or cls.__name__}: {exc}") from exc


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path)
            except SettingsError as exc:
                errors.append(str(exc))
        raise SettingsError(errors[0] if errors else f"{path}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        if hasattr(hint, "from_dict"):
            try:
                return hint.from_dict(value)
            except (TypeError, ValueError) as exc:
                raise SettingsError(f"{path}: {exc}") from exc
        return from_mapping(hint, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{path}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise SettingsError(f"{path}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value
