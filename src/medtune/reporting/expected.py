"""Published numbers beside measured ones: a preset's ``expected:`` table and its verdicts.

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


def _tolerance(sd: float | None, tol: Mapping[str, float]) -> float:
    return max(tol["sd_factor"] * sd, tol["min_points"]) if sd is not None else tol["min_points"]


def _config_key(record: Mapping[str, Any]) -> str:
    """A run's configuration without its seed (the seeds of one configuration are averaged)."""
    from medtune.config import NON_SEMANTIC_FIELDS

    cfg = {k: v for k, v in (record.get("config") or {}).items() if k not in NON_SEMANTIC_FIELDS and k != "seed"}
    return json.dumps(cfg, sort_keys=True, default=str)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not len(arr):
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan


def compare_expected(runs: Iterable[Mapping[str, Any]], tables: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """One row per cell of every table: published, measured (mean and SD over seeds, in %), Δ, verdict.

    Args:
        runs: finished run records (``ResultsStore.runs()``).
        tables: table name → a :func:`parse_expected` table.
    """
    runs = [r for r in runs if r.get("status", "done") in (None, "done") and isinstance(r.get("config"), Mapping)]
    rows = []
    for name, table in tables.items():
        size_field, tol = table["size_field"], table["tolerance"]
        for cell in table["cells"]:
            matching = [r for r in runs if str(r.get("dataset", "")).lower() == cell["dataset"]
                        and r["config"].get("arch") == cell["arch"] and r["config"].get("strategy") == cell["strategy"]
                        and r["config"].get(size_field) == cell["size"]]
            groups: dict[str, list] = {}
            for r in matching:
                groups.setdefault(_config_key(r), []).append(r)
            row = {"table": name, **{k: cell[k] for k in ("dataset", "arch", "strategy", "size")},
                   "acc_published": cell["acc"], "acc_published_sd": cell["acc_sd"],
                   "auc_published": cell["auc"], "auc_published_sd": cell["auc_sd"],
                   "acc_tolerance": _tolerance(cell["acc_sd"], tol), "auc_tolerance": _tolerance(cell["auc_sd"], tol),
                   "num_configs": len(groups), "note": cell["note"]}
            if not groups:
                rows.append({**row, "num_seeds": 0, "acc_measured": None, "acc_measured_sd": None, "acc_delta": None,
                             "auc_measured": None, "auc_measured_sd": None, "auc_delta": None, "verdict": "not run"})
                continue
            # several configurations in one cell (an LR grid): the best mean validation AUC is compared
            best = max(groups.values(), key=lambda g: np.nan_to_num(
                _mean_sd([(r.get("val_metrics") or {}).get("auc") for r in g])[0], nan=-np.inf))
            outside = []
            for metric, key in (("acc", "accuracy"), ("auc", "auc")):
                mean, sd = _mean_sd([100 * (r.get("metrics") or {}).get(key, math.nan) for r in best])
                published = cell[metric]
                delta = mean - published if published is not None and math.isfinite(mean) else None
                row[f"{metric}_measured"] = mean if math.isfinite(mean) else None
                row[f"{metric}_measured_sd"] = sd if math.isfinite(sd) else None
                row[f"{metric}_delta"] = delta
                if published is not None and (delta is None or abs(delta) > row[f"{metric}_tolerance"]):
                    outside.append(metric.upper())
            row["num_seeds"] = len(best)
            row["verdict"] = "within" if not outside else f"outside ({', '.join(outside)})"
            rows.append(row)
    return [{k: row.get(k) for k in EXPECTED_COLUMNS} for row in rows]


def _pct(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")


def runs_first(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The cells with runs first, then those not run, each in the table's order."""
    return sorted(rows, key=lambda r: r["verdict"] == "not run")


def expected_table_cells(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows of text) of :func:`compare_expected`'s rows, as the report and the CLI show them."""
    header = ["dataset", "arch", "strategy", "size", "ACC published", "ACC measured", "Δ ACC", "AUC published",
              "AUC measured", "Δ AUC", "seeds", "tolerance (ACC/AUC)", "verdict"]
    out = []
    for r in rows:
        out.append([r["dataset"], r["arch"], r["strategy"], str(r["size"]),
                    _pct(r["acc_published"], r["acc_published_sd"]), _pct(r["acc_measured"], r["acc_measured_sd"]),
                    "—" if r["acc_delta"] is None else f"{r['acc_delta']:+.2f}",
                    _pct(r["auc_published"], r["auc_published_sd"]), _pct(r["auc_measured"], r["auc_measured_sd"]),
                    "—" if r["auc_delta"] is None else f"{r['auc_delta']:+.2f}",
                    str(r["num_seeds"]), f"±{r['acc_tolerance']:.2f} / ±{r['auc_tolerance']:.2f}", r["verdict"]])
    return header, out


def format_expected(rows: Sequence[Mapping[str, Any]], tables: Mapping[str, Mapping[str, Any]]) -> str:
    """Plain-text table of :func:`compare_expected`'s rows (``medtune results --expected``)."""
    if not rows:
        return "no expected table in this store (run a sweep from a preset that carries one, e.g. medmnist_plus)"
    header, cells = expected_table_cells(runs_first(rows))
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = []
    for name, table in tables.items():
        lines.append(f"{name}: {table['source']}  (values in %, measured = mean ± SD over seeds; "
                     f"within = |Δ| ≤ max({table['tolerance']['sd_factor']:g} × published SD, "
                     f"{table['tolerance']['min_points']:g} points))")
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    counts = {v: sum(1 for r in rows if r["verdict"].startswith(v)) for v in ("within", "outside", "not run")}
    lines.append(f"{counts['within']} within, {counts['outside']} outside, {counts['not run']} not run "
                 f"of {len(rows)} published cells")
    return "\n".join(lines)
