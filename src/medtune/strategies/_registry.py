"""Strategy registry: names are the same snake_case strings in Python, YAML, the CLI and the store."""

from __future__ import annotations

import fnmatch
from typing import Any

from medtune.config import parse_strategy_spec
from medtune.errors import ConfigError, unknown_name_error

__all__ = ["register_strategy", "create_strategy", "list_strategies", "get_strategy_class"]

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


def create_strategy(spec: str, **params: Any):
    """Build a strategy from a spec like ``"top_k:2"`` plus keyword parameters.

    Raises:
        ConfigError: unknown strategy or invalid parameters.
    """
    name, spec_params = parse_strategy_spec(spec)
    cls = get_strategy_class(name)
    main = spec_params.pop("_main", None)
    if main is not None:
        if cls.main_param is None:
            raise ConfigError(f"Strategy {name!r} takes no positional parameter; got {spec!r}.")
        spec_params[cls.main_param] = main
    merged = {**spec_params, **params}
    return cls(**merged)
