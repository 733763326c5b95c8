"""Name -> implementation registries for the pluggable parts (pooling heads, sketch coders, losses).

A new part is one decorated class or function: ``@POOLING_HEADS.register("max")``. The config checks its
field against the registry's keys, the model builds the part by name from the config, and the tests
loop over the registry, so nothing else needs an edit. (A plain ``POOLING_HEADS["max"] = MaxHead``
works too: a registry is a dict.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Registry(dict[str, Any]):
    """A dict of named implementations with a `register` decorator and a clear error for unknown names.

    Args:
        field: The `TemdeConfig` field (or training setting) whose value picks an entry, for messages.
        name: The registry's importable name (e.g. ``"POOLING_HEADS"``), for messages.
    """

    def __init__(self, field: str, name: str) -> None:
        super().__init__()
        self.field, self.name = field, name

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding a class or function under `name` (a name is registered once)."""

        def add(obj: T) -> T:
            if name in self:
                raise ValueError(f"{self.field} {name!r} is already registered ({self[name]!r})")
            self[name] = obj
            return obj

        return add

    def check(self, value: Any, label: str | None = None) -> None:
        """Raise a `ValueError` naming the field (`label`, default ``TemdeConfig.<field>=<value>``), the value
        and the registered choices."""
        if value not in self:
            label = label or f"TemdeConfig.{self.field}={value!r}"
            raise ValueError(
                f"{label} is not supported; choose one of {', '.join(self)} "
                f"(or register your own with @{self.name}.register(name))"
            )
