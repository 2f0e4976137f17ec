"""Typed, validated loading of TOML into frozen dataclasses.

Each config section is a frozen dataclass that lives beside the stage it configures (the trigger
policy's section is in device/trigger.py, the uplink's in device/uplink.py ...). This module only
knows how to turn a TOML table into such a dataclass: it rejects unknown keys, checks every value
against the field's annotation, and names the file, the dotted key, the bad value and what was
expected. A dataclass may validate further in ``__post_init__`` by raising ``ValueError``; the
message is wrapped with the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from edgekeeper.errors import ConfigError

T = TypeVar("T")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is Path:
        return "a path (string)"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin is dict:
        return f"a table of {_describe(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return getattr(tp, "__name__", str(tp))


class FieldValueError(ValueError):
    """A ``__post_init__`` refusal of one field: reported under that field's key with its value
    (a plain ValueError names the whole section)."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        super().__init__(expected)
        self.field, self.value, self.expected = field, value, expected


class _Bad(Exception):
    def __init__(self, key: str, value: Any, expected: str) -> None:
        self.key, self.value, self.expected = key, value, expected


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except _Bad:
                continue
        raise _Bad(key, value, _describe(tp))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Bad(key, value, _describe(tp))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Bad(key, value, _describe(tp))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Bad(key, value, _describe(tp))
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Bad(key, value, _describe(tp))
    if tp is Path:
        if isinstance(value, (str, Path)) and str(value):
            return Path(value).expanduser()
        raise _Bad(key, value, _describe(tp))
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise _Bad(key, value, _describe(tp))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Bad(key, value, _describe(tp))
        (item,) = get_args(tp)[:1]
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _Bad(key, value, _describe(tp))
        _, vt = get_args(tp)
        return {str(k): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _Bad(key, value, _describe(tp))
        return _build(tp, value, key)
    raise TypeError(f"settings: unsupported annotation {tp!r} at {key}")


def _build(cls: Any, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise _Bad(
            f"{prefix + '.' if prefix else ''}{unknown[0]}",
            data[unknown[0]],
            f"no such key in {where}; known keys: {', '.join(sorted(fields))}",
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(hints[name], value, key)
    for name, f in fields.items():
        # A section left out is built here too, so a default it refuses (device.id is the host
        # name) is reported under its own key.
        if name not in kwargs and f.default_factory is hints[name]:
            kwargs[name] = _build(hints[name], {}, f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except FieldValueError as err:
        key = f"{prefix}.{err.field}" if prefix else err.field
        raise _Bad(key, err.value, err.expected) from err
    except ValueError as err:
        raise _Bad(prefix or "(top level)", data, str(err)) from err


def build(cls: type[T], data: dict[str, Any], *, source: str, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; raise ConfigError naming ``source`` and the key."""
    try:
        return typing.cast(T, _build(cls, data, prefix))
    except _Bad as bad:
        shown = bad.value if not isinstance(bad.value, dict) else "{...}"
        raise ConfigError(
            f"{source}: key '{bad.key}' = {shown!r} is not valid: expected {bad.expected}",
            fix=f"edit '{bad.key}' in {source} (see docs/configuration.md)",
        ) from None


def override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'``, creating tables on the way."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def coerce_env(tp: Any, raw: str) -> Any:
    """Turn an environment variable's text into a TOML-like value for field type ``tp``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else str
    if tp is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        return raw
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            return raw
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            return raw
    return raw
