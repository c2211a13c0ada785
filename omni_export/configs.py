"""Frozen-dataclass configs that reject unknown keys instead of silently ignoring them."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from omni_export.errors import ConfigError

T = TypeVar("T")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table of keys, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where=where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is none of {[getattr(a, '__name__', str(a)) for a in args]}")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            out = [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
            return out if origin is list else tuple(out)
        return tuple(_convert(a, v, where) for a, v in zip(args, value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str | None = None) -> T:
    """Build ``cls`` from ``data``; unknown or missing keys are a ConfigError naming them."""
    where = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}. "
            "Fix the spelling or remove them."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: required key {name!r} is missing")
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass to plain JSON/TOML-friendly dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))


def json_schema(cls: type, title: str | None = None) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) for a frozen config dataclass, as ``from_dict`` reads it:
    unknown keys rejected, keys without a default required."""
    defs: dict[str, Any] = {}

    def of(tp: Any) -> dict[str, Any]:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any:
            return {}
        if dataclasses.is_dataclass(tp):
            name = tp.__name__
            if name not in defs:
                defs[name] = {}  # placeholder: recursion stops here
                hints = typing.get_type_hints(tp)
                fields = [f for f in dataclasses.fields(tp) if f.init]
                defs[name] = {
                    "type": "object", "additionalProperties": False,
                    **({"description": tp.__doc__.strip().splitlines()[0]} if tp.__doc__ else {}),
                    "properties": {f.name: of(hints[f.name]) for f in fields},
                    "required": [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING],
                }  # fmt: skip
            return {"$ref": f"#/$defs/{name}"}
        if origin in (typing.Union, types.UnionType):
            return {"anyOf": [of(a) for a in args]}
        if origin is dict:
            return {"type": "object", "additionalProperties": of(args[1])}
        if origin in (tuple, list):
            if origin is list or (len(args) == 2 and args[1] is Ellipsis):
                return {"type": "array", "items": of(args[0])}
            return {"type": "array", "prefixItems": [of(a) for a in args], "minItems": len(args), "maxItems": len(args)}
        simple = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
        return {"type": simple[tp]} if tp in simple else {}

    root = of(cls)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title or cls.__name__, **root, "$defs": defs}
