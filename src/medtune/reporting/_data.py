"""What the report says, as plain data: every number, table and figure, computed once.

:func:`build_report_data` reads the records and returns a :class:`ReportData` of numbers,
dicts, DataFrames and matplotlib figures. ``report.py`` formats it into blocks and computes
nothing further, so the HTML and the Markdown report show the same numbers.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medtune.reporting import plots
from medtune.reporting._records import DEFAULT_METRICS, attacks_frame, done_runs, main_fraction_runs, runs_frame
from medtune.reporting.stats import friedman, pairwise_wilcoxon, recommend, select_hyperparameters, summarize
from medtune.training.metrics import higher_is_better

__all__ = ["ReportData", "build_report_data", "fingerprint"]

Record = Mapping[str, Any]


def fingerprint(obj: Any) -> str:
    """The first 12 hex digits of the sha256 of ``obj`` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RunCounts:
    """How many records the report covers; datasets, archs, configurations and seeds count finished runs."""

    num_done: int
    num_failed: int
    num_datasets: int
    num_archs: int
    num_configs: int
    num_seeds: int
    num_attacks: int
    num_searches: int


@dataclass(frozen=True)
class SummaryData:
    """The summary table at each dataset's largest train fraction.

    ``rows`` are :func:`~medtune.reporting.stats.summarize` rows per (dataset, arch, label),
    sorted by dataset, arch and the ranking metric (best first), each with three more keys:
    ``best`` (the columns, metric names or ``trainable_params``/``train_seconds``, in which
    the row is the best of its dataset), ``recommended`` and ``not_worse`` (not significantly
    worse than the best, when that was decided).
    """

    rows: list[dict[str, Any]]
    metrics: list[str]


@dataclass(frozen=True)
class StatisticsData:
    """Friedman results per stored metric, the ranking metric's mean ranks (best first), Wilcoxon tests."""

    friedman: list[dict[str, Any]]
    mean_ranks: list[tuple[str, float]]
    wilcoxon: pd.DataFrame


@dataclass(frozen=True)
class RobustnessData:
    """UAP audits: figures, and the mean non-targeted results per (label, source, ζ) and the targeted rows.

    ``non_targeted`` has columns ``label, source, zeta, runs, xi, rate, low, high, rnd``
    (means over runs; ``rnd`` is the random control); ``targeted`` is the attacks frame's
    targeted rows. Each is None when there are no such attacks.
    """

    fooling_figure: Figure | None
    non_targeted: pd.DataFrame | None
    targeted: pd.DataFrame | None
    uap_figure: Figure | None
    source_figure: Figure | None = None  # test fooling vs source images seen (the records' source_curve)


@dataclass(frozen=True)
class SearchData:
    """One DEFT search: its facts, figure and comparison rows (``fine_tuned_units`` is None without a mask)."""

    search_id: Any
    dataset: Any
    arch: Any
    granularity: Any
    best_fitness: Any
    num_generations: int
    seconds: Any
    fine_tuned_units: list[str] | None
    figure: Figure | None
    comparison: list[dict[str, Any]]
    comparison_keys: list[str]


@dataclass(frozen=True)
class AppendixData:
    """Every run (``runs_frame`` plus ``config_sha``), sorted, and the report metrics it has."""

    runs: pd.DataFrame
    metrics: list[str]


@dataclass(frozen=True)
class ClassesData:
    """Per configuration (dataset, arch, label), means over its runs of: each class's test sensitivity,
    specificity, PPV and PR-AUC (``per_class``); the binary operating point chosen on validation for
    the target sensitivity (``operating``, None without binary runs); the test calibration before and
    after temperature scaling (``calibration``). A frame is None when no run records it."""

    per_class: pd.DataFrame | None
    operating: pd.DataFrame | None
    calibration: pd.DataFrame | None


@dataclass(frozen=True)
class ReproducibilityData:
    """When and from what the report was built: ``versions`` maps a package-version set to its run count."""

    generated: _dt.datetime
    medtune_version: str
    input_fingerprint: str
    num_configs: int
    versions: dict[str, int]
    data_fingerprints: list[tuple[str, str]]


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows. Parts are None when their records are missing.

    ``metrics`` is the ranking metric followed by the default ones; ``recommendation`` is the
    :func:`~medtune.reporting.stats.recommend` dict and ``headline_fooling`` its first
    (source, fooling-rate dict) among natural, train, random; ``figures`` holds the plots
    ``depth, cost, train_fraction, auto_rgn, roc, confusion`` (None when not drawable);
    ``csv`` holds the tables written beside the report.
    """

    metric: str
    alpha: float
    main_zeta: float
    metrics: list[str]
    counts: RunCounts
    recommendation: dict[str, Any]
    headline_fooling: tuple[str, dict[str, float]] | None
    fraction_note: str | None
    summary: SummaryData | None
    figures: dict[str, Figure | None]
    statistics: StatisticsData | None
    robustness: RobustnessData | None
    searches: list[SearchData]
    appendix: AppendixData | None
    reproducibility: ReproducibilityData
    csv: dict[str, pd.DataFrame]
    depth: dict[str, Any] | None = None  # the best fine-tuning depth on validation (see best_depth)
    # non-targeted fooling at main_zeta per audited configuration: {label: {source: rates}}
    exposure: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    hp_choices: list[dict] = field(default_factory=list)  # tuned hyper-parameters chosen on validation
    folds: pd.DataFrame | None = None  # cross-validation: the test metric per configuration and fold
    classes: ClassesData | None = None  # per-class metrics, operating points and calibration
    trains: dict[str, Any] | None = None  # what the recommended configuration trains (see _what_trains)


def best_depth(runs: Sequence[Record], metric: str) -> dict[str, Any] | None:
    """The fine-tuning depth best on validation among ``linear`` (0), ``top_k:k`` (k) and ``full``.

    Runs at each dataset's largest train fraction; the mean over every run at a depth (seeds,
    archs, datasets). Returns ``{depth, label, val_mean, test_mean, num_blocks, n, num_depths,
    scope}`` (``num_blocks``: non-head blocks of the network, so ``full`` is at that depth;
    ``scope``: the datasets × archs averaged over), or None without two depths to compare.
    """
    main, _ = main_fraction_runs(done_runs(runs))
    frame = runs_frame(main, [metric])
    val = runs_frame(main, [metric], split="val")[metric]
    frame = frame.assign(val=val.values)
    frame = frame[frame["strategy"].isin(["linear", "top_k", "full"]) & frame["val"].notna()].copy()
    frame.loc[frame["depth"].isna() & (frame["strategy"] == "linear"), "depth"] = 0
    frame.loc[frame["strategy"] == "full", "depth"] = frame.loc[frame["strategy"] == "full", "num_blocks"] - 1
    frame = frame[frame["depth"].notna()]
    if frame["depth"].nunique() < 2:
        return None
    per = frame.groupby("depth").agg(val_mean=("val", "mean"), test_mean=(metric, "mean"), n=("val", "size"),
                                     label=("label", "first"))
    sign = 1.0 if higher_is_better(metric) else -1.0
    depth = (sign * per["val_mean"]).idxmax()
    row = per.loc[depth]
    return {"depth": int(depth), "label": str(row["label"]), "val_mean": float(row["val_mean"]),
            "test_mean": float(row["test_mean"]), "n": int(row["n"]), "num_depths": len(per),
            "num_blocks": int(frame["num_blocks"].max() - 1) if frame["num_blocks"].notna().any() else None,
            "scope": f"{frame['dataset'].nunique()} dataset(s) × {frame['arch'].nunique()} arch(s)"}


def _exposure(attacks: Sequence[Record], runs: Sequence[Record], zeta: float) -> dict[str, dict[str, dict]]:
    """Mean non-targeted fooling rates at ``zeta`` per audited configuration and source."""
    from medtune.reporting.stats import fooling_at

    labels = dict.fromkeys(str(r.get("label") or r.get("strategy")) for r in runs)
    out = {lab: fooling_at(attacks, runs, lab, zeta) for lab in labels} if attacks else {}
    return {lab: f for lab, f in out.items() if f}


def build_report_data(runs: Sequence[Record], attacks: Sequence[Record], searches: Sequence[Record], *,
                      metric: str, alpha: float, main_zeta: float) -> ReportData:
    """Compute every number, table and figure of the report from the records (arguments as :func:`build_report`)."""
    runs, attacks, searches = list(runs), list(attacks), list(searches)
    every_value = done_runs(runs)
    # tuned hyper-parameters: each configuration at its value best on validation (per-value rows in the CSV)
    done, hp_choices = select_hyperparameters(every_value, metric) if every_value else ([], [])
    main, fraction_note = main_fraction_runs(done)
    metrics = [metric, *[m for m in DEFAULT_METRICS if m != metric]]
    rec = recommend(done, attacks, metric, alpha=alpha, main_zeta=main_zeta)
    fool = rec.get("fooling_rate") or {}
    headline_fooling = next(((s, fool[s]) for s in ("natural", "train", "random") if s in fool), None)
    csv = {"summary": summarize(done, by=("dataset", "arch", "label", "train_fraction"))}
    if hp_choices:  # every value's rows stay available
        csv["summary_per_value"] = summarize(every_value, by=("dataset", "arch", "label", "hp", "train_fraction"))
    statistics = None
    if done:
        statistics = _statistics(done, metric, metrics, alpha)
        csv["friedman"] = pd.DataFrame([{k: v for k, v in fr.items() if k not in ("mean_ranks", "treatments", "blocks")}
                                        for fr in statistics.friedman])
        csv["wilcoxon"] = statistics.wilcoxon
    robustness = None
    if attacks:
        csv["attacks"] = attacks_frame(attacks, runs)
        robustness = _robustness(csv["attacks"], attacks, runs)
    search_data = [_search(s, i) for i, s in enumerate(searches)]
    comparisons = [{"search_id": s.search_id, **c} for s in search_data for c in s.comparison]
    if comparisons:
        csv["deft"] = pd.DataFrame(comparisons)
    frame = runs_frame(runs, None)
    frame["config_sha"] = [fingerprint(r.get("config")) for r in runs]
    frame["metric_ci"] = [r.get("metric_ci") or {} for r in runs]  # per-run intervals over the test images
    csv["runs"] = frame
    appendix = None
    if not frame.empty:
        order = ["dataset", "arch", "label", "train_fraction", "seed"]
        appendix = AppendixData(frame.sort_values(order, kind="stable"), [m for m in metrics if m in frame.columns])
    classes = _classes(main)
    for name in ("per_class", "operating", "calibration"):
        if getattr(classes, name) is not None:
            csv[name] = getattr(classes, name)
    figures = {"depth": plots.plot_depth(done, metric), "cost": plots.plot_cost(done, metric),
               "train_fraction": plots.plot_train_fraction(done, metric), "auto_rgn": plots.plot_auto_rgn(done),
               "roc": plots.plot_roc(done, metric), "confusion": plots.plot_confusion(done, metric),
               "reliability": plots.plot_reliability(done, metric),
               "frontier": plots.plot_efficiency_frontier(done, metric), "data_size": plots.plot_data_size(done, metric)}
    frontier = plots.efficiency_frontier(done, metric)
    if (frontier["family"] == "peft").any():
        csv["frontier"] = frontier
    if figures["data_size"] is not None:
        csv["data_size"] = plots.data_size_frame(done, metric)
    return ReportData(
        metric=metric, alpha=alpha, main_zeta=main_zeta, metrics=metrics, counts=_counts(runs, done, attacks, searches),
        recommendation=rec, headline_fooling=headline_fooling, fraction_note=fraction_note,
        summary=_summary(main, metric, metrics, rec) if done else None, figures=figures, statistics=statistics,
        robustness=robustness, searches=search_data, appendix=appendix, depth=best_depth(done, metric) if done else None,
        exposure=_exposure(attacks, done, main_zeta), trains=_what_trains(main, rec.get("label")),
        reproducibility=_reproducibility(runs, attacks, searches), csv=csv, hp_choices=hp_choices,
        folds=_folds(main, metric), classes=classes)


_KEYS = ["dataset", "arch", "label"]


def _what_trains(main: list[Record], label: str | None) -> dict[str, Any] | None:
    """What the runs of configuration ``label`` train: the strategy's one-line description, the mean
    trainable and total parameters, and the per-block counts where the strategy stores them
    (``extras.trainable_per_block``: the parameter-efficient strategies)."""
    runs = [r for r in main if r.get("label") == label]
    if label is None or not runs:
        return None
    from medtune.strategies import get_strategy_class, list_strategies

    name = str(runs[0].get("strategy"))
    doc = (get_strategy_class(name).__doc__ or "").strip() if name in list_strategies() else ""
    trainable = [float(r["trainable_params"]) for r in runs if r.get("trainable_params") is not None]
    total = [float(r["total_params"]) for r in runs if r.get("total_params")]
    per_block = (runs[0].get("extras") or {}).get("trainable_per_block")
    return {"label": label, "strategy": name, "what": " ".join(doc.split("\n\n")[0].split()),
            "trainable": float(np.mean(trainable)) if trainable else None,
            "total": float(np.mean(total)) if total else None, "per_block": per_block}


def _classes(main: list[Record]) -> ClassesData:
    """Means over each configuration's runs of the per-class, operating-point and calibration records."""
    def mean_frame(rows: list[dict], by: list[str]) -> pd.DataFrame | None:
        if not rows:
            return None
        frame = pd.DataFrame(rows)
        out = frame.groupby(by, sort=False, dropna=False).mean(numeric_only=True)
        out.insert(0, "runs", frame.groupby(by, sort=False, dropna=False).size())
        return out.reset_index()

    per_class, operating, calibration = [], [], []
    for r in main:
        key = {k: r.get(k) for k in _KEYS}
        for name, m in ((r.get("per_class") or {}).get("test") or {}).items():
            per_class.append({**key, "class": name, **{k: m.get(k) for k in ("sensitivity", "specificity", "ppv",
                                                                            "pr_auc", "support")}})
        if r.get("operating_point"):
            operating.append({**key, **r["operating_point"]})
        cal = r.get("calibration")
        if cal:
            calibration.append({**key, **{k: cal[k] for k in ("ece", "ece_scaled", "brier", "brier_scaled",
                                                              "temperature")}})
    return ClassesData(per_class=mean_frame(per_class, [*_KEYS, "class"]),
                       operating=mean_frame(operating, _KEYS), calibration=mean_frame(calibration, _KEYS))


def _folds(main: list[Record], metric: str) -> pd.DataFrame | None:
    """Mean test ``metric`` per (dataset, arch, configuration) and cross-validation fold, with the
    spread across folds (sd of the fold means); None without cross-validated runs."""
    frame = runs_frame(main, [metric])
    frame = frame[frame["fold"].notna()]
    if frame.empty:
        return None
    table = frame.pivot_table(index=["dataset", "arch", "label"], columns="fold", values=metric, aggfunc="mean")
    table.columns = [f"fold {int(c)}" for c in table.columns]
    table["sd across folds"] = table.std(axis=1, ddof=1)
    return table.reset_index()


def _counts(runs: list[Record], done: list[Record], attacks: list[Record], searches: list[Record]) -> RunCounts:
    failed = sum(1 for r in runs if r.get("status", "done") not in (None, "done"))
    f = runs_frame(done, [])
    if len(f):
        num_datasets, num_archs = f["dataset"].nunique(), f["arch"].nunique()
        num_configs, num_seeds = f["label"].nunique(), f["seed"].nunique()
    else:
        num_datasets = num_archs = num_configs = num_seeds = 0
    return RunCounts(num_done=len(done), num_failed=failed, num_datasets=num_datasets, num_archs=num_archs,
                     num_configs=num_configs, num_seeds=num_seeds, num_attacks=len(attacks),
                     num_searches=len(searches))


def _summary(main: list[Record], metric: str, metrics: list[str], rec: dict[str, Any]) -> SummaryData:
    table = summarize(main, by=("dataset", "arch", "label"))
    # validation selects: rows are ordered, and each column's best marked, by the validation mean
    table = table.sort_values(["dataset", "arch", f"val_{metric}_mean"],
                              ascending=[True, True, not higher_is_better(metric)], kind="stable")
    metrics = [m for m in metrics if table[f"{m}_mean"].notna().any()]
    marked = set(rec.get("not_worse") or []) if rec.get("method") not in ("none", "single") else set()
    per_dataset = table.groupby("dataset")
    best_of = {m: (f"val_{m}_mean", "max" if higher_is_better(m) else "min") for m in metrics}
    best_of.update(trainable_params=("trainable_params", "min"), train_seconds=("train_seconds", "min"))
    best = pd.DataFrame({name: table[col] == per_dataset[col].transform(how) for name, (col, how) in best_of.items()})
    rows = []
    for row, is_best in zip(table.itertuples(index=False), best.itertuples(index=False, name=None)):
        d = row._asdict()
        label = str(d["label"])
        d.update(best=frozenset(name for name, b in zip(best.columns, is_best) if b),
                 recommended=label == rec.get("label"), not_worse=label in marked)
        rows.append(d)
    return SummaryData(rows, metrics)


def _statistics(done: list[Record], metric: str, metrics: list[str], alpha: float) -> StatisticsData:
    # the tests behind the "not worse than the best" marks decide on validation, like every selection
    results = [friedman(done, m, split="val") for m in metrics if any(m in (r.get("val_metrics") or {}) for r in done)]
    main = next((fr for fr in results if fr["metric"] == metric), {"mean_ranks": {}})
    return StatisticsData(friedman=results, mean_ranks=sorted(main["mean_ranks"].items(), key=lambda kv: kv[1]),
                          wilcoxon=pairwise_wilcoxon(done, metric, alpha=alpha, split="val"))


def _robustness(frame: pd.DataFrame, attacks: list[Record], runs: list[Record]) -> RobustnessData:
    frame = frame.assign(label=frame["label"].fillna("(run not in records)"),
                         num_source_images=pd.to_numeric(frame["num_source_images"], errors="coerce"))
    nt = frame[frame["targeted"].isna()]
    non_targeted = None
    if len(nt):
        non_targeted = nt.groupby(["label", "source", "zeta"], dropna=False).agg(
            runs=("run_id", "nunique"), xi=("xi", "mean"), rate=("fooling_rate", "mean"),
            low=("fooling_ci_low", "mean"), high=("fooling_ci_high", "mean"),
            rnd=("random_fooling_rate", "mean"), images=("num_source_images", "min")).reset_index()
    tg = frame[frame["targeted"].notna()]
    return RobustnessData(fooling_figure=plots.plot_fooling(attacks, runs), non_targeted=non_targeted,
                          targeted=tg if len(tg) else None, uap_figure=plots.plot_uaps(attacks, runs),
                          source_figure=plots.plot_source_curve(attacks, runs))


def _search(s: Record, idx: int) -> SearchData:
    names = [str(n) for n in (s.get("unit_names") or [])]
    mask = list(s.get("best_mask") or [])
    comparison = list(s.get("comparison") or [])
    return SearchData(
        search_id=s.get("search_id", idx), dataset=s.get("dataset"), arch=s.get("arch"),
        granularity=s.get("granularity", "block"), best_fitness=s.get("best_fitness"),
        num_generations=len(s.get("history") or []), seconds=s.get("seconds"),
        fine_tuned_units=[n for n, b in zip(names, mask) if b] if mask else None, figure=plots.plot_deft(s),
        comparison=comparison, comparison_keys=list(dict.fromkeys(k for c in comparison for k in c)))


def _reproducibility(runs: list[Record], attacks: list[Record], searches: list[Record]) -> ReproducibilityData:
    from medtune._version import __version__

    versions: dict[str, int] = {}
    for r in runs:
        v = r.get("versions") or {}
        key = ", ".join(f"{k} {v[k]}" for k in sorted(v)) or "(not recorded)"
        versions[key] = versions.get(key, 0) + 1
    records = {"runs": runs, "attacks": attacks, "searches": searches}
    return ReproducibilityData(
        generated=_dt.datetime.now(_dt.timezone.utc), medtune_version=__version__,
        input_fingerprint=fingerprint(records), num_configs=len({fingerprint(r.get("config")) for r in runs}),
        versions=versions,
        data_fingerprints=sorted({(str(r.get("dataset")), str(r.get("data_fingerprint"))) for r in runs}))
