"""Pieces both families use: strict top-level key checks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from omni_export.errors import ConfigError


def check_keys(d: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(allowed)}")


def require(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: required key {key!r} is missing")
    return d[key]
