"""Genome caches for the DEFT search: a mask is never trained twice at the same fidelity.

A cache maps a :func:`genome_key` (a SHA-256 hex digest of the mask, the fidelity dict and a
caller-provided context string) to a JSON-serialisable dict holding the raw evaluation.
:class:`~medtune.deft.driver.StoreGenomeCache` implements the same two-method protocol on the
results store's SQLite ``genomes`` table; the two classes here cover tests, notebooks and
single-machine runs that want a plain file.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from medtune._checks import param_error
from medtune.errors import StoreError

__all__ = ["GenomeCache", "InMemoryGenomeCache", "JsonlGenomeCache", "genome_key"]


@runtime_checkable
class GenomeCache(Protocol):
    """Key-value store of evaluated genomes.

    ``get`` returns ``None`` for an unknown key. ``put`` must make the value durable before it
    returns if the cache is meant to survive a crash (the search writes each evaluation as soon
    as it finishes, so a killed search loses at most the trainings in flight).
    """

    def get(self, key: str) -> dict | None: ...

    def put(self, key: str, value: dict) -> None: ...


def genome_key(mask: Sequence[int], fidelity: Mapping[str, Any] | None, context: str = "") -> str:
    """Return the cache key of a mask evaluated at a fidelity in a context.

    Args:
        mask: one 0/1 per searchable unit, input to output (head excluded).
        fidelity: the low-fidelity training settings (epochs, subset, ...); must be
            JSON-serialisable. ``None`` and ``{}`` give the same key.
        context: anything else the evaluation depends on, e.g. a data fingerprint, the
            architecture, the block/layer granularity and the training seed.

    Returns:
        A 64-character SHA-256 hex digest; equal inputs give equal keys across processes.

    Raises:
        ConfigError: if ``fidelity`` is not JSON-serialisable.
    """
    payload = {
        "mask": "".join(str(int(bit)) for bit in mask),
        "fidelity": dict(fidelity or {}),
        "context": str(context),
    }
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise param_error("fidelity", "DEFTSearch", "a JSON-serialisable dict of finite values", fidelity,
                          f" ({exc}) Use plain numbers, strings, lists and dicts.") from exc
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _dump_value(value: dict, where: str) -> str:
    try:
        # NaN is allowed: a diverged training has a NaN fitness and that is worth remembering.
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"Cannot store a genome evaluation in {where}: the value is not JSON-serialisable "
            f"({exc}). Keep Evaluation.info to plain numbers, strings, lists and dicts."
        ) from exc


class InMemoryGenomeCache:
    """A dict-backed :class:`GenomeCache`; it lives as long as the object (the default)."""

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def get(self, key: str) -> dict | None:
        """Return a copy of the stored value, or ``None``."""
        text = self._values.get(key)
        return None if text is None else json.loads(text)

    def put(self, key: str, value: dict) -> None:
        """Store a copy of ``value`` (JSON round-trip, so later mutations do not leak in).

        Raises:
            StoreError: if ``value`` is not JSON-serialisable.
        """
        self._values[key] = _dump_value(value, "the in-memory genome cache")

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        """Return the stored keys in insertion order."""
        return list(self._values)


class JsonlGenomeCache:
    """An append-only JSON-lines :class:`GenomeCache` that survives crashes and restarts.

    Each ``put`` appends one line ``{"key": ..., "value": ...}``, flushes and ``fsync``\\ s it
    before returning. On open, the whole file is read; a last line cut short by a crash (no
    trailing newline, or not valid JSON) is dropped with a warning and truncated away so the next
    append starts on a clean line. A later line for the same key wins. One writer per file: two
    processes appending to the same file at once may interleave lines.

    Args:
        path: the ``.jsonl`` file; created (with its parent folders) on the first ``put``.

    Raises:
        StoreError: if a line other than the last one is not a valid record (the file is
            corrupt, not merely cut short), or the file cannot be read or written.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._values: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise StoreError(f"Cannot read the genome cache {str(self.path)!r}: {exc}.") from exc
        lines = data.split(b"\n")
        # Everything after the last newline is an unterminated line: only a crash leaves one.
        complete, tail = lines[:-1], lines[-1]
        good_bytes = 0
        for line_idx, raw in enumerate(complete):
            record = self._parse(raw)
            if record is None:
                is_last = line_idx == len(complete) - 1 and not tail.strip()
                if not is_last:
                    raise StoreError(
                        f"The genome cache {str(self.path)!r} is corrupt at line {line_idx + 1}: "
                        f"expected a JSON object with 'key' and 'value', got {raw[:80]!r}. "
                        "Delete or repair that line; only a cut-short last line is tolerated."
                    )
                break
            if record is not False:
                key, value = record
                self._values[key] = _dump_value(value, repr(str(self.path)))
            good_bytes += len(raw) + 1
        if good_bytes != len(data):
            warnings.warn(
                f"The genome cache {str(self.path)!r} ends with a cut-short line "
                f"({len(data) - good_bytes} bytes, probably from a killed search); it was "
                "dropped.\n"
                "HINT: the genome on that line will be trained again.",
                stacklevel=3,
            )
            try:
                with open(self.path, "r+b") as fh:
                    fh.truncate(good_bytes)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise StoreError(
                    f"Cannot repair the genome cache {str(self.path)!r}: {exc}."
                ) from exc

    @staticmethod
    def _parse(raw: bytes) -> tuple[str, dict] | bool | None:
        """Return (key, value), ``False`` for a blank line, or ``None`` for an invalid line."""
        if not raw.strip():
            return False
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not (isinstance(record, dict) and isinstance(record.get("key"), str)
                and isinstance(record.get("value"), dict)):
            return None
        return record["key"], record["value"]

    def get(self, key: str) -> dict | None:
        """Return a copy of the stored value, or ``None``."""
        text = self._values.get(key)
        return None if text is None else json.loads(text)

    def put(self, key: str, value: dict) -> None:
        """Append ``value`` under ``key`` and make it durable before returning.

        Raises:
            StoreError: if ``value`` is not JSON-serialisable or the file cannot be written.
        """
        text = _dump_value(value, repr(str(self.path)))
        line = json.dumps({"key": key, "value": json.loads(text)}, sort_keys=True) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise StoreError(f"Cannot write the genome cache {str(self.path)!r}: {exc}.") from exc
        self._values[key] = text

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        """Return the stored keys in first-insertion order."""
        return list(self._values)
