"""Help text of a config field from its one home: the class docstring's ``Attributes:`` section,
the field's default and the class's ``CHOICES``. The CLI's flag help is built here, so it cannot
drift from the config."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from medtune.strategies.spec import StrategySpec

__all__ = ["field_docs", "field_default", "field_choices", "flag_help", "format_value"]

_ENTRY = re.compile(r"^(?P<names>[A-Za-z_][\w, ]*):\s*(?P<text>.*)$")


@lru_cache(maxsize=None)
def _docs(cls: type) -> dict[str, str]:
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's entry wins
        lines = (klass.__dict__.get("__doc__") or "").expandtabs().splitlines()
        try:
            start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
        except StopIteration:
            continue
        indent = len(lines[start]) - len(lines[start].lstrip())
        entry_indent, names = None, []
        for line in lines[start + 1:]:
            if not line.strip():
                continue
            level = len(line) - len(line.lstrip())
            if level <= indent:  # the next section (Raises:, Example:) or the end
                break
            entry_indent = entry_indent if entry_indent is not None else level
            match = _ENTRY.match(line.strip()) if level == entry_indent else None
            if match:
                names = [n.strip() for n in match["names"].split(",") if n.strip()]
                for name in names:
                    out[name] = match["text"].strip()
            else:
                for name in names:
                    out[name] += " " + line.strip()
    return out


def field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` sections of ``cls`` and its bases (Google style;
    ``a, b: text`` documents both), with reST markup reduced to plain text."""
    return {k: re.sub(r":\w+:`~?([^`]+)`", r"\1", v).replace("``", "") for k, v in _docs(cls).items()}


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``cls`` (``dataclasses.MISSING`` when it has none)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def field_choices(cls: type) -> Mapping[str, tuple]:
    """The fixed value sets of the fields of ``cls`` (its ``CHOICES`` class attribute)."""
    return getattr(cls, "CHOICES", {})


def format_value(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, StrategySpec):
        return str(value)
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value) if value else "none"
    if value is None:
        return "none"
    return str(value)


def flag_help(cls: type, name: str, *, default: Any = dataclasses.MISSING, doc: str | None = None) -> str:
    """``description (choices: a, b; default: x)`` of field ``name`` of ``cls``; ``default`` overrides
    the field's own (e.g. a sweep flag whose default is the base run's). ``%`` is escaped for argparse."""
    text = doc if doc is not None else field_docs(cls).get(name, "")
    choices = field_choices(cls).get(name)
    value = field_default(cls, name) if default is dataclasses.MISSING else default
    tail = []
    if choices:
        tail.append("choices: " + ", ".join(map(str, choices)))
    if value is not dataclasses.MISSING:
        tail.append("default: " + format_value(value))
    text = text.rstrip().rstrip(".")
    if tail:
        text = f"{text} ({'; '.join(tail)})" if text else "; ".join(tail)
    return text.replace("%", "%%")
