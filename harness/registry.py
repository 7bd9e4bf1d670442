"""Names -> classes, the one registry API of every method family: structured metrics, masking
methods, remedies, depth methods. A family's classes register with `@register("name")` in the
modules of one package (or one module), imported on first lookup. `build` refuses an unknown name
or an unknown parameter with the accepted ones named."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Generic, TypeVar

from harness.checks import ConfigError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str, key: str):
        """`kind`: what the classes are, for messages; `package`: where they register; `key`: the
        config key that names one (its parameters are `<key>.params`)."""
        self.kind, self.package, self.key = kind, package, key
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
        for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
            importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self._load_all()
        return sorted(self.classes)

    def get(self, name: str) -> T:
        self._load_all()
        if name not in self.classes:
            raise ConfigError(f"{self.key}={name!r} is not a known {self.kind}; accepted: {', '.join(sorted(self.classes))}")
        return self.classes[name]

    def build(self, name: str, params: dict | None = None):
        """An instance of `name` with its `params`."""
        cls = self.get(name)
        params = dict(params or {})
        accepted = parameters(cls)
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ConfigError(f"{self.key}.params.{unknown[0]} is not a parameter of {self.key}={name}; accepted: "
                              + (", ".join(accepted) if accepted else f"none ({name} takes no parameters)"))
        return cls(**params)


def parameters(cls: type) -> list[str]:
    """The keyword parameters a class's constructor names."""
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
