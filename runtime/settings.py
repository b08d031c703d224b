"""Dataclass settings from YAML mappings, with errors that name the offending key.

Both daemons read YAML into nested dataclasses; this is the one place that does the checking, so
``edge.yaml`` and ``cloud.yaml`` report a typo the same way: ``limits.max_sesions: unknown key``.

Every settings dataclass validates itself the same way: it subclasses :class:`Settings` and
overrides :meth:`Settings.validate`, which raises ``ValueError("key: why")`` naming the key relative
to itself. It runs on construction (so settings built in code are checked too), hence at load, and
:func:`from_mapping` puts the YAML path in front: ``autoplan.objective: must be one of latency,
throughput; got 'fastest'``. A check that needs a value from a parent (``limits`` against
``max_workers``) lives in the parent's ``validate`` and names the child's key (``limits.max_streams``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

#: ``log_level`` values (any case), as :mod:`logging` names them.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range; the message names it."""


class Settings:
    """Base of every settings dataclass: :meth:`validate` runs when an instance is built."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError("key: why")``, ``key`` relative to this class, for the first bad value."""


def revalidate(settings: Settings, where: str = "") -> None:
    """Validate ``settings`` again, nested settings first, after code changed fields (command-line flags).

    Raises:
        SettingsError: naming the first bad key by its YAML path (``batching.max_batch_size: ...``).
    """
    for f in dataclasses.fields(settings):  # every Settings subclass is a dataclass
        value = getattr(settings, f.name)
        path = f"{where}.{f.name}" if where else f.name
        if isinstance(value, Settings):
            revalidate(value, path)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, Settings):
                    revalidate(item, f"{path}[{i}]")
    try:
        settings.validate()
    except ValueError as exc:
        raise SettingsError(_named(where, str(exc))) from None


def require(ok: bool, key: str, what: str, value: Any) -> None:
    """Raise ``ValueError("key: must be WHAT; got VALUE")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{key}: must be {what}; got {value!r}")


def one_of(key: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError("key: must be one of A, B; got VALUE")`` unless ``value`` is a choice."""
    choices = tuple(choices)
    require(value in choices, key, "one of " + ", ".join(map(str, choices)), value)


def positive(owner: object, *keys: str) -> None:
    """Raise ``ValueError`` naming the first of ``owner``'s ``keys`` that is not > 0."""
    for key in keys:
        require(getattr(owner, key) > 0, key, "> 0", getattr(owner, key))


def non_negative(owner: object, *keys: str) -> None:
    """Raise ``ValueError`` naming the first of ``owner``'s ``keys`` that is below 0."""
    for key in keys:
        require(getattr(owner, key) >= 0, key, ">= 0", getattr(owner, key))


def host_port(key: str, value: Any) -> None:
    """Raise ``ValueError("key: ...")`` unless ``value`` is ``host:port`` (``[v6]:port``), port 0..65535.

    gRPC binds what it is given: port 99999 wraps to 34463, a missing port means 443 and -1 means 65535.
    """
    host, sep, port = str(value).rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{key}: {value!r} is not host:port with a port in 0..65535 (e.g. 127.0.0.1:50051)")


def parse_shape(text: str, key: str = "--input-shape") -> list[int]:
    """``1,3,224,224`` -> ``[1, 3, 224, 224]``; a ``ValueError`` naming ``key`` unless every part is an int > 0."""
    try:
        dims = [int(part) for part in str(text).split(",")]
    except ValueError:
        dims = []
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"{key}: {text!r} is not a shape: integers > 0, comma-separated (e.g. 1,3,224,224)")
    return dims


def within(prefix: str, check: Callable[[], None]) -> None:
    """Run ``check``; a ``ValueError`` it raises comes out with ``prefix`` in front of its key."""
    try:
        check()
    except ValueError as exc:
        raise ValueError(_named(prefix, str(exc))) from None


_KEYED = re.compile(r"[A-Za-z_][\w.\[\]]*: ")


def _named(where: str, message: str) -> str:
    """``message`` (``"key: why"``, or a sentence) under the YAML path ``where``."""
    if not where or message.startswith(where + "."):
        return message
    return f"{where}.{message}" if _KEYED.match(message) else f"{where}: {message}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path``."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SettingsError(f"config {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:  # a typo in the file: where it is, not a parser's traceback
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SettingsError(f"config {path}: not valid YAML{where}: {problem}") from None
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
        return cls(**kwargs)  # a Settings subclass validates itself here
    except TypeError as exc:  # a required field is missing
        raise SettingsError(f"{where or cls.__name__}: {exc}") from exc
    except ValueError as exc:
        raise SettingsError(_named(where, str(exc))) from exc


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
