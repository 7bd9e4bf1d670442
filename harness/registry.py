"""Names -> classes, filled by `@register("name")` in the modules of one package (metrics,
remedies), which are imported on first lookup; an unknown name's error lists the known ones."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str):
        self.kind, self.package = kind, package
        self.classes: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str):
        def wrap(cls: T) -> T:
            cls.name = name
            self.classes[name] = cls
            return cls

        return wrap

    def _load_all(self) -> None:
        if self._loaded:  # looked up per record and per plotted line: scan the package once
            return
        self._loaded = True
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self._load_all()
        return sorted(self.classes)

    def get(self, name: str) -> T:
        self._load_all()
        if name not in self.classes:
            raise ValueError(f"unknown {self.kind} {name!r}; accepted: {', '.join(sorted(self.classes))}")
        return self.classes[name]
