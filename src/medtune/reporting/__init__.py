"""Reports from plain run/attack/search records: statistics, plots and one self-contained HTML file.

Everything here takes the ``list[dict]`` records the results store returns (RECORDS.md), never
the store itself, so a report can be rebuilt from any source without retraining::

    from medtune.reporting import build_report
    build_report(store.runs(), store.attacks(), store.searches(), out_path="report.html")
"""

from __future__ import annotations

from medtune.reporting.html import build_report
from medtune.reporting.plots import (
    pareto_front,
    plot_auto_rgn,
    plot_confusion,
    plot_cost,
    plot_deft,
    plot_depth,
    plot_fooling,
    plot_roc,
    plot_train_fraction,
    plot_uaps,
)
from medtune.reporting.stats import friedman, holm, pairwise_wilcoxon, recommend, summarize

__all__ = [
    "build_report",
    "friedman",
    "holm",
    "pairwise_wilcoxon",
    "pareto_front",
    "plot_auto_rgn",
    "plot_confusion",
    "plot_cost",
    "plot_deft",
    "plot_depth",
    "plot_fooling",
    "plot_roc",
    "plot_train_fraction",
    "plot_uaps",
    "recommend",
    "summarize",
]
