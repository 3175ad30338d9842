"""Error hierarchy and the one message helper used everywhere.

User errors derive from :class:`MedtuneError`; the CLI prints them as one line and exits with
status 2, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "MedtuneError",
    "ConfigError",
    "DataError",
    "NotFittedError",
    "StoreError",
    "did_you_mean",
    "unknown_name_error",
]


class MedtuneError(Exception):
    """Base class of every error medtune raises for bad user input or state."""


class ConfigError(MedtuneError, ValueError):
    """A configuration value, CLI flag or API argument is invalid."""


class DataError(MedtuneError, ValueError):
    """A data file, folder or its content is invalid."""


class StoreError(MedtuneError):
    """The results store cannot be opened or written."""


class NotFittedError(MedtuneError, RuntimeError):
    """An object was used before it was fitted."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""`` if none is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_name_error(kind: str, name: str, choices: Iterable[str]) -> ConfigError:
    """Build the standard error for an unknown registry name.

    Example:
        ``ConfigError: Unknown strategy 'lpft'. Did you mean 'lp_ft'? Available: full, linear, ...``
    """
    choices = sorted(choices)
    return ConfigError(
        f"Unknown {kind} {name!r}.{did_you_mean(name, choices)} Available: {', '.join(choices)}."
    )
