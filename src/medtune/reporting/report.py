"""One self-contained report file (HTML or Markdown) built from plain run/attack/search records.

The HTML file needs nothing else: figures are embedded as base64 PNG data URIs, the CSS is
inline, there is no JavaScript, and a Content-Security-Policy meta tag forbids the browser any
network fetch. Markdown reports write their PNGs beside the ``.md`` file. Both formats also
write the tables as CSV beside the report.

Three steps, so both formats always say the same: :func:`~medtune.reporting._data.build_report_data`
computes every number as plain data; the functions here format it into sections of blocks
(:mod:`medtune.reporting._blocks`), computing nothing; each block renders itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medtune._checks import check_choice
from medtune.reporting._blocks import (
    Block,
    Card,
    Facts,
    Figure,
    Note,
    Paragraph,
    Recommendation,
    Report,
    Section,
    Table,
)
from medtune.reporting._data import ReportData, build_report_data
from medtune.reporting._format import fmt_count, fmt_number, fmt_pvalue
from medtune.reporting._records import check_metric, check_open_fraction, done_runs
from medtune.reporting.plots import compact

__all__ = ["build_report"]

Record = Mapping[str, Any]
_FORMATS = ("html", "md")


def build_report(
    runs: Sequence[Record],
    attacks: Sequence[Record] = (),
    searches: Sequence[Record] = (),
    *,
    explanations: Sequence[Record] = (),
    title: str = "medtune report",
    out_path: str | Path,
    fmt: str = "html",
    metric: str = "auc",
    alpha: float = 0.05,
    main_zeta: float = 0.04,
    expected: Mapping[str, Mapping[str, Any]] | None = None,
    halving: Mapping[str, Any] | None = None,
) -> Path:
    """Write the report of a set of records, plus its tables as CSV beside it.

    Sections: a headline recommendation (:func:`~medtune.reporting.stats.recommend`), a summary
    table (best value per column per dataset highlighted, configurations not significantly
    worse than the best marked ≈), the plots, the statistics (Friedman, Wilcoxon + Holm),
    robustness (UAP audit), DEFT searches, a per-run appendix and reproducibility facts
    (package versions, config and data fingerprints). Parts without records are skipped with
    a short note.

    Args:
        runs: run records, as ``ResultsStore.runs()`` returns them.
        attacks: attack records (``ResultsStore.attacks()``).
        searches: DEFT search records (``ResultsStore.searches()``).
        explanations: heat-map summaries (:func:`medtune.localisation.list_explanations`); when
            given, a Localisation section shows their scores and galleries.
        title: report title.
        out_path: the ``.html``/``.md`` file to write; parent folders are created. CSV files
            ``<stem>_summary.csv``, ``<stem>_runs.csv``, ``<stem>_wilcoxon.csv``,
            ``<stem>_friedman.csv`` (and ``_attacks.csv``, ``_deft.csv`` when there are any)
            go beside it; Markdown also writes ``<stem>_<figure>.png`` files.
        fmt: ``"html"`` (self-contained, images inline) or ``"md"``.
        metric: the metric that ranks configurations.
        alpha: family-wise error rate of the strategy comparison.
        main_zeta: UAP budget ζ quoted in the headline.
        expected: published-results tables (:func:`medtune.expected.load_tables`, from a literature preset);
            when given, a "Measured vs. published" section shows each cell's published and measured
            ACC/AUC and its verdict (:mod:`medtune.expected`), also as ``<stem>_expected.csv``.
        halving: :func:`medtune.halving.halving_summary` of the store, or None: a section states the
            settings, the epochs saved, and the configurations stopped at a rung (never in the tables).

    Returns:
        Path of the written report.

    Raises:
        ConfigError: unknown ``fmt``, a ``metric`` that no run stores, or ``alpha`` outside (0, 1).
    """
    check_choice(fmt, "fmt", _FORMATS, owner="build_report")
    check_open_fraction(alpha, "alpha", "build_report")
    runs, attacks, searches = list(runs), list(attacks or ()), list(searches or ())
    check_metric(done_runs(runs), metric, "build_report")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = build_report_data(runs, attacks, searches, metric=metric, alpha=alpha, main_zeta=main_zeta)
    from medtune._safepaths import atomic_write

    # every file by a temp file + rename: a link at its path (a crafted store) is replaced, never written through
    for name, frame in data.csv.items():
        atomic_write(out_path.with_name(f"{out_path.stem}_{name}.csv"), frame.to_csv(index=False))
    published = None
    if expected:
        import pandas as pd

        from medtune.reporting.expected import compare_expected

        rows = compare_expected(runs, expected)
        atomic_write(out_path.with_name(f"{out_path.stem}_expected.csv"), pd.DataFrame(rows).to_csv(index=False))
        published = _published(rows, expected)
    report = format_report(data, title, explanations, published=published)
    if halving:
        report.sections.insert(len(report.sections) - 2, Section("halving", "Successive halving: stopped early",
                                                                  halving_blocks(halving)))
    text = report.to_html() if fmt == "html" else report.to_markdown(out_path)
    atomic_write(out_path, text.encode("utf-8"))
    return out_path


def report_store(store: str | Path = "./medtune-results", *, out_path: str | Path | None = None, fmt: str = "html",
                 metric: str = "auc", title: str = "medtune report") -> Path:
    """Write the report of a results store (default ``STORE/report.html``) and return its path."""
    from medtune._safepaths import check_output
    from medtune.expected import load_tables
    from medtune.store import ResultsStore

    from medtune.halving import halving_summary

    db = ResultsStore(store, create=False)
    out = out_path or Path(store) / f"report.{fmt}"
    check_output(out, flag="-o" if out_path else "the report path")  # never the database or a managed folder
    return build_report(db.runs(), db.attacks(), db.searches(), explanations=db.explanations(), title=title,
                        out_path=out, fmt=fmt, metric=metric,
                        expected=load_tables(db.raw_expected_tables(), where=str(db.root)), halving=halving_summary(db))


def halving_blocks(summary: Mapping[str, Any]) -> list:
    """The halving section: its settings, the epochs trained vs the full grid, and every configuration
    stopped at a rung with its validation metric there — not trained to the end, so in no other table."""
    trained, full = summary["epochs_trained"], summary["epochs_full_grid"]
    saved = f"{full - trained} of {full} ({(full - trained) / full:.0%})" if full else "0"
    blocks: list = [Facts([("settings", f"eta {summary['eta']}, first rung {summary['first_rung']} epoch(s), "
                                        f"within {summary['within']} (ranked by mean validation metric over seeds)"),
                           ("epochs trained", f"{trained} (the full grid's budget: {full}; saved {saved})")])]
    rows = []
    for r in summary["stopped"]:
        cfg = r.get("config") or {}
        rows.append([r["run_id"], str(cfg.get("arch", "")), str(cfg.get("strategy", "")), f"{cfg.get('lr', float('nan')):g}",
                     f"{cfg.get('weight_decay', float('nan')):g}", str(cfg.get("seed", "")),
                     f"stopped at rung {r['rung']}", f"{r['monitor']} {fmt_number(r['val_metric'])}"])
    if rows:
        blocks.append(Table(["run", "arch", "strategy", "lr", "weight decay", "seed", "state", "val metric at rung"],
                            rows, caption="Not trained to the end: left out of every table, test and recommendation."))
    else:
        blocks.append(Note("No configuration was stopped early."))
    return blocks


# --------------------------------------------------------------------------- headline


def _counts_text(data: ReportData) -> str:
    c = data.counts
    parts = [f"{c.num_done} finished run(s)"]
    if c.num_failed:
        parts.append(f"{c.num_failed} unfinished or failed")
    if c.num_done:
        parts.append(f"{c.num_datasets} dataset(s), {c.num_archs} arch(s), "
                     f"{c.num_configs} configuration(s), {c.num_seeds} seed(s)")
    parts.append(f"{c.num_attacks} UAP audit(s), {c.num_searches} DEFT search(es)")
    return "; ".join(parts)


def _recommendation(data: ReportData) -> Recommendation:
    r = data.recommendation
    # drawn small (360 px, text >= 10 pt) rather than scaled down: legible three to a row at 1280 px
    small = [Figure(f"headline_{name}", fig, caption) for name, fig, caption in (
        ("depth", compact(data.figures.get("depth")), "How deep: test metric vs fine-tuned blocks"),
        ("cost", compact(data.figures.get("cost")), "Which strategy: test metric vs trainable parameters"),
        ("fooling", compact(data.robustness.fooling_figure if data.robustness else None, panel=r.get("label")),
         "How exposed: UAP fooling rate vs random controls")) if fig is not None]
    return Recommendation(r.get("text", ""), _cards(data), answers=_answers(data), figures=small)


#: Minagi et al. 2022 (their Natural_UAP log): test fooling 0.060 after 1,000 natural images, 0.178 after 10,000,
#: 0.685 after 50,000, against a random control of about 0.15 — a rate well above random needed ≥ 10,000.
PAPERS_NATURAL_IMAGES = 10_000


def at_papers_scale(source: str, fool: dict) -> bool:
    """Whether a natural-image rate was measured from as many distinct images as the papers needed."""
    if source not in ("natural", "mixed"):
        return True
    num = fool.get("num_images")
    return not fool.get("builtin_photos") and num is not None and num >= PAPERS_NATURAL_IMAGES


def exposure_phrase(source: str, fool: dict) -> str:
    """``from natural images 9% (from 16 natural images; ...)``: a rate with the number of images it came from."""
    num = fool.get("num_images")
    count = "" if num is None else f"from {num:,} {source} images"
    if source not in ("natural", "mixed"):
        return f"from {source} images {fool['rate']:.0%}" + (f" ({count})" if count else "")
    needed = f"Minagi et al. needed ≥ {PAPERS_NATURAL_IMAGES:,} for a rate well above random"
    if at_papers_scale(source, fool):
        return f"from {source} images {fool['rate']:.0%} ({count}; {needed})"
    return (f"from {source} images not measured at the papers' scale ({fool['rate']:.0%} "
            f"{count or 'from an unrecorded number of images'}; {needed})")


def _answers(data: ReportData) -> str:
    """One paragraph for the three questions: how deep, which strategy, how exposed to UAPs."""
    m, r, parts = data.metric, data.recommendation, []
    d = data.depth
    if d is not None:
        of = f" of {d['num_blocks']}" if d["num_blocks"] is not None else ""
        what = "the head alone (linear probe)" if d["depth"] == 0 else (
            "every block (full fine-tuning)" if d["depth"] == d["num_blocks"] else f"the top {d['depth']}{of} blocks")
        parts.append(f"How deep: fine-tuning {what} is best on validation (val {m} {d['val_mean']:.3f}, test "
                     f"{d['test_mean']:.3f}; {d['num_depths']} depths, {d['scope']}).")
    if r.get("label") is not None:
        test = "" if r.get("mean") is None else f", test {m} {r['mean']:.3f}"
        why = ("the best on validation, with no cheaper configuration as good" if r["label"] == r["best_label"]
               else f"the cheapest configuration not worse on validation than the best, {r['best_label']}")
        parts.append(f"Which strategy: {r['label']}, {why}{test}.")
        t = data.trains
        if t is not None and t.get("trainable") is not None:
            share = f" ({100 * t['trainable'] / t['total']:.2g}% of {t['total']:,.0f})" if t.get("total") else ""
            blocks = ""
            if t.get("per_block"):
                blocks = "; per block: " + ", ".join(f"{b} {n:,}" for b, n in t["per_block"].items())
            what = f" — {t['what'].rstrip('.')}" if t.get("what") else ""
            parts.append(f"It trains {t['trainable']:,.0f} parameters{share}{blocks}{what}.")
    exposure = data.exposure
    if exposure:
        zeta = f"ζ = {100 * data.main_zeta:.3g}%"
        if r.get("label") not in exposure:
            parts.append(f"How exposed ({r.get('label')} was not audited; the audited configurations at {zeta}):")
        else:
            exposure = {r["label"]: exposure[r["label"]]}
            parts.append(f"How exposed, at {zeta}:")
        for label, fool in exposure.items():
            rates = ", ".join(exposure_phrase(src, f) for src, f in sorted(fool.items()))
            random = max(f["random_rate"] for f in fool.values())
            parts.append(f"{label}: UAP fooling {rates} vs random noise of the same norm {random:.0%}.")
    elif data.counts.num_done:
        parts.append("How exposed: no UAP audit yet (medtune attack).")
    return " ".join(parts)


def _cards(data: ReportData) -> list[Card]:
    """Key numbers for the headline box."""
    r = data.recommendation
    if r.get("label") is None:
        return []
    sd = f" ± {r['sd']:.3f}" if r.get("sd") is not None else ""
    test = "n/a" if r.get("mean") is None else f"{r['mean']:.3f}{sd}"
    best = "" if r.get("best_mean") is None else f" {r['best_mean']:.3f}"
    cards = [Card(str(r["label"]), "recommended configuration (selected on validation)"),
             Card(test, f"test {data.metric} (best on validation: {r['best_label']}{best})")]
    if r.get("params_ratio") is not None:
        cards.append(Card(f"{r['params_ratio']:.1f}×", "fewer trainable parameters than full fine-tuning"))
    if r.get("time_ratio") is not None:
        cards.append(Card(f"{r['time_ratio']:.1f}×", "faster training than full fine-tuning"))
    if data.headline_fooling is not None:
        source, fool = data.headline_fooling
        scale = "" if at_papers_scale(source, fool) else "; not measured at the papers' scale"
        count = "" if fool.get("num_images") is None else f" from {fool['num_images']:,} {source} images"
        cards.append(Card(f"{fool['rate']:.0%}",
                          f"UAP fooling rate, ζ = {100 * data.main_zeta:.3g}%,{count or f' {source}-image source'} "
                          f"(random control {fool['random_rate']:.0%}{scale})"))
    return cards


# --------------------------------------------------------------------------- sections


def _rule_text(data: ReportData) -> str:
    return {"wilcoxon_holm": f"Wilcoxon signed-rank over (dataset, arch, seed, fold) blocks, Holm, α = {data.alpha:g}",
            "paired_bootstrap_holm": ("paired bootstrap over the validation images (seed-averaged), Holm, "
                                      f"α = {data.alpha:g}"),
            "within_sd": "fallback: mean within one sd of the best, significance not testable",
            "within_tolerance": "fallback: mean within a fixed tolerance of the best, significance not testable",
            }.get(data.recommendation.get("method", ""), "no comparison")


def _summary(data: ReportData) -> list[Block]:
    if data.summary is None:
        return [Note("No finished runs: there is nothing to summarise.")]
    metrics = data.summary.metrics
    header = ["dataset", "arch", "configuration", "n", *metrics, "trainable params", "train time (s)"]
    rows, classes = [], []
    for d in data.summary.rows:
        mark = " ≈" if d["not_worse"] else ""
        rec_mark = " ★" if d["recommended"] else ""
        cells = [str(d["dataset"]), str(d["arch"]), f"{d['label']}{mark}{rec_mark}", str(d["n"])]
        cls = ["", "", "rec" if rec_mark else ("nw" if mark else ""), ""]
        for m in metrics:
            sd = d[f"{m}_sd"]
            ci = (f" [{fmt_number(d[f'{m}_ci_low'])}, {fmt_number(d[f'{m}_ci_high'])}]"
                  if m == data.metric and not math.isnan(d[f"{m}_ci_low"]) else "")
            cells.append(f"{fmt_number(d[f'{m}_mean'])} ± {fmt_number(sd)}{ci}" if not math.isnan(sd)
                         else fmt_number(d[f"{m}_mean"]))
            cls.append("best" if m in d["best"] else "")
        cells += [fmt_count(d["trainable_params"]), fmt_number(d["train_seconds"], 1)]
        cls += ["best" if c in d["best"] else "" for c in ("trainable_params", "train_seconds")]
        rows.append(cells)
        classes.append(cls)
    caption = (f"Test metrics: mean ± sd over seeds, [95% t-interval intersected with the metric's range] for "
               f"{data.metric}. Selection is on validation: rows are ordered by validation {data.metric}, and "
               "the highlighted cell of each column is the configuration best on that column's validation "
               "metric within a dataset (its test value shown). ★ recommended; ≈ not significantly worse than "
               f"the best on validation ({_rule_text(data)}).")
    blocks: list[Block] = [Table(header, rows, classes, caption)]
    if data.folds is not None:
        f = data.folds
        blocks.append(Table(list(f.columns), [[v if isinstance(v, str) else fmt_number(v) for v in row]
                                              for row in f.itertuples(index=False)],
                            caption=f"Cross-validation: mean test {data.metric} per fold (over seeds) and the spread "
                                    "across folds. The test split is the same in every fold; the folds rotate "
                                    "train and validation (group-aware where the data has groups)."))
    if data.hp_choices:
        blocks.append(Table(
            ["dataset", "arch", "configuration", "fraction", "chosen (validation)", f"mean val {data.metric} per value"],
            [[str(c["dataset"]), str(c["arch"]), str(c["configuration"]), fmt_number(c["train_fraction"], 2),
              str(c["chosen"]), "; ".join(f"{hp}: {fmt_number(v)}" for hp, v in sorted(c["candidates"].items()))]
             for c in data.hp_choices],
            caption="Tuned hyper-parameters: each configuration above is shown at the value with the best mean "
                    f"validation {data.metric} over seeds (every value's rows: the *_summary_per_value.csv table beside the report)."))
    if data.fraction_note:
        blocks.append(Note(data.fraction_note + " The summary CSV keeps every train fraction."))
    return blocks


# figure name, caption ({m}: the ranking metric), note when the figure is missing (None: say nothing)
_PLOTS = (
    ("depth", "How deeply to fine-tune: test {m} vs the number of trainable top blocks (mean ± sd over seeds; "
              "0 = linear probe, the last point = full fine-tuning), after Kandel & Castelli 2020.",
     "No top_k/layers_k runs: the depth plot is skipped."),
    ("cost", "Test {m} vs cost. The black step line and circles mark the Pareto front: no other configuration "
             "is both cheaper and better.", "No runs with the metric: the cost plot is skipped."),
    ("frontier", "The parameter-efficiency frontier: validation {m} (left; what selects) and test {m} (right) vs "
                 "trainable parameters, parameter-efficient strategies (squares: bitfit, norm, lora, knn) beside the "
                 "depth strategies (circles), mean over seeds at the main data size. The circled points are the "
                 "Pareto set on validation: no other configuration trains fewer parameters for a better validation "
                 "{m}.", None),
    ("data_size", "Test {m} vs training images per class (k-shot sets, train_per_class; mean ± sd over seeds), one "
                  "line per strategy (dashed: parameter-efficient); the grey band is where full fine-tuning overtakes "
                  "the linear probe on validation (between the last size where it is not better and the first from "
                  "which it stays better).", None),
    ("train_fraction",
     "Test {m} vs training-set size, from scratch (dashed) vs fine-tuned, after Tajbakhsh et al. 2016.",
     "A single train fraction: the train-size plot is skipped."),
    ("auto_rgn", "Auto-RGN: mean learning-rate weight per block and epoch (1 = the block with the largest relative "
                 "gradient norm).", "No auto_rgn runs with per-block weights: the Auto-RGN plot is skipped."),
    ("roc", "ROC curves on the test split of the run best on validation of each of the configurations best on "
            "validation (legend: per-class test AUC).",
     "No run stores test predictions: ROC curves and confusion matrices are skipped."),
    ("confusion", "Confusion matrices of the same runs (rows: true class, columns: predicted, argmax).", None),
)


def _plots(data: ReportData) -> list[Block]:
    blocks: list[Block] = []
    for name, caption, missing in _PLOTS:
        fig = data.figures[name]
        if fig is not None:
            blocks.append(Figure(name, fig, caption.format(m=data.metric)))
        elif missing:
            blocks.append(Note(missing))
    return blocks


def _verdict(label: str, reference: str, not_worse: bool | None) -> str:
    if label == reference:
        return "best"
    return "not worse" if not_worse else "worse" if not_worse is False else "–"


def _statistics(data: ReportData) -> list[Block]:
    st = data.statistics
    if st is None:
        return [Note("No finished runs: no statistics.")]
    fr_rows = [[fr["metric"], fmt_number(fr["statistic"], 2), fmt_pvalue(fr["pvalue"]), str(fr["num_blocks"]),
                str(fr["num_treatments"]),
                fr["note"].replace(data.fraction_note or "\0", "").strip()]  # said once, below the summary table
               for fr in st.friedman]
    blocks: list[Block] = [
        Paragraph("Strategies are compared on the validation metric (the split that selects; test is only "
                  "reported) over blocks of (dataset, arch, seed, cross-validation fold) at each dataset's largest train "
                  "fraction: a Friedman test over complete blocks, then Wilcoxon signed-rank tests against the "
                  "best configuration with Holm's correction."),
        Table(["metric", "χ²", "p", "complete blocks", "treatments", "note"], fr_rows,
              caption="Friedman test per metric, on validation metrics.")]
    if st.mean_ranks:
        blocks.append(Table(["configuration", f"mean rank ({data.metric}, 1 = best)"],
                            [[k, f"{v:.2f}"] for k, v in st.mean_ranks],
                            caption="Mean Friedman ranks (validation) over complete blocks."))
    tests = st.wilcoxon
    if len(tests) > 1:
        rows = [[str(t.label), str(t.reference), str(t.n), fmt_number(t.mean), fmt_number(t.mean_diff, 4),
                 fmt_number(t.statistic, 1), fmt_pvalue(t.pvalue), fmt_pvalue(t.p_holm),
                 _verdict(t.label, t.reference, t.not_worse_than_best)] for t in tests.itertuples()]
        classes = [[""] * 8 + ["nw" if t.not_worse_than_best else ""] for t in tests.itertuples()]
        blocks.append(Table(
            ["configuration", "vs", "pairs", f"mean val {data.metric}", "difference", "W", "p", "p (Holm)", "verdict"],
            rows, classes, caption=f"Wilcoxon signed-rank vs the best configuration; verdict at α = {data.alpha:g}."))
    else:
        blocks.append(Note("Fewer than two configurations: no pairwise tests."))
    blocks.extend(Note(n) for n in data.recommendation.get("notes") or [])
    return blocks


def _classes(data: ReportData) -> list[Block]:
    cd = data.classes
    if cd is None or all(f is None for f in (cd.per_class, cd.operating, cd.calibration)):
        return [Note("No run records per-class metrics or calibration (runs from before medtune recorded them).")]
    blocks: list[Block] = []

    def cells(frame, columns, digits=3):
        return [[str(row[c]) if c in ("dataset", "arch", "label", "class", "runs")
                 else fmt_number(row[c], 1 if c == "support" else digits) for c in columns] for _, row in frame.iterrows()]

    if cd.per_class is not None:
        cols = ["dataset", "arch", "label", "class", "runs", "support", "sensitivity", "specificity", "ppv", "pr_auc"]
        blocks.append(Table(["dataset", "arch", "configuration", "class", "runs", "test images", "sensitivity",
                             "specificity", "PPV", "PR-AUC"], cells(cd.per_class, cols),
                            caption="Per class, one-vs-rest on the test split (arg-max decisions; PR-AUC: average "
                                    "precision); means over the configuration's runs."))
    if cd.operating is not None:
        cols = ["dataset", "arch", "label", "runs", "target_sensitivity", "threshold", "val_sensitivity",
                "val_specificity", "test_sensitivity", "test_specificity", "test_ppv", "test_npv"]
        blocks.append(Table(["dataset", "arch", "configuration", "runs", "target sens.", "threshold", "val sens.",
                             "val spec.", "test sens.", "test spec.", "test PPV", "test NPV"],
                            cells(cd.operating, cols),
                            caption="Binary tasks: the highest threshold reaching the target sensitivity on "
                                    "validation (chosen there), and its operating point on test (only reported)."))
    if cd.calibration is not None:
        cols = ["dataset", "arch", "label", "runs", "ece", "ece_scaled", "brier", "brier_scaled", "temperature"]
        blocks.append(Table(["dataset", "arch", "configuration", "runs", "ECE", "ECE (T-scaled)", "Brier",
                             "Brier (T-scaled)", "temperature T"], cells(cd.calibration, cols),
                            caption="Test calibration: expected calibration error (15 bins, top label) and Brier "
                                    "score, before and after temperature scaling with T fitted on validation."))
    fig = data.figures.get("reliability")
    if fig is not None:
        blocks.append(Figure("reliability", fig, "Reliability diagram (test split) of the run best on validation "
                                                 "of each of the configurations best on validation; the diagonal "
                                                 "is perfect calibration."))
    return blocks


def _robustness(data: ReportData) -> list[Block]:
    rb = data.robustness
    if rb is None:
        return [Note("No UAP audits recorded: the robustness section is skipped (run `medtune attack RUN`).")]
    blocks: list[Block] = [Paragraph(
        "Fooling rate: share of test images whose prediction changes under the UAP. ζ is the perturbation norm "
        "as a fraction of the mean input norm (ξ = ζ·mean‖x‖, pixels in [0, 1]); the random control is a random "
        "vector of the same norm.")]
    if rb.fooling_figure is not None:
        blocks.append(Figure("fooling", rb.fooling_figure,
                             "Fooling rate vs ζ per UAP source (mean over audited runs; bars: 95% CI)."))
    if rb.non_targeted is not None:
        rows = [[str(r.label), str(r.source), fmt_count(r.images),
                 f"{100 * r.zeta:.3g}%", fmt_number(r.xi, 2), str(r.runs),
                 f"{fmt_number(r.rate, 2)} [{fmt_number(r.low, 2)}, {fmt_number(r.high, 2)}]", fmt_number(r.rnd, 2)]
                for r in rb.non_targeted.itertuples()]
        blocks.append(Table(["configuration", "source", "source images", "ζ", "ξ (pixel units)", "runs",
                             "fooling rate [95% CI]", "random control"], rows,
                            caption="Non-targeted UAPs (means over runs; source images: the fewest over the runs)."))
    if rb.source_figure is not None:
        blocks.append(Figure("source_curve", rb.source_figure,
                             "Test fooling rate vs the number of source images seen (one point per chunk; dotted: "
                             "each UAP's random control). Minagi et al. needed ≥ 10,000 natural images for a rate "
                             "well above random."))
    if rb.targeted is not None:
        rows = [[str(r.label), str(r.source), f"{100 * r.zeta:.3g}%", fmt_number(r.targeted, 0),
                 fmt_number(r.targeted_success, 2), fmt_number(r.clean_target_share, 2)]
                for r in rb.targeted.itertuples()]
        blocks.append(Table(["configuration", "source", "ζ", "target class", "success rate",
                             "clean share of target"], rows, caption="Targeted UAPs."))
    if rb.uap_figure is not None:
        blocks.append(Figure("uaps", rb.uap_figure, "UAPs (amplified for visibility)."))
    else:
        blocks.append(Note("No UAP image files found (uap_png missing or not on disk)."))
    return blocks


def _deft(data: ReportData) -> list[Block]:
    if not data.searches:
        return [Note("No DEFT searches recorded: this section is skipped (run `medtune search`).")]
    blocks: list[Block] = []
    for i, s in enumerate(data.searches):
        units = s.fine_tuned_units
        blocks.append(Facts([
            ("search", str(s.search_id)), ("data / arch", f"{s.dataset} / {s.arch}"),
            ("granularity", str(s.granularity)), ("best fitness", fmt_number(s.best_fitness)),
            ("generations", str(s.num_generations)), ("search time (s)", fmt_number(s.seconds, 0)),
            ("fine-tuned units", ", ".join(units) + (" + head" if "head" not in units else "")
             if units is not None else "–")]))
        if s.figure is not None:
            blocks.append(Figure(f"deft_{i}", s.figure, "Fitness per generation and the chosen mask."))
        if s.comparison:
            blocks.append(Table(s.comparison_keys,
                                [[fmt_number(c.get(k)) for k in s.comparison_keys] for c in s.comparison],
                                caption="Best mask retrained at full fidelity vs baselines (test metrics; the best "
                                        "top-k is the one best on validation; search_seconds: what finding the "
                                        "mask cost, beside its train_seconds)."))
    return blocks


def _appendix(data: ReportData) -> list[Block]:
    if data.appendix is None:
        return [Note("No runs.")]
    metrics = data.appendix.metrics
    runs = data.appendix.runs
    # the precision the runs computed in (fp32, bf16, fp16): a column only where it differs between runs
    precision = runs["precision"].fillna("?").nunique() > 1 if "precision" in runs else False
    header = ["run", "status", "dataset", "arch", "configuration", "seed", "fraction", *metrics,
              "params", "time (s)", *(["precision"] if precision else []), "config sha"]
    def with_ci(r, m: str) -> str:
        ci = (r.get("metric_ci") or {}).get(m)
        return fmt_number(r[m]) + (f" [{fmt_number(ci[0])}, {fmt_number(ci[1])}]" if ci else "")

    rows = [[str(r["run_id"]), str(r["status"]), str(r["dataset"]), str(r["arch"]), str(r["label"]),
             str(r["seed"]), fmt_number(r["train_fraction"], 2), *[with_ci(r, m) for m in metrics],
             fmt_count(r["trainable_params"]), fmt_number(r["train_seconds"], 1),
             *([r["precision"] if isinstance(r["precision"], str) else "?"] if precision else []), r["config_sha"]]
            for _, r in runs.iterrows()]
    return [Table(header, rows, caption="All runs, including unfinished ones. Test metrics with their 95% interval "
                                        "over the test images (DeLong for a binary AUC, else a percentile "
                                        "bootstrap), where the run records one.")]


def _reproducibility(data: ReportData) -> list[Block]:
    rp = data.reproducibility
    blocks: list[Block] = [Facts([
        ("report generated", rp.generated.strftime("%Y-%m-%d %H:%M UTC")),
        ("medtune (report)", rp.medtune_version),
        ("input fingerprint", f"sha256 {rp.input_fingerprint} of the records this report was built from"),
        ("distinct configs", str(rp.num_configs))])]
    if rp.versions:
        blocks.append(Table(["package versions of the runs", "runs"],
                            [[k, str(n)] for k, n in sorted(rp.versions.items())]))
    if rp.data_fingerprints:
        blocks.append(Table(["dataset", "data fingerprint"], [list(d) for d in rp.data_fingerprints]))
    blocks.append(Paragraph("Every table is also written as CSV beside this report; the per-run "
                            "'config sha' is the sha256 (first 12 hex digits) of the run's resolved config."))
    return blocks


# anchor, heading, the function that formats its blocks
_SECTIONS = (
    ("summary", "Summary", _summary),
    ("plots", "Plots", _plots),
    ("statistics", "Statistics", _statistics),
    ("classes", "Classes, operating point and calibration", _classes),
    ("robustness", "Robustness: universal adversarial perturbations", _robustness),
    ("deft", "DEFT layer search", _deft),
    ("runs", "Appendix: every run", _appendix),
    ("reproducibility", "Reproducibility", _reproducibility),
)


def _localisation(explanations: Sequence[Record]) -> list[Block]:
    """Scores and galleries of ``medtune explain`` summaries (their gallery PNGs read from disk)."""
    import matplotlib.pyplot as plt

    blocks: list[Block] = [Paragraph(
        "Class-activation heat maps at the last feature block. Pointing game: share of images whose map maximum "
        "lies in the true box (chance: the box's mean share of the image; Wilson 95% CI); IoU: the box of the map "
        "at or above the threshold × its maximum against the true box (bootstrap 95% CI).")]
    rows = []
    for e in explanations:
        sc = e.get("scores") or {}
        pg = (f"{fmt_number(sc['pointing_game'], 2)} [{fmt_number(sc['pointing_game_ci'][0], 2)}, "
              f"{fmt_number(sc['pointing_game_ci'][1], 2)}]" if sc else "–")
        iou = f"{fmt_number(sc['iou'], 2)} [{fmt_number(sc['iou_ci'][0], 2)}, {fmt_number(sc['iou_ci'][1], 2)}]" if sc else "–"
        rows.append([str(e.get("label") or e.get("run_id")), str(e.get("run_id", ""))[:8], str(e.get("method")),
                     str(e.get("layer")), str(e.get("num_images")), pg,
                     fmt_number(sc["pointing_chance"], 2) if sc else "–", iou])
    blocks.append(Table(["configuration", "run", "method", "layer", "images", "pointing game [95% CI]", "chance",
                         "box IoU [95% CI]"], rows, caption="Localisation (no ground truth: –)."))
    for i, e in enumerate(explanations):
        if not e.get("gallery_png"):
            continue
        png = Path(e.get("dir", "")) / str(e["gallery_png"])
        image = _read_embeddable(png, f"the explanation of run {e.get('run_id')}")
        if image is None:
            continue
        fig = plt.figure(figsize=(image.shape[1] / 100, image.shape[0] / 100), dpi=100)
        fig.figimage(image)
        blocks.append(Figure(f"gallery_{i}", fig, f"{e.get('label') or e.get('run_id')}: correct and incorrect "
                                                 f"{e.get('split', 'test')} images per class, {e.get('method')} maps."))
    return blocks


def _read_embeddable(path: Path, what: str):
    """An image to embed, or None: only a regular file (a FIFO would block), under ``MAX_EMBED_PIXELS``
    (its header is read first: a 36-Mpx PNG would take gigabytes); a skipped one is one warning naming ``what``."""
    import warnings

    import matplotlib.pyplot as plt

    from medtune._safepaths import MAX_EMBED_PIXELS, image_pixels, open_regular

    if not path.exists():
        return None
    try:
        pixels = image_pixels(path)
        if pixels > MAX_EMBED_PIXELS:
            raise OSError(f"{pixels / 1e6:.1f} Mpx, above the report's limit of {MAX_EMBED_PIXELS / 1e6:.0f} Mpx")
        with open_regular(path) as fh:
            return plt.imread(fh, format="png")
    except (OSError, ValueError, SyntaxError) as exc:
        warnings.warn(f"{what}: image {path} not shown ({exc}).", stacklevel=3)
        return None


def _published(rows: Sequence[Mapping[str, Any]], tables: Mapping[str, Mapping[str, Any]]) -> list[Block]:
    """The measured-vs-published table of a literature preset's ``expected:`` cells."""
    from medtune.reporting.expected import expected_table_cells, runs_first

    rows = runs_first(rows)
    header, cells = expected_table_cells(rows)
    verdict_class = {"within": "best", "not run": ""}
    classes = [[""] * (len(header) - 1) + [verdict_class.get(r["verdict"], "off")] for r in rows]
    counts = {v: sum(1 for r in rows if r["verdict"].startswith(v)) for v in ("within", "outside", "not run")}
    blocks: list[Block] = [Paragraph(
        f"{counts['within']} of {len(rows)} published cells reproduced within tolerance, {counts['outside']} "
        f"outside, {counts['not run']} not run. Values in %; measured = mean ± SD over the seeds of the "
        "configuration best on validation; the published SD where the paper gives one.")]
    for name, table in tables.items():
        tol = table["tolerance"]
        blocks.append(Facts([(name, f"{table['source']} — within = |Δ| ≤ max({tol['sd_factor']:g} × published SD, "
                                    f"{tol['min_points']:g} points); size = {table['size_field']}")]))
    blocks.append(Table(header, cells, classes, caption="Measured beside published (verdict per cell)."))
    return blocks


def format_report(data: ReportData, title: str, explanations: Sequence[Record] = (),
                  published: list[Block] | None = None) -> Report:
    """The report's blocks: ``data`` formatted as text, nothing computed (galleries read from disk)."""
    sections = [Section(anchor, heading, blocks_of(data)) for anchor, heading, blocks_of in _SECTIONS]
    if published:  # right after the summary: does it reproduce the paper?
        sections.insert(1, Section("published", "Measured vs. published", published))
    if explanations:  # before the appendix
        sections.insert(len(sections) - 2, Section("localisation", "Localisation: heat maps",
                                                   _localisation(explanations)))
    return Report(title=title, subtitle=_counts_text(data), recommendation=_recommendation(data), sections=sections)
