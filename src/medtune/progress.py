"""Progress of the long steps (decoding, feature extraction, audit passes, DEFT generations, predict,
explain): one helper, three behaviours.

- On a terminal (stderr is a TTY): a tqdm bar, drawn once the step has taken ``DELAY_S`` seconds
  (a step that ends sooner draws nothing), left on the screen at its end state.
- Not on a terminal (a log file, CI, a pipe): one line per step (``desc: 3/15 pass (20%) fooling 0.41``),
  from the first step after ``DELAY_S`` seconds and at most one per 5% of the total (a step of one
  image each is not a line each), so a log shows long work without flooding.
- Quiet (``medtune --quiet``, a run's ``progress: false``, ``MEDTUNE_PROGRESS=0``): nothing.

``MEDTUNE_PROGRESS_DELAY`` sets ``DELAY_S`` (seconds, default 2). Callers use::

    with progress_bar(total, "decode", unit="img") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO

__all__ = ["progress_bar", "quiet", "scope", "is_enabled", "DELAY_S"]

#: Seconds a step runs before its progress shows (``MEDTUNE_PROGRESS_DELAY``).
DELAY_S = 2.0

_quiet = False  # the whole process (medtune --quiet)
_shown: ContextVar[bool] = ContextVar("medtune_progress_shown", default=True)  # this thread's run (progress: false)


def is_enabled() -> bool:
    """Whether progress shows: not ``--quiet``, not inside a ``progress: false`` run, not ``MEDTUNE_PROGRESS=0``."""
    return not _quiet and _shown.get() and \
        os.environ.get("MEDTUNE_PROGRESS", "1").strip().lower() not in ("0", "false", "off", "no")


def quiet(flag: bool = True) -> None:
    """Silence (or, with False, allow again) progress for the rest of the process (``medtune --quiet``)."""
    global _quiet
    _quiet = bool(flag)


@contextmanager
def scope(show: bool) -> Iterator[None]:
    """Within the block (in this thread or task: a context variable) progress shows only if it did
    outside and ``show`` (a run's ``progress`` field): a scope can silence, never un-silence ``--quiet``."""
    token = _shown.set(_shown.get() and bool(show))
    try:
        yield
    finally:
        _shown.reset(token)


def _delay() -> float:
    try:
        return max(0.0, float(os.environ.get("MEDTUNE_PROGRESS_DELAY", DELAY_S)))
    except ValueError:
        return DELAY_S


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Lines(_Silent):
    """One line per step on a stream that is not a terminal (at most ``LINES`` lines and the last)."""

    LINES = 20

    def __init__(self, total: int | None, desc: str, unit: str, stream: IO[str], delay: float) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.n, self.postfix, self.start, self.delay = 0, "", time.monotonic(), delay
        self.shown = None  # the count at the last line

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.start < self.delay:
            return
        if self.total and self.shown is not None and self.n < self.total and \
                self.n - self.shown < self.total / self.LINES:
            return
        self.shown = self.n
        if self.total:
            line = f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            line = f"{self.desc}: {self.n} {self.unit}"
        line += f" {self.postfix}" if self.postfix else ""
        line += f" [{time.monotonic() - self.start:.0f}s]"
        try:
            print(line, file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed pipe never stops the work
            pass

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text


def progress_bar(total: int | None, desc: str, *, unit: str = "step", stream: IO[str] | None = None):
    """A progress bar for ``total`` steps of ``desc`` on ``stream`` (default stderr): tqdm on a terminal,
    one line per step otherwise, nothing when quiet (see the module). It has ``update(n)``,
    ``set_postfix_str(text)``, ``close()`` and is a context manager."""
    stream = stream if stream is not None else sys.stderr
    if not is_enabled() or stream is None:
        return _Silent()
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty:
        return _Lines(total, desc, unit, stream, _delay())
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=stream, delay=_delay(), leave=True, dynamic_ncols=True,
                mininterval=0.2)
