"""One registry mechanism for everything st3 finds by name: methods (`st3.get`) and selectors
(`st3.selectors.get`). A class registers with a decorator; an old name can point to a new one for a release,
with a `DeprecationWarning` saying what to write instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Generic, TypeVar

from st3.knobs import unknown_knobs

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes of one kind by name: `register` (a decorator), `names`, `get` (an instance), `cls`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, T] = {}
        self._renamed: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: make the class findable as `name` (and set its `name` attribute)."""

        def wrap(cls: T) -> T:
            if name in self._classes or name in self._renamed:
                raise ValueError(f"{self.kind} name {name!r} is registered twice")
            cls.name = name
            self._classes[name] = cls
            return cls

        return wrap

    def rename(self, old: str, new: str) -> None:
        """Keep `old` working for one release as `new`, with a DeprecationWarning."""
        self._renamed[old] = new

    def names(self) -> list[str]:
        """The registered names (renamed ones left out)."""
        return sorted(self._classes)

    def cls(self, name: str) -> T:
        """The class registered as `name` (case-insensitive), or a ValueError listing the names."""
        key = str(name).lower()
        if key in self._renamed:
            new = self._renamed[key]
            warnings.warn(
                f"the {self.kind} {key!r} is now called {new!r}; the old name goes in the next release",
                DeprecationWarning,
                stacklevel=3,
            )
            key = new
        try:
            return self._classes[key]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}") from None

    def get(self, name: str, **knobs):
        """An instance of the class registered as `name`, built with `knobs` (an unknown knob is named)."""
        cls = self.cls(name)
        unknown_knobs(cls, knobs, name)
        return cls(**knobs)
