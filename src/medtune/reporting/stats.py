"""Statistics over run records: mean ± sd and CI, Friedman, Wilcoxon + Holm, a recommendation.

The protocol: across seeds, mean ± sd and a 95% CI; comparing strategies, a Friedman test over
(dataset, arch, seed, fold) blocks, then Wilcoxon signed-rank tests with Holm's correction.
:func:`recommend` turns these into one sentence a user can act on: the cheapest configuration
not significantly worse than the best.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
import pandas as pd
from scipy import stats as sps

from medtune.errors import unknown_name_error
from medtune.reporting._format import fmt_count
from medtune.reporting._records import (
    DEFAULT_METRICS,
    configuration,
    RUN_COLUMNS,
    attacks_frame,
    check_columns,
    check_metric,
    check_open_fraction,
    done_runs,
    main_fraction_runs,
    runs_frame,
)
from medtune.training.metrics import higher_is_better, metric_range

__all__ = [
    "select_hyperparameters",
    "friedman",
    "holm",
    "min_wilcoxon_pvalue",
    "pairwise_wilcoxon",
    "paired_validation_tests",
    "recommend",
    "summarize",
]

Record = Mapping[str, Any]


def select_hyperparameters(runs: Sequence[Record], metric: str = "auc") -> tuple[list[Record], list[dict]]:
    """Per dataset × arch × configuration × train fraction, keep the runs of the hyper-parameter
    value (lr, weight decay, a strategy's non-main parameters) with the best mean *validation*
    ``metric`` over seeds — never the test metric.

    Groups with a single value are returned unchanged. In a tuned group the kept runs are relabelled
    with the configuration (``lp_ft`` for ``lp_ft:ft_lr_scale=0.01``) and carry the choice in ``hp``.

    Returns:
        (the selected finished runs, one dict per tuned group: ``dataset``, ``arch``,
        ``configuration``, ``train_fraction``, ``chosen`` and ``candidates`` {hp: mean val metric}).
    """
    done = done_runs(runs)
    if not done:
        return [], []
    keys = [configuration(r) for r in done]
    val = runs_frame(done, [metric], split="val")
    groups: dict[tuple, dict[str, list[int]]] = {}
    for i, (r, (config, hp)) in enumerate(zip(done, keys)):
        g = (r.get("dataset"), r.get("arch"), config, float(val["train_fraction"].iloc[i]))
        groups.setdefault(g, {}).setdefault(hp, []).append(i)
    sign = 1.0 if higher_is_better(metric) else -1.0
    keep: list[Record] = []
    choices: list[dict] = []
    for (dataset, arch, config, frac), by_hp in groups.items():
        if len(by_hp) == 1:
            keep += [done[i] for i in next(iter(by_hp.values()))]
            continue
        means = {hp: float(np.nanmean(val[metric].iloc[idx].to_numpy(float))) if val[metric].iloc[idx].notna().any()
                 else math.nan for hp, idx in by_hp.items()}
        ranked = sorted((hp for hp in means if not math.isnan(means[hp])), key=lambda hp: (-sign * means[hp], hp))
        if not ranked:
            continue  # no validation metric: nothing can be selected, and test must not be used
        chosen = ranked[0]
        choices.append({"dataset": dataset, "arch": arch, "configuration": config, "train_fraction": frac,
                        "chosen": chosen, "candidates": means})
        keep += [{**done[i], "label": config, "hp": chosen} for i in by_hp[chosen]]
    return keep, choices


def summarize(
    runs: Sequence[Record],
    metrics: Sequence[str] | None = None,
    by: Sequence[str] = ("dataset", "arch", "label"),
    *,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Mean, sd, n and a t-distribution CI of each metric per group of finished runs.

    Args:
        runs: run records; runs whose status is not ``"done"`` are ignored.
        metrics: metric names; None means ``auc, accuracy, balanced_accuracy, f1`` (absent ones
            give NaN columns). A name given explicitly must exist in at least one run.
        by: run fields to group by. Runs at different ``train_fraction`` are pooled unless
            ``"train_fraction"`` is one of them.
        confidence: CI level in (0, 1).

    Returns:
        One row per group, sorted by ``by``: the ``by`` columns, ``n`` (runs), and per metric
        ``{m}_mean``, ``{m}_sd`` (ddof=1), ``{m}_n``, ``{m}_ci_low``, ``{m}_ci_high``
        (mean ± t_{(1+confidence)/2, n-1} · sd/√n intersected with the metric's range, e.g. [0, 1]
        for AUC; NaN for n < 2), ``val_{m}_mean``/``val_{m}_sd`` (the validation metric, which
        selection uses), then the mean
        ``trainable_params`` and ``train_seconds``, and ``strategy``/``depth`` when the group
        determines them. Empty input gives an empty frame with these columns.

    Raises:
        ConfigError: unknown metric, unknown ``by`` field, or ``confidence`` outside (0, 1).
    """
    check_open_fraction(confidence, "confidence", "summarize")
    runs = done_runs(runs)
    explicit = metrics is not None
    metrics = list(DEFAULT_METRICS if metrics is None else metrics)
    if explicit:
        for m in metrics:
            check_metric(runs, m, "summarize")
    by = list(by)
    check_columns(by, RUN_COLUMNS, "by", "summarize")
    frame = runs_frame(runs, metrics)
    val = runs_frame(runs, metrics, split="val").rename(columns={m: f"val_{m}" for m in metrics})
    extra = [c for c in ("strategy", "depth") if c not in by]
    columns = [*by, "n"]
    for m in metrics:
        columns += [f"{m}_mean", f"{m}_sd", f"{m}_n", f"{m}_ci_low", f"{m}_ci_high", f"val_{m}_mean", f"val_{m}_sd"]
    columns += ["trainable_params", "train_seconds", *extra]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for key, group in frame.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(by, key))
        row["n"] = len(group)
        for m in metrics:
            mean, sd, n, low, high = _mean_sd_ci(group[m].to_numpy(float), confidence, metric_range(m))
            row.update({f"{m}_mean": mean, f"{m}_sd": sd, f"{m}_n": n, f"{m}_ci_low": low, f"{m}_ci_high": high})
            values = val[f"val_{m}"].loc[group.index].to_numpy(float)
            values = values[~np.isnan(values)]
            row.update({f"val_{m}_mean": float(values.mean()) if len(values) else math.nan,
                        f"val_{m}_sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan})
        row["trainable_params"] = group["trainable_params"].mean()
        row["train_seconds"] = group["train_seconds"].mean()
        for c in extra:
            values = group[c].dropna().unique()
            row[c] = values[0] if len(values) == 1 else None
        rows.append(row)
    return pd.DataFrame(rows, columns=columns).reset_index(drop=True)


def _mean_sd_ci(values: np.ndarray, confidence: float, bounds: tuple[float, float] = (-math.inf, math.inf),
                ) -> tuple[float, float, int, float, float]:
    """Mean, sd, n and the t-interval of the mean intersected with the metric's range ``bounds``
    (the true mean lies in that range, so the intersection keeps the interval's coverage)."""
    values = values[~np.isnan(values)]
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0, math.nan, math.nan
    mean = float(values.mean())
    if n < 2:
        return mean, math.nan, n, math.nan, math.nan
    sd = float(values.std(ddof=1))
    if sd == 0:
        return mean, 0.0, n, mean, mean
    low, high = sps.t.interval(confidence, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return mean, sd, n, float(max(low, bounds[0])), float(min(high, bounds[1]))


def _block_table(
    runs: Sequence[Record], metric: str, blocks: Sequence[str], treatment: str, where: str, split: str = "test"
) -> tuple[pd.DataFrame, list[str]]:
    """Blocks × treatments table of the metric (duplicates averaged) and notes on what was dropped."""
    notes: list[str] = []
    runs = done_runs(runs)
    check_metric(runs, metric, where)
    check_columns([*blocks, treatment], RUN_COLUMNS, "blocks/treatment", where)
    runs, note = main_fraction_runs(runs)
    if note:
        notes.append(note)
    frame = runs_frame(runs, [metric], split=split).dropna(subset=[metric])
    if frame.empty:
        return pd.DataFrame(), notes
    keys = [*blocks, treatment]
    frame[keys] = frame[keys].astype(object).where(frame[keys].notna(), "(none)")  # pandas drops NaN keys
    counts = frame.groupby([*blocks, treatment], dropna=False).size()
    if (counts > 1).any():
        notes.append(f"{int((counts > 1).sum())} cell(s) hold more than one run; their {metric} is averaged.")
    table = frame.pivot_table(index=list(blocks), columns=treatment, values=metric, aggfunc="mean", dropna=False)
    table.columns = [str(c) for c in table.columns]
    return table, notes


def friedman(
    runs: Sequence[Record],
    metric: str = "auc",
    blocks: Sequence[str] = ("dataset", "arch", "seed", "fold"),
    treatment: str = "label",
    *,
    split: str = "test",
) -> dict[str, Any]:
    """Friedman test of ``treatment`` (strategies) over complete blocks.

    Only blocks that have a value for every treatment enter the test
    (``scipy.stats.friedmanchisquare``). Runs at smaller train fractions than the largest
    one of their dataset are left out (see the note).

    Args:
        runs: run records; unfinished runs are ignored.
        metric: metric name in ``run["metrics"]``.
        blocks: run fields whose combination forms a block.
        treatment: run field that names the compared treatments.
        split: ``test`` or ``val`` (the metrics that selection uses).

    Returns:
        dict with ``metric``, ``treatment``, ``blocks``, ``statistic``, ``pvalue`` (None when the
        test cannot run), ``num_blocks`` (complete blocks used), ``num_blocks_total``,
        ``num_treatments``, ``treatments``, ``mean_ranks`` (1 = best, over complete blocks) and
        ``note`` (why the test did not run, or what was dropped; "" when nothing).

    Raises:
        ConfigError: unknown metric, block or treatment field.
    """
    table, notes = _block_table(runs, metric, blocks, treatment, "friedman", split)
    result: dict[str, Any] = {
        "metric": metric, "treatment": treatment, "blocks": list(blocks), "statistic": None,
        "pvalue": None, "num_blocks": 0, "num_blocks_total": int(len(table)),
        "num_treatments": int(table.shape[1]) if not table.empty else 0,
        "treatments": list(table.columns), "mean_ranks": {}, "note": "",
    }
    complete = table.dropna(axis=0, how="any")
    result["num_blocks"] = int(len(complete))
    if len(complete) < len(table):
        notes.append(f"{len(table) - len(complete)} of {len(table)} block(s) lack some treatment and are left out.")
    if len(complete):
        sign = -1.0 if higher_is_better(metric) else 1.0
        ranks = np.apply_along_axis(sps.rankdata, 1, sign * complete.to_numpy(float))
        result["mean_ranks"] = {c: float(v) for c, v in zip(complete.columns, ranks.mean(axis=0))}
    if result["num_treatments"] < 3:
        notes.insert(0, f"Friedman needs at least 3 treatments; got {result['num_treatments']}.")
    elif len(complete) < 2:
        notes.insert(0, f"Friedman needs at least 2 complete blocks; got {len(complete)}.")
    else:
        values = complete.to_numpy(float)
        if np.all(values == values[:, :1]):
            notes.insert(0, "Every treatment scores the same within each block; the test is undefined.")
        else:
            res = sps.friedmanchisquare(*values.T)
            result["statistic"], result["pvalue"] = float(res.statistic), float(res.pvalue)
    result["note"] = " ".join(notes)
    return result


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (NaN entries stay NaN and do not count in m).

    scipy.stats offers only ``false_discovery_control`` (Benjamini–Hochberg/Yekutieli) and
    statsmodels is not a dependency, so Holm's step-down is written out here:
    ``p_adj(i) = max_{j <= i} min(1, (m - j + 1) · p(j))`` over the ascending p-values.

    Args:
        pvalues: raw p-values in [0, 1].

    Returns:
        Adjusted p-values in the input order.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return out


def min_wilcoxon_pvalue(num_pairs: int) -> float:
    """Smallest two-sided p-value the exact Wilcoxon signed-rank test can give for n pairs.

    All differences of one sign give p = 2 / 2^n, so with fewer than 6 pairs no result can
    reach p < 0.05, whatever the data.
    """
    return 1.0 if num_pairs < 1 else min(1.0, 2.0 / 2.0**num_pairs)


def pairwise_wilcoxon(
    runs: Sequence[Record],
    metric: str = "auc",
    *,
    blocks: Sequence[str] = ("dataset", "arch", "seed", "fold"),
    treatment: str = "label",
    reference: str | None = None,
    all_pairs: bool = False,
    alpha: float = 0.05,
    split: str = "test",
) -> pd.DataFrame:
    """Wilcoxon signed-rank tests of treatments over paired blocks, Holm-corrected.

    Each comparison pairs the blocks where both treatments have a value. By default every
    treatment is compared with the best one (highest mean of ``metric``; lowest for losses)
    and the best gets a row of its own with no test.

    Args:
        runs: run records; unfinished runs are ignored.
        metric: metric name in ``run["metrics"]``.
        blocks: run fields whose combination forms a pairing block.
        treatment: run field that names the treatments.
        reference: compare with this treatment instead of the best.
        all_pairs: compare every pair of treatments instead (Holm over all pairs).
        alpha: family-wise error rate in (0, 1).
        split: ``test`` or ``val``; "the best" is the best on this split.

    Returns:
        One row per comparison: ``label``, ``reference``, ``n`` (paired blocks), ``mean``,
        ``reference_mean``, ``mean_diff`` (label − reference), ``statistic``, ``pvalue``,
        ``p_holm``, ``significant`` (p_holm < alpha), ``not_worse_than_best`` (True unless
        significantly worse than the best; None for pairs without the best; for the best's own
        row, True). Sorted best first. Empty when fewer than 2 treatments have data.

    Raises:
        ConfigError: unknown metric/field, unknown ``reference``, or ``alpha`` outside (0, 1).
    """
    check_open_fraction(alpha, "alpha", "pairwise_wilcoxon")
    table, _ = _block_table(runs, metric, blocks, treatment, "pairwise_wilcoxon", split)
    columns = ["label", "reference", "n", "mean", "reference_mean", "mean_diff", "statistic",
               "pvalue", "p_holm", "significant", "not_worse_than_best"]
    if table.empty or table.shape[1] < 1:
        return pd.DataFrame(columns=columns)
    means = table.mean(axis=0)
    better = higher_is_better(metric)
    ordered = list(means.sort_values(ascending=not better).index)
    best = ordered[0]
    if reference is not None and reference not in table.columns:
        raise unknown_name_error(f"reference {treatment} in pairwise_wilcoxon", reference, table.columns)
    ref = best if reference is None else reference
    if all_pairs:
        pairs = [(a, b) for i, a in enumerate(ordered) for b in ordered[i + 1:]]
        pairs = [(b, a) for a, b in pairs]  # (label, reference): the better-ranked one is the reference
    else:
        pairs = [(a, ref) for a in ordered if a != ref]
    rows = []
    for a, b in pairs:
        both = table[[a, b]].dropna()
        x, y = both[a].to_numpy(float), both[b].to_numpy(float)
        stat = p = math.nan
        if len(x) and np.all(x == y):
            stat, p = 0.0, 1.0  # no difference at all; scipy would divide by zero
        elif len(x):
            res = sps.wilcoxon(x, y)
            stat, p = float(res.statistic), float(res.pvalue)
        rows.append({"label": a, "reference": b, "n": len(x), "mean": float(means[a]),
                     "reference_mean": float(means[b]), "mean_diff": float(means[a] - means[b]),
                     "statistic": stat, "pvalue": p})
    out = pd.DataFrame(rows, columns=columns[:9])
    out["p_holm"] = holm(out["pvalue"].to_numpy(float)) if len(out) else []
    out["significant"] = out["p_holm"] < alpha
    worse = out["mean_diff"] < 0 if better else out["mean_diff"] > 0
    not_worse = ~(out["significant"] & worse)
    out["not_worse_than_best"] = [
        (bool(nw) if not math.isnan(ph) else None) if r == best else None
        for nw, ph, r in zip(not_worse, out["p_holm"], out["reference"])
    ]
    if not all_pairs:
        head = {"label": ref, "reference": ref, "n": int(table[ref].notna().sum()), "mean": float(means[ref]),
                "reference_mean": float(means[ref]), "mean_diff": 0.0, "statistic": math.nan,
                "pvalue": math.nan, "p_holm": math.nan, "significant": False,
                "not_worse_than_best": True if ref == best else None}
        out = pd.concat([pd.DataFrame([head], columns=columns), out], ignore_index=True)
    return out[columns]


def recommend(runs: Sequence[Record], attacks: Sequence[Record] | None = None, metric: str = "auc",
              alpha: float = 0.05, main_zeta: float = 0.04, *, tolerance: float = 0.01) -> Recommendation:
    """The cheapest configuration that is not significantly worse than the best — chosen on the
    validation metric (``run["val_metrics"]``); its test metric is then reported.

    Configurations are run labels (``top_k:2``, ``full``, ...), compared over (dataset, arch, seed,
    fold) blocks at each dataset's largest train fraction, "not worse" by the strongest rule the data
    allows (:func:`_not_worse_than_best`); among those that pass, the cheapest has the fewest
    trainable parameters, ties broken by training time.

    Args:
        runs: run records; unfinished runs are ignored.
        attacks: attack records (optional); the recommended configuration's mean non-targeted
            fooling rate at ``main_zeta`` is reported per source.
        metric: metric to compare on.
        alpha: family-wise error rate in (0, 1).
        main_zeta: UAP budget ζ (fraction of the mean input norm) to quote.
        tolerance: fallback margin on the metric's scale when no sd is available.

    Returns:
        A :class:`Recommendation` (``label`` None when there is nothing to recommend; ``method`` one of
        ``wilcoxon_holm``, ``paired_bootstrap_holm``, ``within_sd``, ``within_tolerance``, ``single``, ``none``).

    Raises:
        ConfigError: unknown metric, or ``alpha`` outside (0, 1).
    """
    check_open_fraction(alpha, "alpha", "recommend")
    done = done_runs(runs)
    check_metric(done, metric, "recommend")
    done, _ = select_hyperparameters(done, metric)  # no-op when nothing was tuned
    out = empty_recommendation(metric)
    main, note = main_fraction_runs(done)
    if note:
        out["notes"].append(note)
    # validation selects, test reports: every comparison below is on the validation metric
    frame = runs_frame(main, [metric], split="val").dropna(subset=[metric])
    if frame.empty:
        out["text"] = (f"No finished runs with a validation {metric!r}: nothing to recommend "
                       "(selection never uses the test split).")
        return out
    per_label = frame.groupby("label").agg(
        mean=(metric, "mean"), sd=(metric, "std"), n=(metric, "size"),
        params=("trainable_params", "mean"), seconds=("train_seconds", "mean"))
    per_label = per_label.sort_values("mean", ascending=not higher_is_better(metric))  # the best first
    best = str(per_label.index[0])
    tests = pairwise_wilcoxon(main, metric, alpha=alpha, split="val")
    passing = _not_worse_than_best(out, main, frame, per_label, tests, metric, alpha, tolerance)
    label = _cheapest(per_label.loc[passing], higher_is_better(metric))
    _describe_choice(out, main, per_label, tests, label, best, metric, passing)
    out["fooling_rate"] = fooling_at(attacks or (), main, label, main_zeta)
    if attacks and out["fooling_rate"] is None:
        out["notes"].append(f"No non-targeted UAP audit of {label} at zeta={main_zeta:g}.")
    out["text"] = _recommend_text(out, main_zeta, alpha)
    return out


class _RecommendationFields(TypedDict):

    label: str | None
    best_label: str | None
    metric: str
    selected_on: str
    mean: float | None
    sd: float | None
    n: int
    best_mean: float | None
    best_sd: float | None
    val_mean: float | None
    val_sd: float | None
    best_val_mean: float | None
    best_val_sd: float | None
    method: str
    p_holm: float | None
    not_worse: list[str]
    trainable_params: float | None
    train_seconds: float | None
    params_ratio: float | None
    time_ratio: float | None
    fooling_rate: dict[str, dict[str, float]] | None
    notes: list[str]
    text: str


class Recommendation(_RecommendationFields, total=False):
    """What :func:`recommend` returns (the keys are those the report and the store's readers use);
    ``paired`` only under the paired-bootstrap rule."""

    paired: dict[str, dict[str, Any]]


def _cheapest(candidates: pd.DataFrame, higher_better: bool) -> str:
    """The label with the fewest trainable parameters, ties broken by training time, then the metric."""
    cands = candidates.copy()
    cands["params_key"] = cands["params"].fillna(math.inf)
    cands["seconds_key"] = cands["seconds"].fillna(math.inf)
    return str(cands.sort_values(["params_key", "seconds_key", "mean"], ascending=[True, True, not higher_better]).index[0])


def empty_recommendation(metric: str) -> Recommendation:
    """A :class:`Recommendation` with nothing recommended yet (method ``none``)."""
    return Recommendation(
        label=None, best_label=None, metric=metric, selected_on="val", mean=None, sd=None, n=0, best_mean=None,
        best_sd=None, val_mean=None, val_sd=None, best_val_mean=None, best_val_sd=None, method="none", p_holm=None,
        not_worse=[], trainable_params=None, train_seconds=None, params_ratio=None, time_ratio=None,
        fooling_rate=None, notes=[], text="")


def _not_worse_than_best(out: Recommendation, main: list[Record], frame: pd.DataFrame, per_label: pd.DataFrame,
                         tests: pd.DataFrame, metric: str, alpha: float, tolerance: float) -> list[str]:
    """The labels not worse than the best on validation (the rule goes to ``out["method"]``, its caveats to
    ``out["notes"]``): :func:`pairwise_wilcoxon` (Holm-corrected, at ``alpha``) when the test can reject
    at all (2+ seeds, and ``holm`` of the smallest attainable p-value, :func:`min_wilcoxon_pvalue`, below
    ``alpha``); else, when every run stored its validation probabilities on the same images,
    :func:`paired_validation_tests` (paired bootstrap over those images, Holm); else "mean within one
    sd of the best's mean" (sd over the best's runs) or, without an sd (a single run), within ``tolerance``."""
    best = str(per_label.index[0])
    num_seeds = len(frame[["seed", "fold"]].astype(str).drop_duplicates())  # replicates: seeds × folds
    compared = tests[tests["label"] != best]
    max_pairs = int(compared["n"].max()) if len(compared) else 0
    testable = (num_seeds >= 2 and len(compared) > 0
                and min_wilcoxon_pvalue(max_pairs) * len(compared) < alpha)
    if len(per_label) == 1:
        out["method"] = "single"
        return [best]
    if testable:
        out["method"] = "wilcoxon_holm"
        return [str(r.label) for r in tests.itertuples() if r.not_worse_than_best]
    paired = paired_validation_tests(main, [str(x) for x in per_label.index], best, metric, alpha=alpha)
    if paired is not None:
        # too few seeds for Wilcoxon: the configurations share their validation images, so a paired
        # bootstrap over those images can still separate them
        out["method"], out["paired"] = "paired_bootstrap_holm", paired
        return [best] + [lab for lab, t in paired.items() if t["not_worse_than_best"]]
    if num_seeds < 2:
        out["notes"].append("Only one seed per configuration, and no shared validation predictions for a "
                            "paired test: significance can't be tested.")
    else:
        out["notes"].append(
            f"At most {max_pairs} paired block(s) per comparison: the Wilcoxon test cannot reach "
            f"p < {alpha:g} after Holm's correction over {len(compared)} comparisons with so few.")
    best_sd = per_label.loc[best, "sd"]
    if per_label.loc[best, "n"] >= 2 and not math.isnan(best_sd):
        margin, out["method"] = float(best_sd), "within_sd"
    else:
        margin, out["method"] = float(tolerance), "within_tolerance"
    gap = per_label.loc[best, "mean"] - per_label["mean"]
    gap = gap if higher_is_better(metric) else -gap
    return [str(lab) for lab, g in gap.items() if g <= margin + 1e-12]


def _describe_choice(out: Recommendation, main: list[Record], per_label: pd.DataFrame, tests: pd.DataFrame,
                     label: str, best: str, metric: str, passing: list[str]) -> None:
    """Fill ``out`` with the chosen and the best label's validation (selection) and test (reported)
    figures, the p-value of the choice against the best and its cost relative to ``full``."""
    row = per_label.loc[label]
    reported = runs_frame(main, [metric]).dropna(subset=[metric]).groupby("label")[metric].agg(["mean", "std", "size"])

    def test_stat(lab: str, col: str) -> float | None:
        value = reported[col].get(lab, math.nan) if len(reported) else math.nan
        return None if value is None or math.isnan(value) else float(value)

    out.update({
        "label": label, "best_label": best, "selected_on": "val",
        "mean": test_stat(label, "mean"), "sd": test_stat(label, "std"), "n": int(test_stat(label, "size") or 0),
        "best_mean": test_stat(best, "mean"), "best_sd": test_stat(best, "std"),
        "val_mean": float(row["mean"]), "val_sd": None if math.isnan(row["sd"]) else float(row["sd"]),
        "best_val_mean": float(per_label.loc[best, "mean"]),
        "best_val_sd": None if math.isnan(per_label.loc[best, "sd"]) else float(per_label.loc[best, "sd"]),
        "not_worse": passing,
        "trainable_params": None if math.isnan(row["params"]) else float(row["params"]),
        "train_seconds": None if math.isnan(row["seconds"]) else float(row["seconds"]),
    })
    if out["method"] == "wilcoxon_holm" and label != best:
        out["p_holm"] = float(tests.loc[tests["label"] == label, "p_holm"].iloc[0])
    elif out["method"] == "paired_bootstrap_holm" and label != best:
        out["p_holm"] = out["paired"][label]["p_holm"]
    if "full" in per_label.index:
        full = per_label.loc["full"]
        if row["params"] > 0 and not math.isnan(full["params"]):
            out["params_ratio"] = float(full["params"] / row["params"])
        if row["seconds"] > 0 and not math.isnan(full["seconds"]):
            out["time_ratio"] = float(full["seconds"] / row["seconds"])
    else:
        out["notes"].append("No 'full' runs: cost saving versus full fine-tuning is not available.")


#: Metrics :func:`medtune.training.intervals.resampled_metric` can resample (single-label tasks).
PAIRED_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")


def paired_validation_tests(runs: Sequence[Record], labels: Sequence[str], best: str, metric: str, *,
                            alpha: float = 0.05, num_resamples: int = 2000,
                            seed: int = 0) -> dict[str, dict[str, Any]] | None:
    """Each configuration against ``best`` by a paired bootstrap over the validation images.

    Used by :func:`recommend` when there are too few seeds for Wilcoxon over blocks. Every run's
    exact validation probabilities (``run["val_predictions"]``) are needed, all on the same
    validation images (one dataset and split: same labels in the same order); the metric of each
    configuration is averaged over its runs (seeds, archs) inside every resample
    (:func:`medtune.training.intervals.paired_bootstrap`), and the p-values are Holm-corrected over
    the comparisons. A configuration is "not worse" when its difference to the best is ≥ 0 or
    the corrected p-value is ≥ ``alpha``.

    Returns:
        ``{label: {diff, ci_low, ci_high, pvalue, p_holm, not_worse_than_best}}`` for every label
        but ``best`` (``diff`` = label − best on the metric's scale), or None when the test does not
        apply (a metric without a resampled form, a multi-label task, missing or unshared validation
        predictions).
    """
    from medtune.training.intervals import paired_bootstrap

    if metric not in PAIRED_METRICS:
        return None
    probs: dict[str, list[np.ndarray]] = {lab: [] for lab in labels}
    y_ref = None
    for r in runs:
        lab = str(r.get("label") or r.get("strategy"))
        if lab not in probs:
            continue
        vp = r.get("val_predictions")
        if not isinstance(vp, Mapping) or vp.get("y_true") is None or vp.get("y_prob") is None:
            return None
        y, p = np.asarray(vp["y_true"]), np.asarray(vp["y_prob"], dtype=float)
        if y.ndim != 1 or p.ndim != 2 or len(y) != len(p):
            return None  # multi-label, or damaged
        if y_ref is None:
            y_ref = y
        elif y.shape != y_ref.shape or not np.array_equal(y, y_ref):
            return None  # not the same validation images
        probs[lab].append(p)
    if y_ref is None or any(not v for v in probs.values()):
        return None
    sign = 1.0 if higher_is_better(metric) else -1.0
    out = {lab: paired_bootstrap(y_ref, probs[lab], probs[best], metric, num_resamples=num_resamples, seed=seed)
           for lab in labels if lab != best}
    adjusted = holm([t["pvalue"] for t in out.values()])
    for (lab, t), p_adj in zip(out.items(), adjusted):
        t["p_holm"] = float(p_adj)
        t["not_worse_than_best"] = bool(sign * t["diff"] >= 0 or not p_adj < alpha)
    return out


def fooling_at(attacks: Sequence[Record], runs: Sequence[Record], label: str, zeta: float) -> dict | None:
    """Mean non-targeted fooling rates of configuration ``label`` at ``zeta`` per source
    (``{source: {rate, ci_low, ci_high, random_rate, num_runs, num_images, num_photos, builtin_photos}}``;
    ``num_images``: the fewest distinct source images over the runs), or None without such audits."""
    if not attacks:
        return None
    frame = attacks_frame(attacks, runs)
    if frame.empty:
        return None
    sel = frame[(frame["label"] == label) & frame["targeted"].isna() & np.isclose(frame["zeta"], zeta)]
    if sel.empty:
        return None
    out = {}
    for source, g in sel.groupby("source"):
        out[str(source)] = {"rate": float(g["fooling_rate"].mean()), "ci_low": float(g["fooling_ci_low"].mean()),
                            "ci_high": float(g["fooling_ci_high"].mean()),
                            "random_rate": float(g["random_fooling_rate"].mean()),
                            "num_runs": int(g["run_id"].nunique()), **_source_size(g)}
    return out


def _source_size(g: pd.DataFrame) -> dict:
    """The fewest distinct source images and photos over the runs (None where older records lack them), and
    whether only the bundled photos were used."""
    def fewest(column: str) -> int | None:
        values = pd.to_numeric(g[column], errors="coerce").dropna() if column in g else pd.Series(dtype=float)
        return int(values.min()) if len(values) else None

    distinct = fewest("num_distinct_natural_images")
    return {"num_images": distinct if distinct is not None else fewest("num_source_images"),
            "num_photos": fewest("num_photos"),
            "builtin_photos": bool("natural_photos" in g and (g["natural_photos"] == "builtin").any())}


def _recommend_text(r: dict[str, Any], zeta: float, alpha: float) -> str:
    m = r["metric"]

    def mean_sd(mean: float | None, sd: float | None) -> str:
        return "n/a" if mean is None else f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")

    parts = [f"Recommended: {r['label']}, test {m} {mean_sd(r['mean'], r['sd'])} (mean ± sd over {r['n']} run(s); "
             f"selected on validation, val {m} {mean_sd(r['val_mean'], r['val_sd'])})."]
    if r["method"] == "single":
        parts.append("It is the only configuration with results.")
    elif r["label"] == r["best_label"]:
        parts.append(f"It has the best mean validation {m}, and no cheaper configuration is close enough to it.")
    else:
        ref = (f"the best on validation, {r['best_label']} (val {mean_sd(r['best_val_mean'], r['best_val_sd'])}; "
               f"test {mean_sd(r['best_mean'], r['best_sd'])})")
        if r["method"] == "wilcoxon_holm":
            parts.append(f"It is not significantly worse than {ref}: Wilcoxon signed-rank, "
                         f"Holm-corrected p = {r['p_holm']:.3g} ≥ {alpha:g}.")
        elif r["method"] == "paired_bootstrap_holm":
            t = r["paired"][r["label"]]
            parts.append(f"It is not significantly worse than {ref}: paired bootstrap over the validation images "
                         f"(seed-averaged {m}, difference {t['diff']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}]), "
                         f"Holm-corrected p = {t['p_holm']:.3g} ≥ {alpha:g}.")
        elif r["method"] == "within_sd":
            parts.append(f"Its validation mean is within one sd of {ref}; significance could not be tested.")
        else:
            parts.append(f"Its validation mean is within {abs(r['best_val_mean'] - r['val_mean']):.3g} of {ref} "
                         "(fallback tolerance); significance could not be tested.")
    if r["params_ratio"] is not None and r["label"] != "full":
        time = ""
        if r["time_ratio"] is not None:
            time = (f" and {r['time_ratio']:.1f}× less training time" if r["time_ratio"] >= 1
                    else f" but {1 / r['time_ratio']:.1f}× more training time")
        parts.append(f"Compared with full fine-tuning it trains {r['params_ratio']:.1f}× fewer parameters "
                     f"({fmt_count(r['trainable_params'], missing='n/a')}){time}.")
    if r["fooling_rate"]:
        srcs = "; ".join(f"{v['rate']:.2f} [{v['ci_low']:.2f}, {v['ci_high']:.2f}] from {s} images "
                         f"(random control {v['random_rate']:.2f})" for s, v in sorted(r["fooling_rate"].items()))
        parts.append(f"UAP fooling rate at ζ = {100 * zeta:.3g}% of the mean input norm: {srcs}.")
    parts.extend(r["notes"])
    return " ".join(parts)
