"""Name registries: recipes and checkpoints name methods, quantizers, formats and layer steps; a registry maps each
name to its implementation. Registering is a decorator; an unknown name is a one-line error listing the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from quantkit.errors import QuantkitError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """``name -> T`` for one kind of thing (``kind`` names it in errors)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        def wrap(item: T) -> T:
            self.add(name, item, replace=replace)
            return item

        return wrap

    def add(self, name: str, item: T, *, replace: bool = False) -> None:
        if name in self._items and not replace and self._items[name] is not item:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise QuantkitError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}") from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)


# The extension points. Each is filled by the modules that implement it (quantkit/algos, quantkit/quantizers,
# quantkit/formats, quantkit/calibration/collectors.py), imported by ``import quantkit``; a new one registers from
# anywhere, a test module included.
METHODS: Registry = Registry("method")  # rounding methods: name -> quantkit.algos.Method
QUANTIZERS: Registry = Registry("quantizer")  # name -> QuantizerSpec subclass (quantkit.quantizers)
FORMATS: Registry = Registry("format")  # name -> Format instance (quantkit.formats)
COLLECTORS: Registry = Registry("statistics collector")  # name -> Collector class (quantkit.calibration)
KV_METHODS: Registry = Registry("KV-cache method")  # name -> KVScheme subclass (quantkit.kvcache.scheme)

__all__ += ["METHODS", "QUANTIZERS", "FORMATS", "COLLECTORS", "KV_METHODS"]
