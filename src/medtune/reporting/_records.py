"""Machinery shared by the report modules: turning plain record lists into tidy frames.

The report never talks to the results store. It takes the plain ``list[dict]`` records that
``ResultsStore.runs()``, ``.attacks()`` and ``.searches()`` return (written by
``medtune.runner``, ``medtune.robustness.driver`` and ``medtune.deft.driver``), so a report can
be rebuilt from a JSON dump, a store, or hand-made records in a test. The run keys it reads are
:data:`RUN_COLUMNS` plus ``metrics``, ``config``, ``versions``, ``data_fingerprint``,
``predictions`` and ``extras``; the attack keys are those :func:`attacks_frame` lists.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from medtune._checks import check_choice, param_error
from medtune.errors import ConfigError, did_you_mean

__all__ = [
    "DEFAULT_METRICS",
    "RUN_COLUMNS",
    "attacks_frame",
    "check_columns",
    "check_metric",
    "check_open_fraction",
    "configuration",
    "done_runs",
    "main_fraction_runs",
    "runs_frame",
]

DEFAULT_METRICS: tuple[str, ...] = ("auc", "accuracy", "balanced_accuracy", "f1")


RUN_COLUMNS: tuple[str, ...] = (
    "run_id", "status", "dataset", "arch", "strategy", "label", "depth", "seed",
    "train_fraction", "trainable_params", "total_params", "train_seconds", "images_per_s",
    "num_blocks", "configuration", "hp", "fold", "precision",
)

#: Run-config fields that are hyper-parameters (beside a strategy's non-main parameters).
HP_FIELDS: tuple[str, ...] = ("lr", "weight_decay")


def configuration(run: Mapping[str, Any]) -> tuple[str, str]:
    """(configuration, hyper-parameters) of a run record.

    The configuration is the strategy with its main parameter — what a user compares (``top_k:2``,
    ``surgical:stage_1``, ``lp_ft``); the hyper-parameters are the rest — ``lr``, ``weight_decay``
    and the strategy's other parameters — as text (``ft_lr_scale=0.1, lr=0.001, weight_decay=0.0001``),
    what the sweep may tune on validation. A record without ``strategy_params`` is its label.
    """
    label = str(run.get("label") or run.get("strategy"))
    params = run.get("strategy_params")
    name = run.get("strategy")
    if not isinstance(params, Mapping) or not name:
        return label, ""
    from medtune.strategies import get_strategy_class
    from medtune.strategies.spec import format_strategy_spec

    try:
        cls = get_strategy_class(str(name))
    except ConfigError:  # a record of a strategy this version does not know
        return label, ""
    main = cls.main_param
    shown = main in params and (getattr(cls, "show_default_main", True) or params[main] != cls.defaults.get(main))
    config = format_strategy_spec(str(name), {main: params[main]} if shown else {}, main)
    cfg = run.get("config") if isinstance(run.get("config"), Mapping) else {}
    if cfg.get("resize", "resize") != "resize":  # the input policy is part of what is compared
        config += f" [{cfg['resize']}]"
    hp = {k: v for k, v in params.items() if k != main}
    hp.update({k: cfg[k] for k in HP_FIELDS if k in cfg})
    return config, ", ".join(f"{k}={hp[k]:g}" if isinstance(hp[k], float) else f"{k}={hp[k]}" for k in sorted(hp))


def done_runs(runs: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Keep finished runs: ``status == "done"`` (a record without a status counts as done)."""
    return [r for r in runs if r.get("status", "done") in (None, "done")]


def _as_float(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


#: Where each split's metrics live in a run record: ``val`` selects, ``test`` reports.
SPLIT_KEYS = {"test": "metrics", "val": "val_metrics"}


def runs_frame(runs: Iterable[Mapping[str, Any]], metrics: Iterable[str] | None = None, *,
               split: str = "test") -> pd.DataFrame:
    """One row per run record, with the identifying columns and one column per metric.

    Args:
        runs: run records. Every status is kept; filter with :func:`done_runs`.
        metrics: metric names to extract from the split's metrics; None takes every metric key
            that appears in any run.
        split: ``test`` (``run["metrics"]``) or ``val`` (``run["val_metrics"]``, what selection uses).

    Returns:
        DataFrame with :data:`RUN_COLUMNS` and the metric columns (NaN where a run lacks one).
    """
    runs = list(runs)
    if metrics is None:
        seen: dict[str, None] = {}
        for r in runs:
            for k in (r.get(SPLIT_KEYS[split]) or {}):
                seen.setdefault(k, None)
        metrics = list(seen)
    metrics = list(metrics)
    rows = []
    for r in runs:
        row = {c: r.get(c) for c in RUN_COLUMNS}
        row["configuration"], row["hp"] = configuration(r)
        if row["status"] is None:
            row["status"] = "done"
        if row["label"] is None:
            row["label"] = row["strategy"]
        for c in ("trainable_params", "total_params", "train_seconds", "images_per_s", "train_fraction"):
            row[c] = _as_float(row[c])
        if math.isnan(row["train_fraction"]):
            row["train_fraction"] = 1.0
        m = r.get(SPLIT_KEYS[split]) or {}
        for k in metrics:
            row[k] = _as_float(m.get(k))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[*RUN_COLUMNS, *[m for m in metrics if m not in RUN_COLUMNS]])
    return frame


def check_metric(runs: Sequence[Mapping[str, Any]], metric: str, where: str) -> None:
    """Raise a ConfigError when no run has ``metric`` (only checked when there are runs).

    Raises:
        ConfigError: ``metric`` is absent from every run's ``metrics``.
    """
    if not runs:
        return
    available = sorted({k for r in runs for k in (r.get("metrics") or {})})
    if metric not in available:
        raise param_error("metric", where, "a metric stored in the runs", metric,
                          f"{did_you_mean(metric, available)} Available: {', '.join(available) or 'none'}.")


def check_columns(names: Iterable[str], allowed: Iterable[str], param: str, where: str) -> None:
    """Raise a ConfigError when a grouping key is not a run column.

    Raises:
        ConfigError: one of ``names`` is not in ``allowed``.
    """
    allowed = list(allowed)
    for name in names:
        check_choice(name, param, allowed, owner=where)


def check_open_fraction(value: float, name: str, where: str) -> None:
    """Raise a ConfigError unless ``0 < value < 1`` (a level or an error rate).

    Raises:
        ConfigError: ``value`` is outside (0, 1).
    """
    if not 0 < value < 1:
        raise param_error(name, where, "in (0, 1)", value)


def main_fraction_runs(runs: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], str | None]:
    """Keep, per dataset, the runs at the largest train fraction (the main experiment).

    Strategy comparisons pair runs over (dataset, arch, seed, fold); runs of a train-size sweep
    (Tajbakhsh) at smaller fractions would otherwise be mixed into the same cells.

    Returns:
        (kept runs, a note naming what was left out, or None when nothing was).
    """
    def size(r: Mapping[str, Any]) -> tuple[float, float]:
        f = _as_float(r.get("train_fraction"))
        shots = _as_float(r.get("train_per_class"))  # k-shot runs (train_per_class) rank below every full set
        return (1.0 if math.isnan(f) else f, math.inf if math.isnan(shots) or shots <= 0 else shots)

    best: dict[Any, tuple[float, float]] = {}
    for r in runs:
        best[r.get("dataset")] = max(best.get(r.get("dataset"), (-math.inf, -math.inf)), size(r))
    kept = []
    for r in runs:
        (f, shots), (best_f, best_shots) = size(r), best[r.get("dataset")]
        if np.isclose(f, best_f) and shots == best_shots:
            kept.append(r)
    dropped = len(runs) - len(kept)
    note = None
    if dropped:
        note = (f"{dropped} run(s) at smaller train fractions or fewer images per class are left out of the strategy "
                "comparison (they appear in the train-size and data-size plots).")
    return kept, note


def attacks_frame(attacks: Iterable[Mapping[str, Any]], runs: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per attack record, joined with its run's dataset, arch and label.

    Returns:
        DataFrame with the attack fields plus ``dataset``, ``arch``, ``label`` (None when the
        attack's run is not among ``runs``); ``num_source_images``, ``num_distinct_natural_images`` and
        ``num_photos`` are None in records made before they were stored.
    """
    by_id = {r.get("run_id"): r for r in runs}
    rows = []
    for a in attacks:
        run = by_id.get(a.get("run_id"), {})
        row = {k: a.get(k) for k in (
            "attack_id", "run_id", "source", "zeta", "xi", "norm", "targeted", "fooling_rate",
            "fooling_ci_low", "fooling_ci_high", "random_fooling_rate", "random_ci_low",
            "random_ci_high", "targeted_success", "clean_target_share", "uap_png", "num_source_images",
            "num_distinct_natural_images", "num_photos", "natural_photos", "protocol", "source_curve")}
        for k in ("zeta", "xi", "fooling_rate", "fooling_ci_low", "fooling_ci_high",
                  "random_fooling_rate", "random_ci_low", "random_ci_high", "targeted_success",
                  "clean_target_share"):
            row[k] = _as_float(row[k])
        row["dataset"] = run.get("dataset")
        row["arch"] = run.get("arch")
        row["label"] = run.get("label") or run.get("strategy")
        rows.append(row)
    return pd.DataFrame(rows)
