"""One registry per swappable kind (methods, benchmarks, model sources, loggers).

A config group option names an entry with its ``name`` key; an unknown name fails with the list of
valid ones, before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Generic, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value or input, reported before any heavy work starts."""


class Registry(Generic[T]):
    def __init__(self, kind: str, config_key: str):
        self.kind = kind
        self.config_key = config_key  # the key a user sets, for error messages
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(f"Unknown {self.kind} '{name}' ({self.config_key}). Valid: {', '.join(self.names())}")
        return self._entries[name]

    def build(self, cfg: dict):
        """Instantiate the dataclass named by ``cfg['name']`` with the other keys as its fields."""
        options = dict(cfg)
        cls = self.get(options.pop("name", None))
        group = self.config_key.split(".")[0]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"{self.kind} '{cfg['name']}' has no option(s) {', '.join(f'{group}.{k}' for k in unknown)}; "
                f"valid: {', '.join(sorted(known)) or '(none)'}"
            )
        return cls(**options)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


METHODS: Registry = Registry("method", "method.name")
BENCHMARKS: Registry = Registry("benchmark", "benchmark.name")
MODEL_SOURCES: Registry = Registry("model source", "model.source")
LOGGERS: Registry = Registry("logger", "logger.name")


def load_all() -> None:
    """Import the modules whose classes register themselves."""
    from anchorcoder import benchmarks, methods, tracking  # noqa: F401
    from anchorcoder.models import loading  # noqa: F401
