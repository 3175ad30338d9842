"""A preset's ``expected:`` table of published numbers: its schema and validation (the comparison with
measured runs is :mod:`medtune.reporting.expected`).

A literature preset may carry the paper's results as an ``expected:`` table (dataset × arch ×
strategy × size → ACC and AUC in %, with their seed SD where published). A sweep run from it
writes the table into its results store (``meta`` key ``expected:NAME``), so ``medtune report`` and
``medtune results --expected`` show, per cell, the published value, the measured mean over seeds,
the difference and a verdict: *within* when |measured − published| ≤ max(``sd_factor`` × the
published SD, ``min_points``) for both metrics (default: max(2 × SD, 1.5 points)); cells of the table
that the store has no run for are listed as *not run*.

Where several configurations of the store fall in one cell (an LR grid), the one with the best mean
validation AUC is compared (selection never reads the test split).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from medtune.errors import ConfigError, did_you_mean, short_repr

__all__ = ["parse_expected", "compare_expected", "format_expected", "EXPECTED_COLUMNS"]

SIZE_FIELDS = ("medmnist_size", "img_size")
_TABLE_KEYS = ("source", "size_field", "tolerance", "cells")
_CELL_KEYS = ("dataset", "arch", "strategy", "size", "acc", "auc", "acc_sd", "auc_sd", "note")
_TOLERANCE_KEYS = ("sd_factor", "min_points")
#: The columns of ``compare_expected``'s rows (``--format csv/json`` of ``medtune results --expected``).
EXPECTED_COLUMNS = ("table", "dataset", "arch", "strategy", "size", "num_seeds", "acc_published", "acc_published_sd",
                    "acc_measured", "acc_measured_sd", "acc_delta", "acc_tolerance", "auc_published",
                    "auc_published_sd", "auc_measured", "auc_measured_sd", "auc_delta", "auc_tolerance", "verdict",
                    "num_configs", "note")


def _number(value: Any, where: str, *, lo: float = 0.0, hi: float = 100.0, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
        raise ConfigError(f"{where} must be a number in [{lo:g}, {hi:g}]; got {short_repr(value)}.")
    return float(value)


def _keys(mapping: Any, allowed: Sequence[str], where: str) -> Mapping[str, Any]:
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where} must be a mapping; got {type(mapping).__name__}.")
    for key in mapping:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {short_repr(key)}.{did_you_mean(str(key), list(allowed))} "
                              f"Valid keys: {', '.join(allowed)}.")
    return mapping


def parse_expected(table: Any, *, where: str = "expected") -> dict[str, Any]:
    """A validated, normalised ``expected:`` table (plain data, JSON-able).

    Args:
        table: ``{source: str, size_field: medmnist_size|img_size, tolerance: {sd_factor, min_points},
            cells: [{dataset, arch, strategy, size, acc, auc, acc_sd?, auc_sd?, note?}, ...]}``; ACC, AUC
            and SDs in percent.
        where: how messages name the table.

    Raises:
        ConfigError: a missing or unknown key, or a value out of range (named).
    """
    t = _keys(table, _TABLE_KEYS, where)
    size_field = t.get("size_field", "medmnist_size")
    if size_field not in SIZE_FIELDS:
        raise ConfigError(f"{where}.size_field must be one of {', '.join(SIZE_FIELDS)}; got {short_repr(size_field)}.")
    tol = _keys(t.get("tolerance") or {}, _TOLERANCE_KEYS, f"{where}.tolerance")
    tolerance = {"sd_factor": _number(tol.get("sd_factor", 2.0), f"{where}.tolerance.sd_factor", hi=100),
                 "min_points": _number(tol.get("min_points", 1.5), f"{where}.tolerance.min_points")}
    cells_in = t.get("cells")
    if not isinstance(cells_in, list) or not cells_in:
        raise ConfigError(f"{where}.cells must be a non-empty list of {{dataset, arch, strategy, size, acc, auc}}.")
    cells, seen = [], set()
    for i, cell in enumerate(cells_in):
        w = f"{where}.cells[{i}]"
        c = _keys(cell, _CELL_KEYS, w)
        missing = [k for k in ("dataset", "arch", "strategy", "size") if k not in c]
        if missing or ("acc" not in c and "auc" not in c):
            raise ConfigError(f"{w}: missing {', '.join(missing) or 'acc/auc'}; a cell names dataset, arch, strategy, "
                              "size and its published acc and/or auc (%).")
        for k in ("dataset", "arch", "strategy"):
            if not isinstance(c[k], str) or not c[k].strip():
                raise ConfigError(f"{w}.{k} must be a non-empty text; got {short_repr(c[k])}.")
        if isinstance(c["size"], bool) or not isinstance(c["size"], int) or not 16 <= c["size"] <= 2048:
            raise ConfigError(f"{w}.size must be an image size in pixels (16 … 2048); got {short_repr(c['size'])}.")
        from medtune.strategies.spec import StrategySpec

        out = {"dataset": c["dataset"].strip().lower(), "arch": c["arch"].strip(),
               "strategy": str(StrategySpec.parse(c["strategy"])), "size": int(c["size"]),
               "acc": _number(c.get("acc"), f"{w}.acc", optional=True),
               "auc": _number(c.get("auc"), f"{w}.auc", optional=True),
               "acc_sd": _number(c.get("acc_sd"), f"{w}.acc_sd", optional=True),
               "auc_sd": _number(c.get("auc_sd"), f"{w}.auc_sd", optional=True),
               "note": str(c.get("note") or "")}
        key = (out["dataset"], out["arch"], out["strategy"], out["size"])
        if key in seen:
            raise ConfigError(f"{w}: the cell {key} is listed twice; keep one.")
        seen.add(key)
        cells.append(out)
    return {"source": str(t.get("source") or ""), "size_field": size_field, "tolerance": tolerance, "cells": cells}


def load_tables(raw: Mapping[str, Any], *, where: str) -> dict[str, dict[str, Any]]:
    """Validate the tables a results store holds (untrusted input); one that does not validate is
    skipped with a warning naming it."""
    import warnings

    from medtune.errors import MedtuneError

    out = {}
    for name, table in raw.items():
        try:
            out[name] = parse_expected(table, where=f"{where}: expected table {name!r}")
        except (MedtuneError, ValueError, TypeError) as exc:
            warnings.warn(f"{exc} It is skipped.\nHINT: run the preset's sweep again to rewrite it.", stacklevel=2)
    return out
