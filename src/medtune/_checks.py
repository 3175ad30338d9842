"""Parameter validation: the one message template every config, strategy and attack uses.

``The 'eps' parameter of compute_uap must be a float in (0, 1]. Got 8 instead.`` — the parameter,
its owner, what was expected and what was received (sklearn's ``check_scalar`` style), raised as
:class:`~medtune.errors.ConfigError` when the object is built, before any training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from medtune.errors import ConfigError, did_you_mean, short_repr

__all__ = ["param_error", "check_scalar", "check_choice", "check_fraction", "check_positive_int", "Range", "check_fields"]


def param_error(name: str, owner: str, expected: str, value: Any, hint: str = "") -> ConfigError:
    """The ConfigError ``The {name!r} parameter of {owner} must be {expected}. Got {value!r} instead.{hint}``
    (the value's repr cut to 80 characters)."""
    return ConfigError(f"The {name!r} parameter of {owner} must be {expected}. Got {short_repr(value)} instead.{hint}")


def check_scalar(value: Any, name: str, kind: type | tuple[type, ...], *, min_val=None, max_val=None,
                 include_min: bool = True, include_max: bool = True, owner: str = "config") -> None:
    """Raise ConfigError unless ``value`` is of ``kind`` (bool is not an int), finite and inside the bounds."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok_type = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok_type:
        hint = ""
        if isinstance(value, str) and float in kinds:
            try:
                float(value)
                hint = " YAML 1.1 reads numbers like 1e-3 as text; write 1.0e-3 or 0.001."
            except ValueError:
                pass
        raise param_error(name, owner, "of type " + " or ".join(k.__name__ for k in kinds), value, hint)
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
        raise param_error(name, owner, "a finite number", value)
    if min_val is not None and (value < min_val or (not include_min and value == min_val)):
        raise param_error(name, owner, f"{'>=' if include_min else '>'} {min_val}", value)
    if max_val is not None and (value > max_val or (not include_max and value == max_val)):
        raise param_error(name, owner, f"{'<=' if include_max else '<'} {max_val}", value)


def check_choice(value: Any, name: str, choices: Sequence[Any], *, owner: str = "config") -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise param_error(name, owner, f"one of {', '.join(map(str, choices))}", value,
                          did_you_mean(str(value), [str(c) for c in choices]))


def check_fraction(value: Any, name: str, owner: str, *, low_open: bool = True) -> float:
    """Return ``value`` as a float in (0, 1] (or [0, 1] when ``low_open`` is False), else raise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        raise param_error(name, owner, f"a float in {'(0, 1]' if low_open else '[0, 1]'}", value)
    return float(value)


def check_positive_int(value: Any, name: str, owner: str) -> int:
    """Return ``value`` if it is an int >= 1, else raise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise param_error(name, owner, "an int >= 1", value)
    return int(value)


class Range(NamedTuple):
    """A numeric field's constraint as data (sklearn's ``Interval``): its type(s) and bounds."""

    kind: type | tuple[type, ...]
    min_val: float | None = None
    max_val: float | None = None
    include_min: bool = True


def check_fields(obj: Any, ranges: Mapping[str, Range], choices: Mapping[str, Sequence[Any]], *, owner: str) -> None:
    """Validate ``obj``'s fields against tables of ranges and of choices (one validator for a config's
    constraints, like sklearn's ``validate_parameter_constraints``)."""
    for name, r in ranges.items():
        check_scalar(getattr(obj, name), name, r.kind, min_val=r.min_val, max_val=r.max_val,
                     include_min=r.include_min, owner=owner)
    for name, allowed in choices.items():
        check_choice(getattr(obj, name), name, allowed, owner=owner)
