"""Named constructors: one table per option that both lists the allowed values of a setting and
builds the object a value names."""

from __future__ import annotations

from collections.abc import Callable


class Registry:
    """A table ``name → constructor`` for the values of one setting (``kind``, e.g. ``"loss"``).

    ``@registry.register("name")`` adds a constructor; :meth:`check` validates a value with an
    error listing the choices; :meth:`build` validates and calls the constructor.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name: str, constructor: Callable | None = None):
        """Add ``constructor`` under ``name`` (usable as a decorator); a name is added once."""
        def add(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = fn
            return fn

        return add(constructor) if constructor is not None else add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (e.g. a constructor a test or a notebook added)."""
        self.check(name)
        del self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def check(self, name) -> None:
        """``ValueError`` naming the setting and its choices when ``name`` is not registered."""
        if name not in self._entries:
            raise ValueError(f"{self.kind} must be one of {self.names()}, got {name!r}")

    def get(self, name) -> Callable:
        self.check(name)
        return self._entries[name]

    def build(self, name, *args, **kwargs):
        """Construct the object ``name`` stands for."""
        return self.get(name)(*args, **kwargs)


__all__ = ["Registry"]
