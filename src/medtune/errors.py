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
    "TrainingError",
    "RunsFailedError",
    "short_repr",
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


class TrainingError(MedtuneError, RuntimeError):
    """A run cannot go on, e.g. its training loss became NaN or infinite (divergence)."""


class RunsFailedError(MedtuneError):
    """Some runs of a sweep failed; every other run finished and is stored.

    The CLI prints the one-line reason of each failed run and exits with status 1 (not 2: the
    configuration was valid and the sweep went on). ``records`` holds one record per run of the
    sweep (None for a failed or skipped run), ``failures`` the ``(run_id, reason)`` pairs.
    """

    exit_code = 1

    def __init__(self, message: str, *, records: list | None = None, failures: list | None = None) -> None:
        super().__init__(message)
        self.records = list(records or [])
        self.failures = list(failures or [])


class NotFittedError(MedtuneError, RuntimeError):
    """An object was used before it was fitted."""


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, so no message embeds an unbounded value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 15]}... ({len(text):,} chars)"


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""`` if none is close."""
    close = difflib.get_close_matches(str(name)[:200], list(choices), n=1, cutoff=0.6)
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
