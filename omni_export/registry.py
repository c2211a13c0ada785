"""A tiny name -> object registry; CLI choices come from these, never from if-ladders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from omni_export.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = item
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        return lambda item: self.register(name, item)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


class ClassRegistry(Generic[T]):
    """Values keyed by class, looked up along the MRO: a subclass inherits its base's entry."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[type, T] = {}

    def register(self, *classes: type) -> Callable[[T], T]:
        def deco(item: T) -> T:
            for cls in classes:
                self._items[cls] = item
            return item

        return deco

    def __setitem__(self, cls: type, item: T) -> None:
        self._items[cls] = item

    def __delitem__(self, cls: type) -> None:
        del self._items[cls]

    def find(self, obj: object) -> T | None:
        for cls in type(obj).__mro__:
            if cls in self._items:
                return self._items[cls]
        return None

    def lookup(self, obj: object) -> T:
        found = self.find(obj)
        if found is not None:
            return found
        raise KeyError(f"no {self.kind} registered for {type(obj).__name__}")
