"""Published numbers beside measured ones: the verdict per cell of a preset's ``expected:`` table
(:mod:`medtune.expected`) — *within* when |measured − published| ≤ max(``sd_factor`` × the published SD,
``min_points``) for both metrics, *not run* where the store has no run for a cell. Where several
configurations fall in one cell (an LR grid), the one with the best mean validation AUC is compared
(selection never reads the test split).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from medtune.config import NON_SEMANTIC_FIELDS
from medtune.expected import EXPECTED_COLUMNS, SIZE_FIELDS  # noqa: F401  (the CSV's columns)

def _tolerance(sd: float | None, tol: Mapping[str, float]) -> float:
    return max(tol["sd_factor"] * sd, tol["min_points"]) if sd is not None else tol["min_points"]


def _config_key(record: Mapping[str, Any]) -> str:
    """A run's configuration without its seed (the seeds of one configuration are averaged)."""
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
