"""Named extension points: a registry maps the name a config uses to the class that implements it.

Aggregation rules, their factor rules and dropout variants register themselves where they are
defined (`fedlodrop.lora`), by decorating their class; the config key they serve
(`federation.aggregation`, ...) is checked against the registry by `fedlodrop.run.settings`, and
tests and docs take the names from it. A second class under a name already taken is refused: a
plug-in cannot silently replace a built-in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> classes for one config key, in registration order."""

    def __init__(self, key: str):
        self.key = key  # the config key whose values are these names
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make `cls` choosable as `<key>: <cls.name>`."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__} has no `name` to register under {self.key}")
        if name in self._classes:
            raise ValueError(f"{self.key} {name!r} is registered already (by "
                             f"{self._classes[name].__module__}.{self._classes[name].__qualname__})")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __getitem__(self, name: str) -> type[T]:
        return self._classes[name]

    def items(self):
        """(name, class) pairs, in registration order."""
        return self._classes.items()

    def unknown(self, name: str) -> str | None:
        """The one-line complaint about `name`, or None if it is registered."""
        if name in self._classes:
            return None
        return f"unknown {self.key} {name!r}; choose one of: {', '.join(self._classes)}"

    def make(self, name: str, *args, **kwargs) -> T:
        """An instance of the class registered as `name` (ValueError naming the choices if none is)."""
        problem = self.unknown(name)
        if problem:
            raise ValueError(problem)
        return self._classes[name](*args, **kwargs)

    def where(self, test: Callable[[type[T]], bool]) -> list[str]:
        """The names whose class passes `test` (e.g. the rules central DP can protect)."""
        return [name for name, cls in self._classes.items() if test(cls)]
