"""Strategy registry: names are the same snake_case strings in Python, YAML, the CLI and the store."""

from __future__ import annotations

import fnmatch
from medtune.errors import ConfigError, unknown_name_error

__all__ = ["register_strategy", "list_strategies", "get_strategy_class"]

_STRATEGIES: dict[str, type] = {}


def register_strategy(name: str):
    """Class decorator registering a :class:`~medtune.strategies.base.Strategy` under ``name``."""

    def decorator(cls):
        if name in _STRATEGIES:
            raise ValueError(f"Strategy {name!r} is already registered by {_STRATEGIES[name].__module__}.")
        _STRATEGIES[name] = cls
        cls.name = name
        return cls

    return decorator


def list_strategies(pattern: str = "*") -> list[str]:
    """Registered strategy names matching a glob ``pattern``, sorted."""
    return sorted(n for n in _STRATEGIES if fnmatch.fnmatch(n, pattern))


def get_strategy_class(name: str) -> type:
    """The class registered as ``name``.

    Raises:
        ConfigError: unknown name (with the closest match and the full list).
    """
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise unknown_name_error("strategy", name, _STRATEGIES) from None
