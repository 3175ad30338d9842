"""Attack registry, the same shape as the strategy and backbone registries (timm style)."""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
from typing import Any

from medtune.errors import ConfigError, did_you_mean, unknown_name_error

__all__ = ["register_attack", "create_attack", "list_attacks"]

_ATTACKS: dict[str, type] = {}


def register_attack(name: str):
    """Class decorator registering an attack under ``name`` (snake_case, as in YAML and the CLI).

    Raises:
        ValueError: ``name`` is already registered (a programming error, not a user error).
    """

    def decorator(cls: type) -> type:
        if name in _ATTACKS:
            raise ValueError(
                f"Attack {name!r} is already registered by {_ATTACKS[name].__module__}."
            )
        _ATTACKS[name], cls.name = cls, name
        return cls

    return decorator


def create_attack(name: str, **params: Any) -> Any:
    """Build the attack registered as ``name`` with its keyword parameters.

    Raises:
        ConfigError: unknown name (lists close matches and all names), or invalid parameters.
    """
    if name not in _ATTACKS:
        raise unknown_name_error("attack", name, _ATTACKS)
    cls = _ATTACKS[name]
    signature = inspect.signature(cls).parameters.values()
    accepted = [p.name for p in signature if p.name != "self" and p.kind is not p.VAR_KEYWORD]
    if hasattr(cls, "params_type"):  # an attack that takes its parameter object's fields as keywords
        accepted += [f.name for f in dataclasses.fields(cls.params_type)]
    for key in params:
        if key not in accepted:
            raise ConfigError(
                f"Unknown parameter {key!r} of attack {name!r}.{did_you_mean(key, accepted)} "
                f"Available: {', '.join(accepted)}."
            )
    return cls(**params)


def list_attacks(pattern: str = "*") -> list[str]:
    """Sorted registered attack names matching a shell-style ``pattern``."""
    return sorted(n for n in _ATTACKS if fnmatch.fnmatchcase(n, pattern))
