"""Reports from plain run/attack/search records: statistics, plots and one self-contained HTML file.

Everything here takes the ``list[dict]`` records that ``ResultsStore.runs()``, ``.attacks()``
and ``.searches()`` return, never the store itself, so a report can be rebuilt from any source
without retraining::

    from medtune.reporting import build_report
    build_report(store.runs(), store.attacks(), store.searches(), out_path="report.html")

The statistics are :func:`summarize`, :func:`friedman`, :func:`pairwise_wilcoxon` and
:func:`recommend`; single figures are in :mod:`medtune.reporting.plots`.
"""

from __future__ import annotations

from medtune.reporting.report import build_report, report_store
from medtune.reporting.stats import friedman, pairwise_wilcoxon, recommend, summarize

__all__ = ["build_report", "report_store", "friedman", "pairwise_wilcoxon", "recommend", "summarize"]
